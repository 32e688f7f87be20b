"""Profiles of the boards Tandem plans for, each figure with its source.

Figures are data, not decisions: the partitioner reads them through
``partitioner.costmodel.Power``.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Radio:
    """Uplink radio power P_tx = alpha * throughput + beta (Huang et al., MobiSys'12)."""

    name: str
    alpha_w_per_mbps: float
    beta_w: float


# Huang et al., "A Close Examination of Performance and Power Characteristics
# of 4G LTE Networks", MobiSys'12: LTE alpha 438 mW/Mbps, beta 1288 mW;
# Wi-Fi alpha 283 mW/Mbps, beta 132.86 mW.
RADIOS: dict[str, Radio] = {
    "lte": Radio("lte", alpha_w_per_mbps=0.438, beta_w=1.288),
    "wifi": Radio("wifi", alpha_w_per_mbps=0.283, beta_w=0.133),
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    idle_w: float
    active_w: float
    cpu_gflops: float | None       # HPL, whole CPU
    mem_bandwidth_gbs: float | None
    memory_bytes: int | None
    radio: Radio
    source: str


GIB = 1024**3

DEVICES: dict[str, DeviceProfile] = {
    # sbc-reviews (geerlingguy/sbc-reviews) Raspberry Pi 4 Model B: idle 1.6 W,
    # load 5.0 W, HPL 11.8 GFLOPS; memory bandwidth 2.7 GB/s (tinymembench there).
    "pi4": DeviceProfile(
        "pi4", "Raspberry Pi 4 Model B (4 GB)", idle_w=1.6, active_w=5.0,
        cpu_gflops=11.8, mem_bandwidth_gbs=2.7, memory_bytes=4 * GIB,
        radio=RADIOS["wifi"], source="sbc-reviews Raspberry Pi 4 (idle/load W, HPL)",
    ),
    # sbc-reviews Raspberry Pi 5: idle 2.8 W, load 9.7 W, HPL 37.9 GFLOPS, 4.8 GB/s.
    "pi5": DeviceProfile(
        "pi5", "Raspberry Pi 5 (8 GB)", idle_w=2.8, active_w=9.7,
        cpu_gflops=37.9, mem_bandwidth_gbs=4.8, memory_bytes=8 * GIB,
        radio=RADIOS["wifi"], source="sbc-reviews Raspberry Pi 5 (idle/load W, HPL)",
    ),
}


def host_profile() -> DeviceProfile:
    """This machine. No power sensor is readable on the VMs we run on (see
    DESIGN.md's measured facts), so power is modelled with the Raspberry Pi 5
    figures until a sensor or a better profile says otherwise."""
    pi5 = DEVICES["pi5"]
    return DeviceProfile(
        "host", "this host (power modelled as a Raspberry Pi 5)",
        idle_w=pi5.idle_w, active_w=pi5.active_w, cpu_gflops=None, mem_bandwidth_gbs=None,
        memory_bytes=psutil.virtual_memory().total, radio=RADIOS["wifi"],
        source=f"memory from psutil; power: {pi5.source}",
    )


def get_device(name: str) -> DeviceProfile:
    if name == "host":
        return host_profile()
    try:
        return DEVICES[name]
    except KeyError:
        known = ", ".join(["host", *DEVICES])
        raise ValueError(f"unknown device {name!r}; known devices: {known}") from None
