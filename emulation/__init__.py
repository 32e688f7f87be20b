"""Emulated slow links and slow devices for tests and benchmarks.

- `netns.Testbed`: two network namespaces (edge, cloud) joined by a veth pair,
  with the uplink and downlink rate shaped in the kernel by `tc tbf`.
- `relay.Relay`: a user-space TCP relay that adds one-way delay and faults
  (stall, reset, drop, refuse), since this kernel has no `netem`.
- `cpu.CpuQuota`: a cgroup CPU quota (v2 `cpu.max`, else v1 CFS quota) that
  makes this machine as slow as a given board.

Each has an `available()` that returns None when usable, else the reason, so
tests can skip with it.
"""

from emulation.cpu import CpuQuota
from emulation.netns import Testbed
from emulation.relay import Relay

__all__ = ["CpuQuota", "Relay", "Testbed", "exit_on_sigterm"]


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so every testbed and quota a program
    holds is torn down by its ``with`` block instead of left behind."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
