"""The agent plans with the watts its board's power sensor shows (a sensor
tree written under a temporary --sysfs-root), and says when it has none."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devices.profiles import DEVICES
from edge_agent import sdk
from runtimes import launch


def test_measured_rest_power_replaces_the_profiles_idle_watts(tmp_path: Path, model_dir: Path, cloud: launch.Daemon) -> None:
    hwmon = tmp_path / "sys/class/hwmon/hwmon0"
    hwmon.mkdir(parents=True)
    (hwmon / "name").write_text("board_pmbus\n")
    (hwmon / "power1_input").write_text("3000000\n")  # 3 W, microwatts
    pi4 = DEVICES["pi4"]
    with launch.edge_agent(model_dir, [cloud.address], "--device", "pi4", "--sysfs-root", str(tmp_path),
                           "--power-window-s", "0.05") as agent, sdk.EdgeClient(agent.address) as client:
        # bounded: a window at rest is needed (busy < 5 %), and while the agent
        # still measures in the background at start its first windows are not
        for _ in range(400):
            explanation = client.explain("mobilenet")
            if "hwmon" in explanation.power["source"] and "never saw the device at rest" not in explanation.power["source"]:
                break
            time.sleep(0.05)
        power = explanation.power
        assert "hwmon" in power["source"], power
        assert power["idle_w"] == pytest.approx(3.0)
        if power["source"].startswith("fitted"):
            # The load varied enough to fit (other processes kept the cores busy in
            # some windows): a sensor that reads 3 W whatever the load fits a zero slope.
            assert power["active_w"] == pytest.approx(3.0)
        else:
            # no spread in load yet: active keeps the profile's step above the measured rest
            assert "the pi4 profile's step" in power["source"], power
            assert power["active_w"] == pytest.approx(3.0 + pi4.active_w - pi4.idle_w)
        # LOCAL's energy is active watts x device time (partitioner/costmodel.py)
        local = explanation.candidate("local")
        assert local.energy_j == pytest.approx(power["active_w"] * local.predicted["edge_ms"] / 1e3)


def test_without_a_sensor_the_profile_is_used_and_said(tmp_path: Path, model_dir: Path, cloud: launch.Daemon) -> None:
    pi4 = DEVICES["pi4"]
    with launch.edge_agent(model_dir, [cloud.address], "--device", "pi4", "--sysfs-root", str(tmp_path),
                           "--power-window-s", "0.05") as agent, sdk.EdgeClient(agent.address) as client:
        power = client.explain("mobilenet").power
        assert (power["idle_w"], power["active_w"]) == (pi4.idle_w, pi4.active_w)
        assert "no power sensor" in power["source"]
        log = agent.log()
    assert "no power sensor" in log
