"""Device profiles, board detection and telemetry readers, on fake sysfs trees
and on this machine (which has no power or thermal sensors)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import host_stability
from devices import profiles, telemetry
from devices.detect import detect_board
from devices.limits import usable_cpus
from devices.profiles import (
    DEVICES,
    RADIOS,
    CoreSpeed,
    DeviceProfile,
    cached_core_speed,
    core_speed_file,
    get_device,
    host_fingerprint,
    host_profile,
    measure_core_speed,
    measure_host,
)

BOARDS = ["pi4", "pi5", "jetson-nano", "jetson-orin-nano"]


def write(root: Path, relative: str, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


# -- profiles -------------------------------------------------------------------

@pytest.mark.parametrize("name", BOARDS)
def test_board_profile_is_complete_with_positive_figures(name: str) -> None:
    device = get_device(name)
    assert device.name == name
    for field in ("cpu_gflops", "mem_bandwidth_gbs", "memory_bytes", "cores", "idle_w", "active_w"):
        assert getattr(device, field) > 0, field
    assert device.active_w > device.idle_w
    assert device.description and device.source
    assert device.radio in RADIOS.values()
    for mode in device.power_modes:
        assert mode.name and mode.budget_w > 0


def test_jetsons_carry_power_modes_and_gpu_figures_apart_from_cpu() -> None:
    nano, orin = DEVICES["jetson-nano"], DEVICES["jetson-orin-nano"]
    assert {m.budget_w for m in nano.power_modes} == {5.0, 10.0}
    assert {m.budget_w for m in orin.power_modes} == {7.0, 15.0, 25.0}
    assert nano.gpu_fp16_gflops == 472.0 and orin.gpu_int8_tops == 67.0
    # The derived CPU figures sit between the measured Pis, as the cores suggest.
    assert DEVICES["pi4"].cpu_gflops - 1 < nano.cpu_gflops < DEVICES["pi5"].cpu_gflops
    assert orin.cpu_gflops > DEVICES["pi5"].cpu_gflops


def test_get_device_error_names_the_known_devices() -> None:
    with pytest.raises(ValueError) as err:
        get_device("pi3")
    message = str(err.value)
    assert "pi3" in message
    for name in ["host", *BOARDS]:
        assert name in message


def test_power_of_reads_what_it_needs() -> None:
    from partitioner.planning import power_of

    power = power_of(DEVICES["pi4"])
    assert (power.active_w, power.idle_w) == (5.0, 1.6)


def test_host_measurement_is_positive_and_cached() -> None:
    measured = measure_host(seconds=0.2)
    assert measured.gflops_fp64 > 0 and measured.gflops_fp32 > 0 and measured.mem_bandwidth_gbs > 0
    assert measure_host(seconds=0.2) is measured
    # Whole-CPU figures are one core's times the CPUs this process may use.
    assert measured.cpus == usable_cpus() > 0
    assert measured.gflops_fp64 == pytest.approx(measured.per_core_gflops_fp64 * measured.cpus)
    assert measured.core.gflops_fp64.samples >= profiles.MIN_SAMPLES
    host = host_profile(seconds=0.2)
    assert host.name == "host"
    assert host.cpu_gflops == measured.gflops_fp64 and host.mem_bandwidth_gbs == measured.mem_bandwidth_gbs
    assert host.cores == os.cpu_count() and host.memory_bytes > 0
    assert (host.idle_w, host.active_w) == (DEVICES["pi5"].idle_w, DEVICES["pi5"].active_w)
    with pytest.raises(ValueError):
        measure_host(seconds=0)


# -- host speed under load, and its cache --------------------------------------

# Within this of the idle reading with every core kept busy. The figure is CPU
# time of one BLAS thread, so competing processes stretch a sample's wall time,
# not its CPU time; what is left is cache and memory-bus interference and a
# VM's clock moving with its neighbours' load, which moved the best sample by
# at most 12 % on the 2-vCPU test VM (45.2-51.1 GFLOPS fp64 over runs idle and
# busy; bench.host_stability: busy/idle medians 1.00-1.02 in three runs). The
# wall-clock figure this replaced read 0.37, 0.45 and 1.03 of idle in the same
# runs: it depends on what else runs, which is the defect this guards against.
LOAD_TOLERANCE = 0.25
# The copy rate shares what spinners on the other vCPUs disturb most (memory bus,
# and on a VM possibly an SMT sibling's load/store units): one full-suite run read
# it 27 % low busy (8.5 against 11.7 GB/s) while the matmul figures held.
COPY_LOAD_TOLERANCE = 0.4

def _figures(speed: CoreSpeed) -> dict[str, float]:
    return {"fp64": speed.gflops_fp64.best, "fp32": speed.gflops_fp32.best, "copy": speed.copy_gbs.best}


def test_core_speed_with_every_core_busy_reads_as_idle() -> None:
    # One busy-looping process per CPU, each known to spin before the measurement starts.
    with host_stability.all_cores_busy() as spinners:
        busy = measure_core_speed(seconds=0.6)
        assert all(spinner.poll() is None for spinner in spinners), "a spinner stopped during the measurement"
    idle = measure_core_speed(seconds=0.6)
    assert busy.clock == idle.clock == "thread"  # one BLAS thread, timed in its own CPU time
    for name, idle_value in _figures(idle).items():
        tolerance = COPY_LOAD_TOLERANCE if name == "copy" else LOAD_TOLERANCE
        assert _figures(busy)[name] == pytest.approx(idle_value, rel=tolerance), name


def test_core_speed_is_cached_on_disk_and_reused_by_other_processes(tmp_path: Path) -> None:
    first, cached = cached_core_speed(seconds=0.2, cache_dir=tmp_path)
    assert not cached and core_speed_file(tmp_path).exists()
    assert cached_core_speed(seconds=0.2, cache_dir=tmp_path) == (first, True)
    # Another process reads the same figure from the file, whatever load it starts under.
    script = ("import json; from devices.profiles import measure_host; h = measure_host(); "
              "print(json.dumps([h.per_core_gflops_fp64, h.cached]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "TANDEM_CACHE_DIR": str(tmp_path)})
    assert json.loads(out.stdout) == [first.gflops_fp64.best, True]
    # Asked to, it measures again and the new figure is the one kept.
    remeasured, cached = cached_core_speed(seconds=0.2, cache_dir=tmp_path, refresh=True)
    assert not cached and cached_core_speed(seconds=0.2, cache_dir=tmp_path) == (remeasured, True)


def test_processes_starting_together_measure_once_and_share_the_figure(tmp_path: Path) -> None:
    script = ("import json; from devices.profiles import measure_host; h = measure_host(seconds=0.3); "
              "print(json.dumps([h.per_core_gflops_fp64, h.cached]))")
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path)}
    children = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(2)]
    results = [json.loads(child.communicate(timeout=120)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert results[0][0] == results[1][0]
    assert sorted(cached for _, cached in results) == [False, True]  # one measured, the other waited and read


def test_a_pinned_process_counts_one_cpu(tmp_path: Path) -> None:
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        pytest.skip("needs taskset and two CPUs")
    cached_core_speed(seconds=0.2, cache_dir=tmp_path)
    script = ("import json; from devices.profiles import measure_host; h = measure_host(); "
              "print(json.dumps([h.cpus, h.gflops_fp64, h.per_core_gflops_fp64]))")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "TANDEM_CACHE_DIR": str(tmp_path)})
    cpus, whole, per_core = json.loads(out.stdout)
    assert cpus == 1.0 and whole == per_core


def test_a_corrupt_cache_is_re_measured_and_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = core_speed_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for garbage in ("{not json", json.dumps({"format": profiles.CORE_SPEED_FORMAT,
                                             "fingerprint": host_fingerprint(), "gflops_fp64": {"best": -1}})):
        path.write_text(garbage)
        with caplog.at_level(logging.WARNING, logger="devices.profiles"):
            speed, cached = cached_core_speed(seconds=0.2, cache_dir=tmp_path)
        assert not cached and "corrupt" in caplog.text and str(path) in caplog.text
        caplog.clear()
        assert cached_core_speed(seconds=0.2, cache_dir=tmp_path) == (speed, True)


def test_a_stale_cache_is_re_measured(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    speed, _ = cached_core_speed(seconds=0.2, cache_dir=tmp_path)
    path = core_speed_file(tmp_path)
    data = json.loads(path.read_text())
    data["gflops_fp64"]["best"] = data["gflops_fp64"]["median"] = 1e6  # a figure this host never had
    for stale in ({**data, "format": profiles.CORE_SPEED_FORMAT - 1},
                  {**data, "fingerprint": {**data["fingerprint"], "numpy": "0.0"}}):
        path.write_text(json.dumps(stale))
        with caplog.at_level(logging.INFO, logger="devices.profiles"):
            fresh, cached = cached_core_speed(seconds=0.2, cache_dir=tmp_path)
        assert not cached and "stale" in caplog.text
        assert fresh.gflops_fp64.best < 1e6
        caplog.clear()


def test_fp32_ceiling_is_twice_the_fp64_figure_as_measured_here() -> None:
    assert DEVICES["pi4"].cpu_gflops_fp32 == pytest.approx(2 * 11.8)
    core = measure_host().core
    # The host's own ratio backs the factor (2.09 on the test VM); a wide band, it is a hardware fact.
    assert 1.5 < core.gflops_fp32.best / core.gflops_fp64.best < 2.8


def test_cpus_like_gives_a_board_its_gflops_from_the_cached_core_figure() -> None:
    from emulation.deployment import cpus_like

    per_core = measure_host().per_core_gflops_fp64
    for board in ("pi4", "pi5"):
        assert cpus_like(board) * per_core == pytest.approx(DEVICES[board].cpu_gflops)


def test_profiles_are_frozen_data() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEVICES["pi4"].idle_w = 0.0  # type: ignore[misc]
    assert isinstance(profiles.DEVICES["pi5"], DeviceProfile)


# -- detection ------------------------------------------------------------------

@pytest.mark.parametrize(("files", "expected"), [
    ({"proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\0"}, "pi4"),
    ({"proc/device-tree/model": b"Raspberry Pi 5 Model B Rev 1.0\0"}, "pi5"),
    ({"proc/device-tree/model": b"Raspberry Pi Compute Module 4 Rev 1.1\0"}, "pi4"),
    ({"proc/device-tree/model": b"NVIDIA Jetson Nano Developer Kit\0"}, "jetson-nano"),
    ({"proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\0"}, "jetson-orin-nano"),
    # No model: the compatible list decides.
    ({"proc/device-tree/compatible": b"nvidia,p3450-0000\0nvidia,jetson-nano\0nvidia,tegra210\0"}, "jetson-nano"),
    ({"proc/device-tree/compatible": b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0"},
     "jetson-orin-nano"),
    ({"proc/device-tree/compatible": b"raspberrypi,5-model-b\0brcm,bcm2712\0"}, "pi5"),
    # Only the L4T release file.
    ({"etc/nv_tegra_release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64\n"},
     "jetson-nano"),
    ({"etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64\n"},
     "jetson-orin-nano"),
    # An unknown device tree (some other ARM board) and an empty tree.
    ({"proc/device-tree/model": b"Pine64 RockPro64\0", "proc/device-tree/compatible": b"rockchip,rk3399\0"}, "host"),
    ({}, "host"),
])
def test_detect_board_on_fake_trees(tmp_path: Path, files: dict[str, str | bytes], expected: str) -> None:
    for relative, content in files.items():
        write(tmp_path, relative, content)
    assert detect_board(tmp_path) == expected
    get_device(expected)  # every answer is a profile name


# -- power: RAPL ------------------------------------------------------------------

def fake_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> None:
    """zones: directory name -> (name, energy_uj, max_energy_range_uj)."""
    for zone, (name, energy, max_range) in zones.items():
        write(root, f"sys/class/powercap/{zone}/name", name + "\n")
        write(root, f"sys/class/powercap/{zone}/energy_uj", f"{energy}\n")
        write(root, f"sys/class/powercap/{zone}/max_energy_range_uj", f"{max_range}\n")


def sampler(root: Path, second: dict[str, int], elapsed_s: float):
    """A clock and a wait that, instead of sleeping, advance the fake counters."""
    times = iter([100.0, 100.0 + elapsed_s])

    def wait(_: float) -> None:
        for zone, energy in second.items():
            write(root, f"sys/class/powercap/{zone}/energy_uj", f"{energy}\n")

    return (lambda: next(times)), wait


def test_rapl_power_from_two_samples(tmp_path: Path) -> None:
    big = 262_143_328_850
    fake_rapl(tmp_path, {
        "intel-rapl:0": ("package-0", 1_000_000, big),
        "intel-rapl:0:0": ("core", 500_000, big),      # inside package-0: must not be added
        "intel-rapl:1": ("package-1", 2_000_000, big),
    })
    clock, wait = sampler(tmp_path, {"intel-rapl:0": 6_000_000, "intel-rapl:0:0": 9_000_000, "intel-rapl:1": 4_000_000}, 0.5)
    reading = telemetry.read_rapl_power(tmp_path, interval_s=0.5, clock=clock, wait=wait)
    # (5 J + 2 J) / 0.5 s
    assert reading.value == pytest.approx(14.0)
    assert reading.unit == "W" and "RAPL" in reading.source and reading.reason is None


def test_rapl_counter_wrap_uses_max_energy_range(tmp_path: Path) -> None:
    max_range = 10_000_000
    fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 9_000_000, max_range)})
    clock, wait = sampler(tmp_path, {"intel-rapl:0": 1_000_000}, 0.25)
    reading = telemetry.read_rapl_power(tmp_path, interval_s=0.25, clock=clock, wait=wait)
    # 9 J -> wraps at 10 J -> 1 J: 2 J over 0.25 s
    assert reading.value == pytest.approx(8.0)


def test_rapl_psys_zone_is_used_alone(tmp_path: Path) -> None:
    fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**9), "intel-rapl:1": ("psys", 0, 10**9)})
    clock, wait = sampler(tmp_path, {"intel-rapl:0": 3_000_000, "intel-rapl:1": 5_000_000}, 1.0)
    assert telemetry.read_rapl_power(tmp_path, clock=clock, wait=wait).value == pytest.approx(5.0)


def test_rapl_unreadable_counter_is_unavailable(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/powercap/intel-rapl:0/name", "package-0\n")  # no energy_uj: as when not root
    reading = telemetry.read_rapl_power(tmp_path, wait=lambda _: None)
    assert reading.value is None and "not readable" in reading.reason


# -- power: rails and PMIC ----------------------------------------------------------

def test_jetson_nano_ina3221_iio_rails_prefer_the_input_rail(tmp_path: Path) -> None:
    dev = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for channel, (name, mw) in enumerate([("POM_5V_IN", 3120), ("POM_5V_GPU", 200), ("POM_5V_CPU", 1100)]):
        write(tmp_path, f"{dev}/rail_name_{channel}", name + "\n")
        write(tmp_path, f"{dev}/in_power{channel}_input", f"{mw}\n")
    reading = telemetry.read_rail_power(tmp_path)
    assert reading.value == pytest.approx(3.12) and "POM_5V_IN" in reading.source


def test_orin_ina3221_hwmon_volts_times_amps(tmp_path: Path) -> None:
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    write(tmp_path, f"{hwmon}/name", "ina3221\n")
    for channel, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5000, 300), ("VDD_SOC", 5000, 200)], 1):
        write(tmp_path, f"{hwmon}/in{channel}_label", label + "\n")
        write(tmp_path, f"{hwmon}/in{channel}_input", f"{mv}\n")
        write(tmp_path, f"{hwmon}/curr{channel}_input", f"{ma}\n")
    reading = telemetry.read_rail_power(tmp_path)
    assert reading.value == pytest.approx(5.0) and "VDD_IN" in reading.source


def test_generic_hwmon_power_input_in_microwatts(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/hwmon/hwmon0/name", "some_pmbus\n")
    write(tmp_path, "sys/class/hwmon/hwmon0/power1_input", "2500000\n")
    assert telemetry.read_rail_power(tmp_path).value == pytest.approx(2.5)


def test_pi5_pmic_output_is_summed_over_rails() -> None:
    text = """\
     3V7_WL_SW_A current(0)=0.10000000A
       3V3_SYS_A current(1)=0.20000000A
     3V7_WL_SW_V volt(8)=3.70000000V
       3V3_SYS_V volt(9)=3.30000000V
         EXT5V_V volt(24)=5.10000000V
"""
    watts, rails = telemetry.parse_pmic_adc(text)
    assert rails == 2 and watts == pytest.approx(0.1 * 3.7 + 0.2 * 3.3)


def test_missing_sensors_say_unavailable_on_a_fake_empty_tree(tmp_path: Path) -> None:
    power = telemetry.read_power(tmp_path, interval_s=0.01, search_path="")
    assert power.value is None
    for cause in ("RAPL", "INA3221", "vcgencmd"):
        assert cause in power.reason
    temperature = telemetry.read_temperature(tmp_path)
    assert temperature.value is None and "thermal" in temperature.reason


def test_fake_thermal_zone_gives_hottest_in_celsius(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "48500\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "41000\n")
    reading = telemetry.read_temperature(tmp_path)
    assert reading.value == pytest.approx(48.5) and "cpu-thermal" in reading.source


# -- this machine: no powercap, hwmon or thermal (DESIGN.md, measured facts) ------------

def _has_real_sensors() -> bool:
    return any(Path(p).exists() and any(Path(p).iterdir()) for p in ("/sys/class/powercap", "/sys/class/hwmon")) or \
        any(Path("/sys/class/thermal").glob("thermal_zone*"))


@pytest.mark.skipif(_has_real_sensors(), reason="this machine has power or thermal sensors; the VM this asserts about has none")
def test_real_readers_say_unavailable_here() -> None:
    power = telemetry.read_power(interval_s=0.01)
    assert power.value is None and "no RAPL powercap on this machine" in power.reason
    temperature = telemetry.read_temperature()
    assert temperature.value is None and temperature.reason


def test_real_cpu_and_memory_readings() -> None:
    cpu = telemetry.read_cpu(interval_s=0.05)
    assert 0.0 <= cpu.utilisation.value <= 100.0
    if cpu.frequency.value is None:
        assert cpu.frequency.reason
    else:
        assert cpu.frequency.value > 0
    memory = telemetry.read_memory()
    assert memory.total.value > 0 and 0 < memory.available.value <= memory.total.value


def test_modelled_power_is_labelled_as_a_model() -> None:
    pi4 = DEVICES["pi4"]
    assert telemetry.modelled_power(pi4, 0.0).value == pytest.approx(1.6)
    reading = telemetry.modelled_power(pi4, 0.5)
    assert reading.value == pytest.approx(1.6 + 0.5 * (5.0 - 1.6)) and reading.source.startswith("model:")
    with pytest.raises(ValueError):
        telemetry.modelled_power(pi4, 1.5)
