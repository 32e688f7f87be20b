"""Two network namespaces joined by a veth pair, rate-shaped in the kernel.

The edge namespace holds the edge agent, the cloud namespace the cloud node.
The veth pair is created directly inside the two namespaces (never in the root
namespace), so deleting the namespaces removes it too. Rate is shaped with
`tbf` on each end's egress: the edge's veth shapes the uplink (edge -> cloud),
the cloud's veth the downlink. This kernel has no `netem`; delay and faults
come from `emulation.relay`.

tbf parameters for a rate of R bytes/s (R = mbps * 1e6 / 8):

    burst = max(2 * FRAME, ceil(R * 4 ms))
    limit = burst + max(16 * FRAME, ceil(R * 50 ms))

with FRAME = 1514 bytes (1500 MTU + Ethernet header). `burst` must hold at
least one whole frame or tbf can never send it: at 0.25 Mbit/s 4 ms of tokens
is only 125 bytes, so the 2-frame floor applies. At 100 Mbit/s 4 ms is 50 kB,
enough that timer and scheduling jitter in a VM (one jiffy is 4 ms at HZ=250)
does not starve the link below its rate. `limit` is the queue behind the
bucket: 50 ms at the rate (at least 16 frames), so TCP keeps the link busy
without building a long standing queue that would add latency of its own.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from emulation.teardown import Teardown

if TYPE_CHECKING:
    from emulation.cpu import CpuQuota

logger = logging.getLogger(__name__)

Side = Literal["edge", "cloud"]

FRAME_BYTES = 1514  # 1500-byte MTU + 14-byte Ethernet header
BURST_SECONDS = 0.004  # tokens for 4 ms at the rate (one jiffy at HZ=250)
QUEUE_SECONDS = 0.050  # queue of 50 ms at the rate behind the bucket
COMMAND_TIMEOUT_S = 10.0  # an `ip`/`tc` call that takes longer is broken

_SUBNET = ipaddress.ip_network("10.213.0.0/16")  # private, unlikely to clash; 16384 /30 blocks
_counter = itertools.count()


class CommandError(RuntimeError):
    """An `ip` or `tc` command failed; the message carries its stderr."""


def _check(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def tbf_params(mbps: float) -> tuple[int, int, int]:
    """(rate bit/s, burst bytes, limit bytes) for a tbf shaping to `mbps` (see module doc)."""
    if not mbps > 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {mbps}")
    rate_bytes = mbps * 1e6 / 8
    burst = max(2 * FRAME_BYTES, math.ceil(rate_bytes * BURST_SECONDS))
    limit = burst + max(16 * FRAME_BYTES, math.ceil(rate_bytes * QUEUE_SECONDS))
    return round(mbps * 1e6), burst, limit


@functools.cache
def available() -> str | None:
    """None when namespaces, veth and tbf are usable here, else the reason."""
    if os.geteuid() != 0:
        return "network emulation needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) not found on PATH"
    probe = f"tdm-probe-{os.getpid()}"
    try:
        _check(["ip", "netns", "add", probe])
    except (CommandError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` fails: {exc}"
    try:
        _check(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        rate, burst, limit = tbf_params(1.0)
        _check(["tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf",
                "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)])
    except (CommandError, OSError, subprocess.TimeoutExpired) as exc:
        return f"veth or tbf unusable: {exc}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return None


class Testbed(Teardown):
    """Edge and cloud namespaces joined by a shaped veth pair; removed on exit.

    `uplink_mbps` / `downlink_mbps` of None leave that direction unshaped.
    `name` prefixes the namespace names (`<name>-edge`, `<name>-cloud`);
    by default it is unique per process and testbed.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, uplink_mbps: float | None = None, downlink_mbps: float | None = None, name: str | None = None) -> None:
        n = next(_counter)
        self.name = name or f"tdm-{os.getpid()}-{n}"
        self.edge_ns = f"{self.name}-edge"
        self.cloud_ns = f"{self.name}-cloud"
        self.edge_dev = "tdm-edge"  # interface names live inside each namespace: no clash
        self.cloud_dev = "tdm-cloud"
        block = (os.getpid() * 64 + n) % (_SUBNET.num_addresses // 4)
        base = _SUBNET.network_address + 4 * block
        self.edge_addr = str(base + 1)
        self.cloud_addr = str(base + 2)
        self.prefixlen = 30
        self.uplink_mbps = uplink_mbps
        self.downlink_mbps = downlink_mbps
        self._created: list[str] = []  # namespaces created, in order
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle ---------------------------------------------------------

    def _create(self) -> None:
        for ns in (self.edge_ns, self.cloud_ns):
            _check(["ip", "netns", "add", ns])
            self._created.append(ns)
        _check(["ip", "-n", self.edge_ns, "link", "add", self.edge_dev, "type", "veth",
                "peer", "name", self.cloud_dev, "netns", self.cloud_ns])
        for ns, dev, addr in ((self.edge_ns, self.edge_dev, self.edge_addr), (self.cloud_ns, self.cloud_dev, self.cloud_addr)):
            _check(["ip", "-n", ns, "addr", "add", f"{addr}/{self.prefixlen}", "dev", dev])
            _check(["ip", "-n", ns, "link", "set", "lo", "up"])
            _check(["ip", "-n", ns, "link", "set", dev, "up"])
        self.set_rate(uplink_mbps=self.uplink_mbps, downlink_mbps=self.downlink_mbps)
        logger.info("testbed %s up: edge %s (%s) <-> cloud %s (%s), up %s / down %s Mbit/s",
                    self.name, self.edge_ns, self.edge_addr, self.cloud_ns, self.cloud_addr,
                    self.uplink_mbps, self.downlink_mbps)

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop processes started here, delete the namespaces (the veth goes with them)."""
        errors: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
        self._procs.clear()
        for ns in reversed(self._created):
            try:
                _check(["ip", "netns", "delete", ns])
            except (CommandError, OSError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                logger.warning("testbed teardown: %s", exc)
        self._created.clear()
        if errors and raise_errors:
            raise CommandError("testbed teardown incomplete: " + "; ".join(errors))

    # -- shaping -----------------------------------------------------------

    def set_rate(self, *, uplink_mbps: float | None = None, downlink_mbps: float | None = None) -> None:
        """Reshape both directions live; None removes shaping from that direction."""
        self._shape(self.edge_ns, self.edge_dev, uplink_mbps)
        self._shape(self.cloud_ns, self.cloud_dev, downlink_mbps)
        self.uplink_mbps, self.downlink_mbps = uplink_mbps, downlink_mbps

    def set_link(self, up: bool, *, silent: bool = True) -> None:
        """Cut the link or restore it. ``silent``: the cloud's end goes down,
        so the edge's interface loses its carrier but keeps its route; every
        packet either way is dropped without a word, and open TCP connections
        retransmit into nothing, as on a radio link that lost its signal. Not
        silent: the edge's own interface goes down and its route with it, so
        sends fail at once with "network is unreachable", as when a board's
        modem detaches."""
        ns, dev = (self.cloud_ns, self.cloud_dev) if silent else (self.edge_ns, self.edge_dev)
        _check(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"])

    def _shape(self, ns: str, dev: str, mbps: float | None) -> None:
        if mbps is None:
            # Deleting fails harmlessly when no root qdisc was set.
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=COMMAND_TIMEOUT_S)
            return
        rate, burst, limit = tbf_params(mbps)
        _check(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)])

    # -- running commands --------------------------------------------------

    def namespace(self, side: Side) -> str:
        if side == "edge":
            return self.edge_ns
        if side == "cloud":
            return self.cloud_ns
        raise ValueError(f"side must be 'edge' or 'cloud', got {side!r}")

    def address(self, side: Side) -> str:
        return self.edge_addr if self.namespace(side) == self.edge_ns else self.cloud_addr

    def wrap(self, side: Side, argv: Sequence[str]) -> list[str]:
        """argv that runs `argv` inside the side's namespace."""
        return ["ip", "netns", "exec", self.namespace(side), *argv]

    def popen(self, side: Side, argv: Sequence[str], *, cpu_quota: CpuQuota | None = None, **kwargs: Any) -> subprocess.Popen:
        """Start a process in the namespace (under `cpu_quota` if given); terminated on exit if still running."""
        proc = subprocess.Popen(self._argv(side, argv, cpu_quota), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, side: Side, argv: Sequence[str], *, cpu_quota: CpuQuota | None = None, timeout: float = 60.0,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command in the namespace to completion (check=True, output captured as text)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self._argv(side, argv, cpu_quota), check=True, timeout=timeout, **kwargs)

    def _argv(self, side: Side, argv: Sequence[str], cpu_quota: CpuQuota | None) -> list[str]:
        # The cgroup is joined *before* `ip netns exec`: that remounts /sys in a
        # new mount namespace, where the cgroup files are no longer visible.
        inner = self.wrap(side, argv)
        return inner if cpu_quota is None else cpu_quota.wrap(inner)
