"""The node's DNS-SD advertisement: how agents on the network find it.

Service ``_tandem._tcp.local.``, one instance per node, with TXT records an
agent can act on before it connects: protocol version, models, capacity, the
TLS certificate's SHA-256 fingerprint (so a spoofed advert can be told from
the real node) and the node id.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import psutil
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from protos import discovery as dnssd
from protos.discovery import SERVICE_TYPE

logger = logging.getLogger(__name__)

TXT_VALUE_LIMIT = 200  # DNS-SD: each TXT string (key=value) at most 255 bytes


def instance_name(node_id: str) -> str:
    """A DNS-SD instance label from the node id (dots would split the label)."""
    label = "".join(c if c.isalnum() or c in "-_" else "-" for c in node_id)[:63] or "tandem-node"
    return f"{label}.{SERVICE_TYPE}"


def txt_records(*, node_id: str, models: Sequence[str], slots: int, queue: int, fingerprint: str) -> dict[str, str]:
    listed = ",".join(sorted(models))
    if len(listed) > TXT_VALUE_LIMIT:  # the full list is one Status call away
        listed = listed[:TXT_VALUE_LIMIT].rsplit(",", 1)[0] + ",..."
    return {dnssd.TXT_VERSION: dnssd.PROTOCOL_VERSION, dnssd.TXT_NODE_ID: node_id, dnssd.TXT_MODELS: listed,
            dnssd.TXT_SLOTS: str(slots), dnssd.TXT_QUEUE: str(queue), dnssd.TXT_FINGERPRINT: fingerprint,
            dnssd.TXT_TLS: "1" if fingerprint else "0"}


def interface_addresses(interfaces: Sequence[str]) -> list[str]:
    """IPv4 addresses of the named interfaces (names like ``eth0`` or addresses)."""
    by_name = psutil.net_if_addrs()
    found = []
    for wanted in interfaces:
        if wanted in by_name:
            found += [a.address for a in by_name[wanted] if a.family == socket.AF_INET]
        else:
            found.append(wanted)
    return found


class Advertiser:
    """Registers the node on start, withdraws it on close."""

    def __init__(self, *, node_id: str, host: str, port: int, txt: dict[str, str], interfaces: Sequence[str] = ()) -> None:
        if not interfaces and host.startswith("127."):
            interfaces = [host]  # a loopback address means nothing elsewhere: say it on loopback only
        self.interfaces = interface_addresses(interfaces) if interfaces else []
        addresses = [host] if host not in ("0.0.0.0", "", "[::]") else (self.interfaces or _all_ipv4())
        self.info = ServiceInfo(SERVICE_TYPE, instance_name(node_id), port=port, properties=txt,
                                parsed_addresses=addresses, server=f"{instance_name(node_id).split('.')[0]}.local.")
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=self.interfaces or _default_interfaces(), ip_version=IPVersion.V4Only)
        # cooperating_responders: every node names itself uniquely, so the
        # long probe for conflicts is not needed (0.45 s instead of 1.6 s).
        # The call returns once the service is queued; the task it returns
        # finishes when the announcements have gone out.
        await (await self._zeroconf.async_register_service(self.info, cooperating_responders=True))
        logger.info("advertised %s at %s:%d", self.info.name, ",".join(self.info.parsed_addresses()), self.info.port)

    async def close(self) -> None:
        if self._zeroconf is None:
            return
        try:
            await (await self._zeroconf.async_unregister_service(self.info))  # the goodbye is sent
        finally:
            await self._zeroconf.async_close()
            self._zeroconf = None


def _all_ipv4() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")] or ["127.0.0.1"]


def _default_interfaces():
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All
