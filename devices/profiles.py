"""Profiles of the boards Tandem plans for, each figure with its source.

Figures are data, not decisions: the partitioner reads them through
``partitioner.planning.power_of`` (power) and its roofline scaling (compute,
memory bandwidth).

``cpu_gflops`` is the one compute figure every profile carries, because
Tandem runs onnxruntime on the CPU. It is double-precision dense-matmul
throughput of the whole CPU: HPL on the Raspberry Pis (measured), derived
for the Jetsons (no published HPL run; see the derivation below) and a numpy
float64 matmul on the host (one core timed in CPU time, so other load cannot
move it, times the CPUs the process may use; cached per host). fp32 peak is twice fp64
on both NEON and AVX2, so ratios between profiles hold for fp32 inference
too; mixing an fp32 host figure with fp64 board figures would overstate the
host by about 2x. GPU figures are separate fields and nothing plans on them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import threadpoolctl

from devices.limits import usable_cpus

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class Radio:
    """Uplink radio power P_tx = alpha * throughput + beta (Huang et al., MobiSys'12)."""

    name: str
    alpha_w_per_mbps: float  # extra transmit power per Mbit/s of uplink throughput, W
    beta_w: float            # transmit power at zero throughput (radio on), W


# Huang et al., "A Close Examination of Performance and Power Characteristics
# of 4G LTE Networks", MobiSys'12: LTE alpha 438 mW/Mbps, beta 1288 mW;
# Wi-Fi alpha 283 mW/Mbps, beta 132.86 mW.
RADIOS: dict[str, Radio] = {
    "lte": Radio("lte", alpha_w_per_mbps=0.438, beta_w=1.288),
    "wifi": Radio("wifi", alpha_w_per_mbps=0.283, beta_w=0.133),
}


@dataclass(frozen=True)
class PowerMode:
    """A selectable power budget (Jetson ``nvpmodel``); a cap, not a measurement."""

    name: str
    budget_w: float  # module power budget of the mode, W


# fp32 over fp64 dense throughput on the CPUs we plan for: a SIMD register holds twice
# as many fp32 lanes (NEON 4 vs 2 in 128 bits; AVX2 8 vs 4) at the same FMA rate. Measured
# on the 2-vCPU AMD EPYC test VM, one core: 95.5 vs 45.7 GFLOPS (measure_core_speed), 2.09.
FP32_PER_FP64 = 2.0


@dataclass(frozen=True)
class DeviceProfile:
    name: str                        # what ``--device`` and ``get_device`` accept
    description: str                 # the board, in words
    cpu_gflops: float                # fp64 dense-matmul throughput, whole CPU, GFLOPS (see module docstring)
    mem_bandwidth_gbs: float         # memory bandwidth, GB/s (measured copy on Pis and host; spec peak on Jetsons)
    memory_bytes: int                # RAM, bytes
    cores: int                       # CPU cores onnxruntime can use
    idle_w: float                    # board power when idle, W
    active_w: float                  # board power with the CPU busy, W
    radio: Radio                     # uplink radio power model
    power_modes: tuple[PowerMode, ...] = ()  # selectable budgets; () where the board has none
    gpu_fp16_gflops: float | None = None     # GPU fp16 peak, GFLOPS (not used: Tandem runs on the CPU)
    gpu_int8_tops: float | None = None       # GPU+DLA int8 peak, TOPS (not used: Tandem runs on the CPU)
    source: str = ""                 # where the figures come from, in one line

    @property
    def cpu_gflops_fp32(self) -> float:
        """The fp32 equivalent of ``cpu_gflops``: the compute ceiling of fp32 inference,
        which a roofline floor needs (ratios between profiles can use either)."""
        return self.cpu_gflops * FP32_PER_FP64


# Jetson CPU GFLOPS, derived (no HPL result is published for these boards):
#   HPL-equivalent = cores x clock x fp64 FLOPs/cycle x HPL efficiency.
# fp64 FLOPs/cycle per core: Cortex-A72 and Cortex-A57 4 (one 128-bit FMA per
# cycle = 2 lanes x 2 FLOPs; A72 is the A57's successor with the same FP width);
# Cortex-A76 and Cortex-A78AE 8 (two 128-bit FMA pipes).
# HPL efficiency 0.49 is what sbc-reviews measured on both Pis against that peak:
#   Pi 4: 11.8 / (4 x 1.5 GHz x 4) = 11.8 / 24.0 = 0.49
#   Pi 5: 37.9 / (4 x 2.4 GHz x 8) = 37.9 / 76.8 = 0.49
HPL_EFFICIENCY = 0.49

# Derived idle power for the Jetsons (no idle measurement in DESIGN.md): idle is
# about 0.3 of full load on both Pis (sbc-reviews: 1.6 / 5.0 = 0.32, 2.8 / 9.7 =
# 0.29), applied to the Jetson's power-mode budget. Replace with a reading of the
# board's INA3221 rails (``devices.telemetry.read_power``) once one is measured.
IDLE_FRACTION = 0.3

DEVICES: dict[str, DeviceProfile] = {
    # sbc-reviews (geerlingguy/sbc-reviews) Raspberry Pi 4 Model B: idle 1.6 W,
    # load 5.0 W (7.2 W under HPL), HPL 11.8 GFLOPS, memory bandwidth 2.7 GB/s
    # (tinymembench there). Cores: BCM2711, 4x Cortex-A72 @ 1.5 GHz.
    "pi4": DeviceProfile(
        "pi4", "Raspberry Pi 4 Model B (4 GB)",
        cpu_gflops=11.8, mem_bandwidth_gbs=2.7, memory_bytes=4 * GIB, cores=4,
        idle_w=1.6, active_w=5.0, radio=RADIOS["wifi"],
        source="sbc-reviews Raspberry Pi 4: idle/load W, HPL GFLOPS, memory bandwidth (measured)",
    ),
    # sbc-reviews Raspberry Pi 5: idle 2.8 W, load 9.7 W (13.8 W under HPL),
    # HPL 37.9 GFLOPS, 4.8 GB/s. Cores: BCM2712, 4x Cortex-A76 @ 2.4 GHz.
    "pi5": DeviceProfile(
        "pi5", "Raspberry Pi 5 (8 GB)",
        cpu_gflops=37.9, mem_bandwidth_gbs=4.8, memory_bytes=8 * GIB, cores=4,
        idle_w=2.8, active_w=9.7, radio=RADIOS["wifi"],
        source="sbc-reviews Raspberry Pi 5: idle/load W, HPL GFLOPS, memory bandwidth (measured)",
    ),
    # NVIDIA Jetson Nano (4 GB) module spec: 4x Cortex-A57 @ 1.43 GHz, 4 GB
    # LPDDR4 64-bit 25.6 GB/s (spec peak, not a measured copy like the Pis'),
    # 128-core Maxwell GPU 472 GFLOPS fp16, power modes 10 W (MAXN, default)
    # and 5 W (L4T power-management guide: 5 W mode = 2 cores @ 918 MHz).
    # cpu_gflops derived: 4 x 1.43 GHz x 4 fp64 FLOPs/cycle x 0.49 = 11.2.
    # active_w: the 10 W MAXN budget; idle_w derived: 0.3 x 10 W = 3.0.
    "jetson-nano": DeviceProfile(
        "jetson-nano", "NVIDIA Jetson Nano (4 GB), MAXN 10 W mode",
        cpu_gflops=round(4 * 1.43 * 4 * HPL_EFFICIENCY, 1), mem_bandwidth_gbs=25.6, memory_bytes=4 * GIB, cores=4,
        idle_w=round(IDLE_FRACTION * 10.0, 2), active_w=10.0, radio=RADIOS["wifi"],
        power_modes=(PowerMode("MAXN", 10.0), PowerMode("5W", 5.0)),
        gpu_fp16_gflops=472.0,
        source="NVIDIA Jetson Nano spec (cores, clock, memory, 25.6 GB/s peak, 472 GFLOPS fp16 GPU, 5/10 W modes); "
               "CPU GFLOPS and idle W derived (see devices/profiles.py), not measured",
    ),
    # NVIDIA Jetson Orin Nano Super Developer Kit (8 GB) spec: 6x Cortex-A78AE
    # @ 1.7 GHz in the 25 W MAXN SUPER mode, 8 GB LPDDR5 128-bit 102 GB/s (spec
    # peak), 67 TOPS int8 (sparse), power modes 7 / 15 / 25 W.
    # cpu_gflops derived: 6 x 1.7 GHz x 8 fp64 FLOPs/cycle x 0.49 = 40.0.
    # active_w: the 25 W budget; idle_w derived: 0.3 x 25 W = 7.5 (likely high).
    "jetson-orin-nano": DeviceProfile(
        "jetson-orin-nano", "NVIDIA Jetson Orin Nano Super (8 GB), 25 W MAXN SUPER mode",
        cpu_gflops=round(6 * 1.7 * 8 * HPL_EFFICIENCY, 1), mem_bandwidth_gbs=102.0, memory_bytes=8 * GIB, cores=6,
        idle_w=round(IDLE_FRACTION * 25.0, 2), active_w=25.0, radio=RADIOS["wifi"],
        power_modes=(PowerMode("MAXN_SUPER", 25.0), PowerMode("15W", 15.0), PowerMode("7W", 7.0)),
        gpu_int8_tops=67.0,
        source="NVIDIA Jetson Orin Nano Super spec (cores, clock, memory, 102 GB/s peak, 67 TOPS int8 sparse, 7/15/25 W modes); "
               "CPU GFLOPS and idle W derived (see devices/profiles.py), not measured",
    ),
}


CORE_SPEED_FORMAT = 1  # bump when the measurement changes meaning: older cache files are then re-measured
MATMUL_N = 512  # ~0.27 GFLOP per product: a few ms on one x86 core, long enough to time, short enough for slow boards
COPY_BYTES = 64 * 2**20  # far beyond any last-level cache on the machines we target
MIN_SAMPLES = 5  # per figure, whatever the budget: a best of fewer says little
WALL_CAP_FACTOR = 20.0  # give up sampling after this many times the CPU budget in wall time (a starved process)


@dataclass(frozen=True)
class Sampled:
    """Rates from repeated samples of one kernel: the best is the figure, the median shows the noise."""

    best: float     # highest rate of any sample, in the figure's unit
    median: float   # median rate of the samples, same unit
    samples: int    # how many samples were taken

    def __post_init__(self) -> None:
        if not (self.samples >= 1 and math.isfinite(self.best) and 0 < self.median <= self.best):
            raise ValueError(f"not a valid sample summary: best={self.best}, median={self.median}, samples={self.samples}")

    @property
    def spread(self) -> float:
        """How much slower the median sample ran than the best, as a fraction of the best."""
        return 1.0 - self.median / self.best


@dataclass(frozen=True)
class CoreSpeed:
    """One core of this host, timed in its own CPU time.

    CPU time only advances while the measuring thread runs, so other processes
    competing for the cores stretch the wall time of a sample, not its CPU time:
    load cannot move the figure (within cache and memory-bus interference, which
    the best of many short samples leaves out)."""

    gflops_fp64: Sampled  # numpy float64 matmul on one BLAS thread, GFLOP per CPU-second
    gflops_fp32: Sampled  # numpy float32 matmul on one BLAS thread, GFLOP per CPU-second
    copy_gbs: Sampled     # numpy copy of a large array, GB copied once per CPU-second (tinymembench counts so)
    seconds: float        # wall time the measurement took, s
    clock: str            # "thread" (one BLAS thread, its CPU time) or "process" (BLAS threads not controllable)


def _sample_rate(work: float, run: Callable[[], object], *, clock: Callable[[], float], cpu_budget_s: float) -> Sampled:
    """Rates of repeated runs until ``cpu_budget_s`` of CPU time is spent (first run is a warm-up)."""
    run()
    rates: list[float] = []
    spent = 0.0
    wall_deadline = time.perf_counter() + WALL_CAP_FACTOR * cpu_budget_s
    while len(rates) < MIN_SAMPLES or (spent < cpu_budget_s and time.perf_counter() < wall_deadline):
        start = clock()
        run()
        elapsed = clock() - start
        spent += elapsed
        if elapsed > 0:
            rates.append(work / elapsed)
    return Sampled(best=max(rates), median=statistics.median(rates), samples=len(rates))


def _blas_pools() -> list[dict]:
    """numpy's own BLAS: other libraries a process happens to have loaded (scipy
    ships a second OpenBLAS) must not change the host's fingerprint."""
    pools = [pool for pool in threadpoolctl.threadpool_info() if pool.get("user_api") == "blas"]
    numpy_dir = Path(np.__file__).parent.name  # "numpy": its wheels bundle BLAS under numpy.libs
    own = [pool for pool in pools if f"{numpy_dir}.libs" in pool.get("filepath", "") or
           f"/{numpy_dir}/" in pool.get("filepath", "")]
    return own or pools


def blas_name() -> str:
    """The BLAS numpy calls, with version and kernel set: part of what a core's speed depends on."""
    pools = _blas_pools()
    if not pools:
        return "unknown BLAS"
    return ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture') or ''}".strip() for p in pools)


def measure_core_speed(*, seconds: float = 0.5) -> CoreSpeed:
    """Measure one core of this machine, uncached: ``seconds`` of CPU time over three figures.

    BLAS is held to one thread (threadpoolctl) so the calling thread's CPU time
    covers the whole product; where no BLAS can be controlled, the process's CPU
    time is used instead (spinning helper threads then make the figure low, never
    high). Best-of rather than mean: the question is what a core can do, and
    interference only ever makes a sample slower.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    begin = time.perf_counter()
    share = seconds / 3
    rng = np.random.default_rng(0)
    a64 = rng.standard_normal((MATMUL_N, MATMUL_N))
    b64 = rng.standard_normal((MATMUL_N, MATMUL_N))
    a32, b32 = a64.astype(np.float32), b64.astype(np.float32)
    flops = 2.0 * MATMUL_N**3
    src = np.ones(COPY_BYTES // 8)
    dst = np.zeros_like(src)  # zeros, not empty: its pages are touched before the warm-up
    controllable = bool(_blas_pools())
    if not controllable:
        logger.warning("no BLAS threadpoolctl can limit (%s): timing the matmul in process CPU time", blas_name())
    clock = time.thread_time if controllable else time.process_time
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        fp64 = _sample_rate(flops / 1e9, lambda: a64 @ b64, clock=clock, cpu_budget_s=share)
        fp32 = _sample_rate(flops / 1e9, lambda: a32 @ b32, clock=clock, cpu_budget_s=share)
    copy = _sample_rate(src.nbytes / 1e9, lambda: np.copyto(dst, src), clock=time.thread_time, cpu_budget_s=share)
    took = time.perf_counter() - begin
    speed = CoreSpeed(fp64, fp32, copy, seconds=took, clock="thread" if controllable else "process")
    logger.info(
        "one core measured in %.2f s: %.1f GFLOPS fp64 (median %.1f, %d samples), %.1f GFLOPS fp32, %.1f GB/s copy",
        took, fp64.best, fp64.median, fp64.samples, fp32.best, copy.best,
    )
    return speed


def host_fingerprint() -> dict[str, str]:
    """What a core's measured speed depends on; a cached figure is reused only on an exact match.

    The CPU quota and affinity are not in it: CPU-time rates per core are the
    same inside and outside a quota, and the whole-CPU figure applies the
    process's own usable CPUs at read time (``measure_host``)."""
    return {
        "node": platform.node(),
        "cpu": _cpu_model(),
        "logical_cpus": str(os.cpu_count() or 1),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "blas": blas_name(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; Raspberry Pi kernels say "Model" (the board), others "Hardware".
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cache_root() -> Path:
    """Tandem's cache directory: ``TANDEM_CACHE_DIR``, default ~/.cache/tandem."""
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def core_speed_file(cache_dir: Path | None = None) -> Path:
    """Where this host's core speed is cached: one file per fingerprint."""
    digest = hashlib.sha256(json.dumps(host_fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    return (cache_dir or cache_root()) / f"core-speed-{digest}.json"


def _core_speed_to_json(speed: CoreSpeed, fingerprint: dict[str, str]) -> str:
    # "spread" is for whoever reads the file; it is derived from best and median, not read back.
    spread = {name: getattr(speed, name).spread for name in ("gflops_fp64", "gflops_fp32", "copy_gbs")}
    return json.dumps({"format": CORE_SPEED_FORMAT, "fingerprint": fingerprint, **dataclasses.asdict(speed),
                       "spread": spread}, indent=2)


def _core_speed_from_json(text: str, fingerprint: dict[str, str]) -> CoreSpeed | str:
    """The cached speed, or why it cannot be used (stale); raises ValueError/KeyError/TypeError if corrupt."""
    data = json.loads(text)
    if data.get("format") != CORE_SPEED_FORMAT:
        return f"format {data.get('format')!r}, this version writes {CORE_SPEED_FORMAT}"
    if data.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if data["fingerprint"].get(k) != fingerprint[k])
        return f"measured on a different host or software ({', '.join(changed) or 'fields'} changed)"
    return CoreSpeed(
        gflops_fp64=Sampled(**data["gflops_fp64"]), gflops_fp32=Sampled(**data["gflops_fp32"]),
        copy_gbs=Sampled(**data["copy_gbs"]), seconds=float(data["seconds"]), clock=str(data["clock"]),
    )


def cached_core_speed(*, seconds: float = 0.5, cache_dir: Path | None = None, refresh: bool = False) -> tuple[CoreSpeed, bool]:
    """This host's core speed from its cache file, measured and written if absent,
    stale or corrupt (or ``refresh``); True when it came from the file.

    One file per host fingerprint, so every process on the host plans with the
    same figure. Processes starting together take a lock: the first measures,
    the others wait and read what it wrote."""
    fingerprint = host_fingerprint()
    path = core_speed_file(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 -- held for the whole function
    except OSError as exc:
        logger.warning("cannot use the host speed cache in %s (%s): measuring without it", path.parent, exc)
        return measure_core_speed(seconds=seconds), False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and not refresh:
            try:
                cached = _core_speed_from_json(path.read_text(), fingerprint)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                logger.warning("host speed cache %s is corrupt (%s): re-measuring", path, exc)
            else:
                if isinstance(cached, CoreSpeed):
                    return cached, True
                logger.info("host speed cache %s is stale (%s): re-measuring", path, cached)
        speed = measure_core_speed(seconds=seconds)
        # Write then rename: a crash mid-write must not leave a corrupt cache.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(_core_speed_to_json(speed, fingerprint))
            tmp.replace(path)
        except OSError as exc:
            logger.warning("cannot write the host speed cache %s: %s", path, exc)
        return speed, False


@dataclass(frozen=True)
class HostMeasurement:
    gflops_fp64: float         # whole CPU: per-core float64 matmul x usable CPUs, GFLOPS
    gflops_fp32: float         # whole CPU: per-core float32 matmul x usable CPUs, GFLOPS
    mem_bandwidth_gbs: float   # one thread's copy bandwidth x min(1, usable CPUs), GB/s
    seconds: float             # wall time the core measurement took (when it was taken, if cached), s
    per_core_gflops_fp64: float  # one core, float64 matmul, GFLOP per CPU-second
    cpus: float                # usable CPUs (affinity, cgroup quota) the whole-CPU figures assume
    core: CoreSpeed            # the per-core samples behind the figures, with their spread
    cached: bool               # True when the core speed was read from the cache file, not measured here


@functools.lru_cache(maxsize=None)
def measure_host(*, seconds: float = 0.5, cache_dir: Path | None = None, refresh: bool = False) -> HostMeasurement:
    """This machine's compute and copy bandwidth as this process can use them, once per process.

    Per-core speed comes from ``cached_core_speed`` (CPU time, best of
    samples, cached per host fingerprint), so load on the machine moves
    neither this process's figure nor another's. Whole-CPU figures are that
    times the process's usable CPUs (``devices.limits.usable_cpus``): a
    process pinned to one core or held to a quota gets no more. One thread's
    copy already saturates what a single core can move, so bandwidth scales
    only below one CPU.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    core, cached = cached_core_speed(seconds=seconds, cache_dir=cache_dir, refresh=refresh)
    cpus = usable_cpus()
    result = HostMeasurement(
        gflops_fp64=core.gflops_fp64.best * cpus, gflops_fp32=core.gflops_fp32.best * cpus,
        mem_bandwidth_gbs=core.copy_gbs.best * min(1.0, cpus), seconds=core.seconds,
        per_core_gflops_fp64=core.gflops_fp64.best, cpus=cpus, core=core, cached=cached,
    )
    logger.info("host: %.1f GFLOPS fp64 (%.1f per core x %.2f CPUs, %s), %.1f GB/s copy",
                result.gflops_fp64, core.gflops_fp64.best, cpus, "cached" if cached else "measured",
                result.mem_bandwidth_gbs)
    return result


def host_profile(*, seconds: float = 0.5) -> DeviceProfile:
    """This machine, from its cached per-core measurement (``measure_host``).

    No power sensor is readable on the VMs we run on (DESIGN.md, measured
    facts), so power is modelled with the Raspberry Pi 5's figures until a
    sensor or a better profile says otherwise."""
    measured = measure_host(seconds=seconds)
    pi5 = DEVICES["pi5"]
    return DeviceProfile(
        "host", "this host (measured; power modelled as a Raspberry Pi 5)",
        cpu_gflops=measured.gflops_fp64, mem_bandwidth_gbs=measured.mem_bandwidth_gbs,
        memory_bytes=psutil.virtual_memory().total, cores=os.cpu_count() or 1,
        idle_w=pi5.idle_w, active_w=pi5.active_w, radio=RADIOS["wifi"],
        source="numpy float64 matmul and array copy on one core in CPU time (best of samples, cached per host) "
               "x usable CPUs, memory from psutil, cores from os.cpu_count; "
               f"power modelled as Raspberry Pi 5 ({pi5.source})",
    )


def known_devices() -> list[str]:
    return ["host", *DEVICES]


def get_device(name: str) -> DeviceProfile:
    if name == "host":
        return host_profile()
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(known_devices())}") from None
