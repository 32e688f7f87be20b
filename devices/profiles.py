"""Profiles of the boards Tandem plans for, each figure with its source.

Figures are data, not decisions: the partitioner reads them through
``partitioner.planning.power_of`` (power) and its roofline scaling (compute,
memory bandwidth).

``cpu_gflops`` is the one compute figure every profile carries, because
Tandem runs onnxruntime on the CPU. It is double-precision dense-matmul
throughput of the whole CPU: HPL on the Raspberry Pis (measured), derived
for the Jetsons (no published HPL run; see the derivation below) and a numpy
float64 matmul on the host (measured at start-up). fp32 peak is twice fp64
on both NEON and AVX2, so ratios between profiles hold for fp32 inference
too; mixing an fp32 host figure with fp64 board figures would overstate the
host by about 2x. GPU figures are separate fields and nothing plans on them.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import psutil

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


@dataclass(frozen=True)
class HostMeasurement:
    gflops_fp64: float         # best numpy float64 matmul, all BLAS threads, GFLOPS
    gflops_fp32: float         # best numpy float32 matmul, all BLAS threads, GFLOPS
    mem_bandwidth_gbs: float   # best numpy copy of a large array, bytes copied per second, GB/s
    seconds: float             # wall time the measurement took, s


def _best_rate(work: float, run, deadline: float, *, min_runs: int = 3) -> float:
    """Best work-per-second over repeated runs until ``deadline`` (first run is a warm-up)."""
    run()
    best = 0.0
    runs = 0
    while runs < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            best = max(best, work / elapsed)
        runs += 1
    return best


@functools.lru_cache(maxsize=None)
def measure_host(*, seconds: float = 0.5) -> HostMeasurement:
    """Measure this machine's matmul throughput and copy bandwidth, once per process.

    Best-of-several rather than mean: the question is what the machine can do,
    and other processes only ever make a run slower. A copy counts the bytes
    copied once (as memcpy benchmarks such as tinymembench do), not read+write.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    begin = time.perf_counter()
    share = seconds / 3
    rng = np.random.default_rng(0)
    n = 512  # ~0.27 GFLOP per product: long enough to time, short enough for slow boards
    a64 = rng.standard_normal((n, n))
    b64 = rng.standard_normal((n, n))
    a32, b32 = a64.astype(np.float32), b64.astype(np.float32)
    flops = 2.0 * n**3
    gflops_fp64 = _best_rate(flops, lambda: a64 @ b64, time.perf_counter() + share) / 1e9
    gflops_fp32 = _best_rate(flops, lambda: a32 @ b32, time.perf_counter() + share) / 1e9
    # 64 MiB: far beyond any last-level cache on the machines we target.
    src = np.ones(64 * 2**20 // 8)
    dst = np.empty_like(src)
    bandwidth = _best_rate(float(src.nbytes), lambda: np.copyto(dst, src), time.perf_counter() + share) / 1e9
    took = time.perf_counter() - begin
    result = HostMeasurement(gflops_fp64=gflops_fp64, gflops_fp32=gflops_fp32, mem_bandwidth_gbs=bandwidth, seconds=took)
    logger.info("host measured in %.2f s: %.1f GFLOPS fp64, %.1f GFLOPS fp32, %.1f GB/s copy",
                took, gflops_fp64, gflops_fp32, bandwidth)
    return result


def host_profile(*, seconds: float = 0.5) -> DeviceProfile:
    """This machine, measured at start-up (cached per process).

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
        source="numpy float64 matmul and array copy at start-up, memory from psutil, cores from os.cpu_count; "
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
