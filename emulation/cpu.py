"""A CPU quota for a set of processes: make this machine as slow as a board.

Uses cgroup v2 `cpu.max` where the unified hierarchy has the `cpu`
controller, else cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (these
machines mount only v1 `cpu`; see DESIGN.md, "Facts measured"). A quota of
0.5 CPU lets the group run 50 ms of CPU time per 100 ms period, summed over
all its threads: a process with 2 busy threads then gets 25 ms each.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from emulation.teardown import Teardown

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CPU_ROOT = CGROUP_ROOT / "cpu"
# A short CFS period: with the kernel's default 100 ms, a 10 ms inference
# under a 0.25-CPU quota still runs at full speed (it fits in the period's
# 25 ms budget) and only every few requests stall, which emulates bursts, not
# a slower board. At 10 ms the budget is spent within one inference, so it is
# slowed throughout, as on a board with less compute.
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel rejects quotas below 1 ms
RMDIR_ATTEMPTS = 50  # rmdir can see EBUSY briefly while exiting tasks leave
RMDIR_PAUSE_S = 0.02

_counter = itertools.count()


def _hierarchy() -> tuple[str, Path] | None:
    """("v2" | "v1", directory under which to create groups), or None."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return "v2", CGROUP_ROOT
    if (V1_CPU_ROOT / "cpu.cfs_quota_us").exists():
        return "v1", V1_CPU_ROOT
    return None


def available() -> str | None:
    """None when a CPU quota group can be created here, else the reason."""
    found = _hierarchy()
    if found is None:
        return "no cgroup cpu controller: neither v2 cpu.max nor v1 /sys/fs/cgroup/cpu/cpu.cfs_quota_us"
    _, parent = found
    probe = parent / f"tandem-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup under {parent}: {exc}"
    try:
        probe.rmdir()
    except OSError as exc:
        return f"cannot remove probe cgroup {probe}: {exc}"
    return None


class CpuQuota(Teardown):
    """A cgroup with a CPU quota; a context manager that removes it on exit.

    `cpus` is in CPUs (0.5 = half a core); None means unlimited.
    """

    def __init__(self, cpus: float | None = None, *, name: str | None = None) -> None:
        found = _hierarchy()
        if found is None:
            raise RuntimeError(available() or "no cgroup cpu controller")
        self.version, parent = found
        self.path = parent / (name or f"tandem-{os.getpid()}-{next(_counter)}")
        self.cpus = cpus
        self._created = False

    def _create(self) -> None:
        self.path.mkdir()
        self._created = True
        self.set(self.cpus)

    def set(self, cpus: float | None) -> None:
        """Change the quota live; None removes the limit."""
        if cpus is not None and not cpus > 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        # The quota may not go below MIN_QUOTA_US: small shares get a longer period.
        period = PERIOD_US if cpus is None else max(PERIOD_US, math.ceil(MIN_QUOTA_US / cpus))
        quota = None if cpus is None else max(MIN_QUOTA_US, round(cpus * period))
        if self.version == "v2":
            (self.path / "cpu.max").write_text(f"{'max' if quota is None else quota} {period}\n")
        else:
            # Period first: a quota is validated against the current period.
            (self.path / "cpu.cfs_period_us").write_text(f"{period}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{-1 if quota is None else quota}\n")
        self.cpus = cpus

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv that joins this group before exec'ing `argv`, so no work runs unthrottled.

        Wrap outside a namespace: `quota.wrap(testbed.wrap("edge", cmd))`, or
        `testbed.popen("edge", cmd, cpu_quota=quota)`. Not the other way round:
        `ip netns exec` remounts /sys, hiding the cgroup files from the command.
        """
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def close(self, *, raise_errors: bool = True) -> None:
        """Move members back to the parent group, then remove the group."""
        if not self._created:
            return
        parent_procs = self.path.parent / "cgroup.procs"
        error: OSError | None = None
        for _ in range(RMDIR_ATTEMPTS):
            try:
                for pid in self.pids():
                    try:
                        parent_procs.write_text(f"{pid}\n")
                    except ProcessLookupError:
                        pass  # exited meanwhile
                self.path.rmdir()
                self._created = False
                return
            except FileNotFoundError:
                self._created = False
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    error = exc
                    break
                error = exc
                time.sleep(RMDIR_PAUSE_S)  # bounded retry: tasks still leaving the group
        logger.warning("cgroup %s not removed: %s", self.path, error)
        if raise_errors and error is not None:
            raise error
