"""The agent's power sensor loop: board watts for the energy model.

Every window it reads the board's sensor (``devices.telemetry.read_power``)
and how busy the agent kept the CPU meanwhile (its process's CPU time over
the window and the cores: onnxruntime and llama.cpp threads alike), and
refits the idle and active watts the planner charges (``devices.power_fit``).
A board without a sensor is said so once at start-up and keeps its
profile's figures; a sensor that fails later is retried next window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from devices.power_fit import PowerFigures, PowerFit
from devices.profiles import DeviceProfile
from devices.telemetry import read_power
from partitioner.costmodel import Power

logger = logging.getLogger(__name__)


class PowerMonitor:
    def __init__(self, device: DeviceProfile, *, root: Path, window_s: float,
                 apply: Callable[[PowerFigures], None]) -> None:
        self.device = device
        self.root = root
        self.window_s = window_s
        self._apply = apply
        self._process = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        self.fit = PowerFit()

    def _cpu_s(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def figures(self) -> PowerFigures:
        return self.fit.figures(self.device.idle_w, self.device.active_w, self.device.name)

    async def run(self) -> None:
        first = True
        while True:
            cpu_before, start = self._cpu_s(), time.monotonic()
            try:
                reading = await asyncio.to_thread(read_power, self.root, interval_s=self.window_s)
            except Exception:  # noqa: BLE001 -- a sensor driver error must not end the loop
                logger.exception("reading the power sensor failed")
                reading = None
            if reading is None or not reading.available:
                if first:
                    reason = reading.reason if reading else "the first reading failed"
                    logger.info("no power sensor (%s): energy uses the %s profile's watts", reason, self.device.name)
                    return
                await asyncio.sleep(self.window_s)  # a sensor that read before: try again next window
                continue
            first = False
            remaining = self.window_s - (time.monotonic() - start)
            if remaining > 0:  # rails and the PMIC read at once; RAPL already took the window
                await asyncio.sleep(remaining)
            elapsed_s = time.monotonic() - start
            busy = min(max((self._cpu_s() - cpu_before) / (elapsed_s * self._cores), 0.0), 1.0)
            self.fit = self.fit.observed(busy, reading.value, reading.source)
            self._apply(self.figures())


def with_figures(power: Power, figures: PowerFigures) -> Power:
    return replace(power, idle_w=figures.idle_w, active_w=figures.active_w)
