"""The agent's power sensor loop: board watts for the energy model.

Every window it reads the board's sensor (``devices.telemetry.read_power``)
and how busy the agent's own compute was meanwhile, and refits the idle and
active watts the planner charges (``devices.power_fit``). A board without a
sensor is said so once at start-up and keeps its profile's figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from devices.power_fit import PowerFigures, PowerFit
from devices.profiles import DeviceProfile
from devices.telemetry import read_power
from partitioner.costmodel import Power

logger = logging.getLogger(__name__)


class PowerMonitor:
    def __init__(self, device: DeviceProfile, *, root: Path, window_s: float, busy_ms: Callable[[], float],
                 apply: Callable[[PowerFigures], None]) -> None:
        self.device = device
        self.root = root
        self.window_s = window_s
        self._busy_ms = busy_ms
        self._apply = apply
        self.fit = PowerFit()

    def figures(self) -> PowerFigures:
        return self.fit.figures(self.device.idle_w, self.device.active_w, self.device.name)

    async def run(self) -> None:
        first = True
        while True:
            busy_before, start = self._busy_ms(), time.monotonic()
            reading = await asyncio.to_thread(read_power, self.root, interval_s=self.window_s)
            if not reading.available:
                if first:
                    logger.info("no power sensor (%s): energy uses the %s profile's watts", reading.reason, self.device.name)
                    return
                continue  # a sensor that read before: a hiccup, try again next window
            first = False
            remaining = self.window_s - (time.monotonic() - start)
            if remaining > 0:  # rails and the PMIC read at once; RAPL already took the window
                await asyncio.sleep(remaining)
            elapsed_ms = (time.monotonic() - start) * 1e3
            busy = min(max((self._busy_ms() - busy_before) / elapsed_ms, 0.0), 1.0)
            self.fit = self.fit.observed(busy, reading.value, reading.source)
            self._apply(self.figures())


def with_figures(power: Power, figures: PowerFigures) -> Power:
    return replace(power, idle_w=figures.idle_w, active_w=figures.active_w)
