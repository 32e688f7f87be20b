"""Live readings of the device: CPU, memory, temperature, power.

A reader that cannot measure says so: ``Reading.value`` is None and
``Reading.reason`` says why ("no RAPL powercap on this machine"), never a
made-up number. A modelled figure (``modelled_power``) says it is a model in
its ``source``. Every sysfs path is read under an injectable ``root``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from devices.profiles import DeviceProfile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    value: float | None        # None: unavailable (see reason)
    unit: str                  # "%", "MHz", "bytes", "C", "W"
    source: str                # where the value came from, or where we looked
    reason: str | None = None  # why value is None

    @property
    def available(self) -> bool:
        return self.value is not None


def _unavailable(unit: str, source: str, reason: str) -> Reading:
    return Reading(None, unit, source, reason)


@dataclass(frozen=True)
class CpuReading:
    utilisation: Reading  # all CPUs, %
    frequency: Reading    # current clock, MHz


@dataclass(frozen=True)
class MemoryReading:
    total: Reading       # bytes
    available: Reading   # bytes a new process could use without swapping
    used_percent: Reading


def read_cpu(*, interval_s: float = 0.1) -> CpuReading:
    """CPU utilisation over ``interval_s`` (psutil; blocks that long) and clock."""
    utilisation = Reading(psutil.cpu_percent(interval=interval_s), "%", f"psutil.cpu_percent over {interval_s} s")
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        freq = None
    if freq is None or not freq.current:
        frequency = _unavailable("MHz", "psutil.cpu_freq", "CPU frequency not exposed on this machine")
    else:
        frequency = Reading(float(freq.current), "MHz", "psutil.cpu_freq")
    return CpuReading(utilisation, frequency)


def read_memory() -> MemoryReading:
    vm = psutil.virtual_memory()
    return MemoryReading(
        total=Reading(float(vm.total), "bytes", "psutil.virtual_memory"),
        available=Reading(float(vm.available), "bytes", "psutil.virtual_memory"),
        used_percent=Reading(float(vm.percent), "%", "psutil.virtual_memory"),
    )


# -- temperature --------------------------------------------------------------

def read_temperature(root: str | Path = "/") -> Reading:
    """Hottest sensor, deg C: sysfs thermal zones, else psutil's hwmon sensors."""
    root = Path(root)
    zones: list[tuple[float, str]] = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        try:
            millideg = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        kind = _read_text(zone / "type") or zone.name
        zones.append((millideg / 1000.0, f"{zone.name} ({kind})"))
    if zones:
        value, where = max(zones)
        return Reading(value, "C", f"/sys/class/thermal/{where}, hottest of {len(zones)}")
    # psutil reads the real /sys; only consult it when reading the real machine.
    if root == Path("/") and hasattr(psutil, "sensors_temperatures"):
        sensors = [(t.current, f"{chip}/{t.label or 'temp'}")
                   for chip, temps in psutil.sensors_temperatures().items() for t in temps if t.current]
        if sensors:
            value, where = max(sensors)
            return Reading(float(value), "C", f"psutil.sensors_temperatures {where}, hottest of {len(sensors)}")
    return _unavailable("C", "/sys/class/thermal, psutil.sensors_temperatures",
                        "no thermal sensors on this machine (no thermal zones, no hwmon temperatures)")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# -- power: RAPL ----------------------------------------------------------------

def rapl_delta_uj(first_uj: int, second_uj: int, max_range_uj: int | None) -> int:
    """Energy between two samples of a RAPL counter, across one wrap."""
    delta = second_uj - first_uj
    if delta < 0:
        if not max_range_uj:
            raise ValueError("RAPL counter went backwards and max_energy_range_uj is unknown")
        delta += max_range_uj
    return delta


def _rapl_zones(root: Path) -> list[Path]:
    """Top-level RAPL zones to sum. Sub-zones (``intel-rapl:0:0``, cores, uncore,
    dram) are inside their package, so summing them would count twice. A
    ``psys`` zone (whole platform) already includes the packages: use it alone."""
    tops = [p for p in sorted((root / "sys/class/powercap").glob("intel-rapl:*")) if p.name.count(":") == 1]
    psys = [p for p in tops if _read_text(p / "name") == "psys"]
    return psys or tops


def read_rapl_power(root: str | Path = "/", *, interval_s: float = 0.2,
                    clock: Callable[[], float] = time.monotonic, wait: Callable[[float], None] = time.sleep) -> Reading:
    """Average power over ``interval_s`` from RAPL energy counters (x86)."""
    zones = _rapl_zones(Path(root))
    where = "/sys/class/powercap/intel-rapl:*/energy_uj"
    if not zones:
        return _unavailable("W", where, "no RAPL powercap on this machine")

    def sample() -> dict[Path, int] | None:
        values = {z: _read_int(z / "energy_uj") for z in zones}
        return None if any(v is None for v in values.values()) else values  # type: ignore[return-value]

    t0, first = clock(), sample()
    if first is None:
        # Since Linux 5.10 energy_uj is readable by root only (CVE-2020-8694).
        return _unavailable("W", where, "RAPL energy_uj not readable (root only since Linux 5.10)")
    wait(interval_s)
    t1, second = clock(), sample()
    if second is None or t1 <= t0:
        return _unavailable("W", where, "RAPL counters vanished or no time passed between samples")
    try:
        energy_uj = sum(rapl_delta_uj(first[z], second[z], _read_int(z / "max_energy_range_uj")) for z in zones)
    except ValueError as exc:
        return _unavailable("W", where, str(exc))
    names = ", ".join(_read_text(z / "name") or z.name for z in zones)
    return Reading(energy_uj / 1e6 / (t1 - t0), "W", f"RAPL powercap ({names}) over {t1 - t0:.3f} s")


# -- power: Jetson INA3221 and hwmon ---------------------------------------------

def _prefer_input_rail(rails: list[tuple[str, float]]) -> tuple[float, str] | None:
    """Total board power: the input rail (VDD_IN, POM_5V_IN) when one is named,
    since the others are parts of it; else the sum of all rails."""
    if not rails:
        return None
    for label, watts in rails:
        if label.upper().endswith("_IN") or label.upper() == "VDD_IN":
            return watts, f"rail {label}"
    return sum(w for _, w in rails), "sum of rails " + ", ".join(label for label, _ in rails)


def read_rail_power(root: str | Path = "/") -> Reading:
    """Board power from power-monitor rails: the Jetson Nano's INA3221 IIO
    channels (``in_power<N>_input``, mW, named by ``rail_name_<N>``), hwmon
    INA3221 channels on Orin (``in<N>_input`` mV x ``curr<N>_input`` mA, named
    by ``in<N>_label``), or any hwmon ``power<N>_input`` (uW)."""
    root = Path(root)
    iio = sorted(root.glob("sys/bus/i2c/drivers/ina3221*/*/iio:device*/in_power*_input"))
    rails: list[tuple[str, float]] = []
    for path in iio:
        channel = path.name.removeprefix("in_power").removesuffix("_input")
        milliwatts = _read_int(path)
        if milliwatts is not None:
            rails.append((_read_text(path.parent / f"rail_name_{channel}") or path.name, milliwatts / 1e3))
    if (found := _prefer_input_rail(rails)) is not None:
        return Reading(found[0], "W", f"INA3221 (iio) {found[1]}")

    hwmons = sorted({*root.glob("sys/class/hwmon/hwmon*"), *root.glob("sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")})
    for hwmon in hwmons:
        rails = []
        for path in sorted(hwmon.glob("power*_input")):
            microwatts = _read_int(path)
            if microwatts is not None:
                label = _read_text(hwmon / path.name.replace("_input", "_label")) or f"{hwmon.name}/{path.name}"
                rails.append((label, microwatts / 1e6))
        if not rails and (_read_text(hwmon / "name") or "").startswith("ina3221"):
            for volts_path in sorted(hwmon.glob("in*_input")):
                channel = volts_path.name.removeprefix("in").removesuffix("_input")
                millivolts, milliamps = _read_int(volts_path), _read_int(hwmon / f"curr{channel}_input")
                label = _read_text(hwmon / f"in{channel}_label")
                if millivolts is not None and milliamps is not None and label and "sum" not in label.lower():
                    rails.append((label, millivolts * milliamps / 1e6))
        if (found := _prefer_input_rail(rails)) is not None:
            return Reading(found[0], "W", f"hwmon {hwmon.name} {found[1]}")
    return _unavailable("W", "INA3221 iio/hwmon, /sys/class/hwmon/*/power*_input",
                        "no hwmon or INA3221 power rails on this machine")


# -- power: Raspberry Pi 5 PMIC ---------------------------------------------------

_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=([0-9.]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> tuple[float, int]:
    """Sum of V x A over the rails ``vcgencmd pmic_read_adc`` reports (Pi 5).
    Returns (watts, rails). The PMIC's rails leave out USB/5 V peripherals and
    conversion losses, so this is below the wall figure."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            rail, kind, value = match.groups()
            (amps if kind == "A" else volts)[rail] = float(value)
    rails = amps.keys() & volts.keys()
    return sum(amps[r] * volts[r] for r in rails), len(rails)


def read_pmic_power(*, vcgencmd: str | None = None, search_path: str | None = None, timeout_s: float = 2.0) -> Reading:
    """Raspberry Pi 5 PMIC rails via ``vcgencmd pmic_read_adc`` when it is on PATH."""
    where = "vcgencmd pmic_read_adc"
    command = vcgencmd or shutil.which("vcgencmd", path=search_path)
    if command is None:
        return _unavailable("W", where, "vcgencmd not on PATH (no Raspberry Pi PMIC to read)")
    try:
        done = subprocess.run([command, "pmic_read_adc"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _unavailable("W", where, f"vcgencmd failed: {exc}")
    watts, rails = parse_pmic_adc(done.stdout)
    if done.returncode != 0 or rails == 0:
        return _unavailable("W", where, f"PMIC not readable (exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()[:80]})")
    return Reading(watts, "W", f"Pi PMIC, sum of {rails} rails (excludes 5 V peripherals)")


def read_power(root: str | Path = "/", *, interval_s: float = 0.2, search_path: str | None = None) -> Reading:
    """Measured power from the first sensor this machine has: RAPL, then power
    rails (Jetson INA3221 / hwmon), then the Pi 5 PMIC. Unavailable (with every
    reason) when none is there; the caller may then use ``modelled_power``."""
    readings = [
        read_rapl_power(root, interval_s=interval_s),
        read_rail_power(root),
        read_pmic_power(search_path=search_path),
    ]
    for reading in readings:
        if reading.available:
            return reading
    return _unavailable("W", "; ".join(r.source for r in readings), "; ".join(r.reason or "" for r in readings))


def modelled_power(profile: DeviceProfile, utilisation: float) -> Reading:
    """Board power as the profile's model: idle + utilisation x (active - idle).
    ``utilisation`` is a fraction 0..1. A model, not a measurement."""
    if not 0.0 <= utilisation <= 1.0:
        raise ValueError(f"utilisation is a fraction within 0..1, got {utilisation}")
    watts = profile.idle_w + utilisation * (profile.active_w - profile.idle_w)
    return Reading(watts, "W", f"model: idle + utilisation x (active - idle) from the {profile.name} profile ({profile.source})")
