"""The CPU this process may use: its cgroup and quota.

A container or systemd slice, or Tandem's own emulation, can give the process
less CPU than the machine has; profiles and onnxruntime's threading must
follow that, not the core count.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_quota() -> float | None:
    """CPUs this process may use under a cgroup quota (v2 cpu.max or v1
    cfs_quota_us), None when unlimited: a profile measured under one quota
    says nothing about another, so the quota is part of the cache key."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            limit = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.max"
            if limit.exists():
                quota, period = limit.read_text().split()
                return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
            for root in (base, Path("/sys/fs/cgroup/cpu") / path.lstrip("/")):
                quota_file = root / "cpu.cfs_quota_us"
                if quota_file.exists():
                    quota = int(quota_file.read_text())
                    return None if quota < 0 else quota / int((root / "cpu.cfs_period_us").read_text())
    return None


def cpu_cgroup() -> str:
    """This process's cpu cgroup path ("/" at the root). /proc stays readable
    where /sys is not (inside ``ip netns exec``), so a profile taken inside a
    quota group is never mistaken for one taken outside it."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(",") or controllers == "":
                if path != "/":
                    return path
    except OSError:
        pass
    return "/"


def usable_cpus() -> float:
    """CPUs this process can keep busy at once: its affinity mask (``taskset``),
    capped by its cgroup quota. Whole-CPU speed is per-core speed times this,
    since a pinned or throttled process gets no more of the machine."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform
        cpus = float(os.cpu_count() or 1)
    quota = cpu_quota()
    return min(cpus, quota) if quota else cpus
