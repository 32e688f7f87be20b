"""Finding cloud nodes by DNS-SD (``_tandem._tcp.local.``) and keeping the table live.

An advert is only a claim. Before a discovered node joins the table the
agent checks what it can: the protocol version, and with TLS, that the node
behind the address presents a certificate chaining to the deployment's CA
whose fingerprint is the one advertised; an advert failing either is ignored
with a log line. Nodes given with ``--cloud`` are never removed by discovery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from protos import discovery as dnssd
from protos.discovery import SERVICE_TYPE

logger = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Advert:
    name: str                  # DNS-SD instance name
    addresses: tuple[str, ...]  # HOST:PORT for each address advertised, in the advert's order
    node_id: str
    models: tuple[str, ...]
    fingerprint: str           # SHA-256 of the node's certificate, "" without TLS
    version: str

    @property
    def address(self) -> str:
        return self.addresses[0]


def parse_advert(name: str, addresses: Sequence[str], port: int | None, properties: dict) -> Advert | str:
    """The advert, or why it cannot be used."""
    txt = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else (v or ""))
           for k, v in properties.items()}
    if not addresses or not port:
        return "no address or port"
    version = txt.get(dnssd.TXT_VERSION, "")
    if version != dnssd.PROTOCOL_VERSION:
        return f"protocol version {version!r}, this agent speaks {dnssd.PROTOCOL_VERSION}"
    models = tuple(m for m in txt.get(dnssd.TXT_MODELS, "").split(",") if m and m != "...")
    return Advert(name=name, addresses=tuple(f"{a}:{port}" for a in addresses), node_id=txt.get(dnssd.TXT_NODE_ID, name), models=models,
                  fingerprint=txt.get(dnssd.TXT_FINGERPRINT, ""), version=version)


class Browser:
    """Calls ``on_added(advert)`` / ``on_removed(advert)`` as nodes come and go."""

    def __init__(self, *, interfaces: Sequence[str], on_added: Callable[[Advert], Awaitable[None]],
                 on_removed: Callable[[Advert], Awaitable[None]]) -> None:
        self.interfaces = list(interfaces)
        self._on_added = on_added
        self._on_removed = on_removed
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._known: dict[str, Advert] = {}   # instance name -> advert in use
        self._tasks: set[asyncio.Task] = set()
        # One advert event at a time: a withdrawal must not overtake the
        # check of the same node's announcement (adverts are rare).
        self._events = asyncio.Lock()

    async def start(self) -> None:
        from zeroconf import InterfaceChoice

        self._zeroconf = AsyncZeroconf(interfaces=self.interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._changed])
        logger.info("browsing for %s on %s", SERVICE_TYPE, ", ".join(self.interfaces) or "every interface")

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        handle = self._resolve(zeroconf, service_type, name) if state_change is not ServiceStateChange.Removed \
            else self._remove(name)
        task = asyncio.ensure_future(self._in_turn(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _in_turn(self, handle) -> None:
        async with self._events:
            await handle

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            logger.info("advert %s: no answer to resolve it; ignored", name)
            return
        advert = parse_advert(name, info.parsed_addresses(IPVersion.V4Only), info.port, info.properties)
        if isinstance(advert, str):
            logger.warning("ignoring advert %s: %s", name, advert)
            return
        if self._known.get(name) == advert:
            return
        if name in self._known:  # moved or changed: replace it
            await self._on_removed(self._known.pop(name))
        self._known[name] = advert
        try:
            await self._on_added(advert)
        except Exception as exc:  # noqa: BLE001 -- the table refused it and logged why
            logger.debug("advert %s not taken: %s", name, exc)
            self._known.pop(name, None)  # a corrected advert is tried again

    def forget(self, name: str) -> None:
        """Take ``name`` again when it is next announced (the table dropped it)."""
        self._known.pop(name, None)

    async def _remove(self, name: str) -> None:
        advert = self._known.pop(name, None)
        if advert is not None:
            await self._on_removed(advert)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
