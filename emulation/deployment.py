"""A cloud node and an edge agent on an emulated testbed, for tests and benchmarks.

The node listens in the cloud namespace, the agent in the edge namespace
(under a CPU quota when given) on a unix socket, which the app in the root
namespace can reach. Where the host has two CPUs or more, the device and the
node each get one of their own (``taskset``), one onnxruntime thread each:
otherwise the node's kernels and the device's share cores, and the node's
times depend on what the device happens to be doing, which no real
deployment has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from devices.profiles import DEVICES, measure_host
from edge_agent import sdk
from emulation.cpu import CpuQuota
from emulation.netns import Testbed
from runtimes import launch


def cpus_like(board: str) -> float:
    """CPUs of this host that compute like ``board``: the board's whole-CPU HPL
    GFLOPS (sbc-reviews, DESIGN.md) over one host core's GFLOPS (at least 0.05).

    The per-core figure is timed in CPU time and cached per host
    (``devices.profiles.cached_core_speed``), so the quota for a board is the
    same in every run, however busy the machine was when it was taken."""
    host = measure_host()
    return max(DEVICES[board].cpu_gflops / host.per_core_gflops_fp64, 0.05)


EDGE_CPU = 0   # the device, its agent and (in benchmarks) the app
CLOUD_CPU = 1


def pinning_available() -> bool:
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(argv: list[str], cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if pinning_available() else argv


class Deployment:
    def __init__(self, bed: Testbed, models: Path, quota: CpuQuota | None, *agent_args: str, timeout_s: float = 120,
                 node_args: tuple[str, ...] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-emu-")
        one_core = ["--threads", "1"] if pinning_available() else []
        self.node = launch.Daemon(
            "cloud_node.main", ["--listen", f"{bed.address('cloud')}:0", "--models", str(models), *one_core,
                             *launch.lab_defaults(node_args, announce="--advertise"), *node_args],
            wrap=lambda argv: pinned(bed.wrap("cloud", argv), CLOUD_CPU), check_health=False,
        ).wait_ready()

        def wrap(argv: list[str]) -> list[str]:
            inner = pinned(bed.wrap("edge", argv), EDGE_CPU)
            return quota.wrap(inner) if quota else inner

        # Inside `ip netns exec` /sys hides the quota from the agent, so say it.
        throttled = ["--threads", "1", "--ort-spinning", "off"] if quota else one_core
        self.agent = launch.Daemon(
            "edge_agent.main",
            ["--listen", f"unix:{self._tmp.name}/agent.sock", "--models", str(models), "--cloud", self.node.address,
             "--refresh-s", "0.5", *throttled, *launch.lab_defaults(agent_args, announce="--discovery"), *agent_args],
            wrap=wrap,
        ).wait_ready()
        self.client = sdk.EdgeClient(self.agent.address, timeout=timeout_s)

    def close(self) -> None:
        self.client.close()
        self.agent.stop()
        self.node.stop()
        self._tmp.cleanup()
