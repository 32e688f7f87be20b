"""The agent's table of cloud nodes: static ones and discovered ones.

Nodes named with ``--cloud`` stay for the agent's life (marked down while
unreachable). Discovered nodes join when their advert checks out and leave
when the advert is withdrawn or when they have been unreachable longer than
``forget_after_s`` (a killed node sends no goodbye); a node that comes back
re-announces itself and joins again. The table is one list shared with the
planner and the LLM router, changed in place on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from edge_agent.discovery import Advert
from edge_agent.offload import CloudNodeClient
from runtimes.tls import server_fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trust:
    """What the agent needs to check and reach TLS nodes."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    credentials: grpc.ChannelCredentials


class NodeTable:
    def __init__(self, nodes: list[CloudNodeClient], *, trust: Trust | None, plaintext_ok: bool = False,
                 make_client: Callable[..., CloudNodeClient], forget_after_s: float, drain_grace_s: float = 30.0) -> None:
        self.nodes = nodes
        self.trust = trust
        self.plaintext_ok = plaintext_ok  # the owner's opt-in to unauthenticated discovered nodes
        self._make_client = make_client
        self.forget_after_s = forget_after_s
        self.drain_grace_s = drain_grace_s
        self._closing: set[asyncio.Future] = set()
        self._by_advert: dict[str, str] = {}   # advert instance name -> address
        self.forgotten: list[str] = []          # advert names dropped for being unreachable

    def _find(self, address: str) -> CloudNodeClient | None:
        return next((n for n in self.nodes if n.address == address), None)

    async def _check(self, advert: Advert, address: str) -> str | None:
        """Why the node at ``address`` must not be used for ``advert``, or None."""
        if self.trust is None:
            if advert.fingerprint:
                return "it is a TLS node and this agent runs plaintext"
            if not self.plaintext_ok:
                return ("this agent runs plaintext, so nothing shows the advert is a node of ours "
                        "(TLS files, or discover_plaintext = true in a lab)")
            return None
        host, _, port = address.rpartition(":")
        try:
            seen = await asyncio.to_thread(server_fingerprint, host, int(port), self.trust.ca_pem,
                                           client_cert_pem=self.trust.cert_pem, client_key_pem=self.trust.key_pem)
        except (ConnectionError, OSError, ValueError) as exc:
            return f"the node at {address} fails TLS verification: {exc}"
        if advert.fingerprint and seen != advert.fingerprint:
            return (f"the certificate at {address} ({seen[:16]}...) is not the one advertised "
                    f"({advert.fingerprint[:16]}...): a spoofed or stale advert")
        return None

    async def added(self, advert: Advert) -> None:
        """Take the first of the advert's addresses that checks out and answers
        (a node on several networks advertises an address on each, not all
        reachable from here), unless the node is in the table already."""
        known = next((address for address in advert.addresses if self._find(address)), None)
        if known is not None:
            self._by_advert.setdefault(advert.name, known)
            return  # a static entry or already known: the advert adds nothing
        problems = []
        for address in advert.addresses:
            problem = await self._check(advert, address)
            if problem:
                problems.append(problem)
                continue
            node = self._make_client(address, node_name=advert.node_id, discovered=True)
            await node.refresh(measure_link=True)
            if not node.state.reachable:
                problems.append(f"{address} unreachable: {node.state.error}")
                await node.close()
                continue
            twin = next((n for n in self.nodes if n.state.reachable and n.state.node_id == node.state.node_id), None)
            if twin is not None:  # the same node under another address (say a --cloud hostname)
                await node.close()
                self._by_advert[advert.name] = twin.address
                logger.info("advert %s is node %s, already in the table at %s", advert.name, node.state.node_id,
                            twin.address)
                return
            self.nodes.append(node)
            self._by_advert[advert.name] = address
            logger.info("discovered node %s at %s: models %s, link %s", advert.node_id, address,
                        sorted(node.state.models), node.link)
            return
        logger.warning("ignoring advert %s (%s): %s", advert.name, advert.node_id, "; ".join(problems))
        raise PermissionError("; ".join(problems))

    async def removed(self, advert: Advert) -> None:
        address = self._by_advert.pop(advert.name, advert.address)
        node = self._find(address)
        if node is not None and node.discovered:
            await self._drop(node, f"advert {advert.name} withdrawn")

    async def _drop(self, node: CloudNodeClient, why: str) -> None:
        """Out of the table at once; requests already on their way get the
        grace to finish (a node withdrawing its advert is draining them)."""
        if node not in self.nodes:
            return  # a removal and a prune both found it
        self.nodes.remove(node)
        logger.info("node %s left the table: %s", node.address, why)
        closing = asyncio.ensure_future(node.close(grace_s=self.drain_grace_s))  # not waited for: the table moves on
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def prune(self, now: float | None = None) -> list[str]:
        """Drop discovered nodes unreachable for longer than ``forget_after_s``;
        returns the advert names dropped, so discovery can take them again."""
        now = time.monotonic() if now is None else now
        dropped = []
        for node in [n for n in self.nodes if n.discovered and n.down_since is not None]:
            if now - node.down_since > self.forget_after_s:
                await self._drop(node, f"unreachable for {now - node.down_since:.1f} s ({node.state.error})")
                dropped += [name for name, address in self._by_advert.items() if address == node.address]
        for name in dropped:
            self._by_advert.pop(name, None)
        return dropped
