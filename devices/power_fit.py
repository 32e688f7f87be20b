"""Board power figures fitted from a power sensor, for the energy model.

The profile's idle and active watts are datasheet and review figures for a
typical board; the board in hand, with its own peripherals, supply and
clocks, differs. Where a sensor exists (RAPL, INA3221 rails, the Pi 5's
PMIC) the agent pairs each power sample with how busy its own compute was
over the same window, and fits ``P = idle + busy * (active - idle)``, the
same line the profile's model uses, by least squares with old samples fading.

Idle needs samples with the device at rest; active needs samples spread over
busy fractions (a fit on one point is a guess). What the samples cannot
support keeps the profile's figure, and the fit says which figures are
measured. Pure: samples in, figures out.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight kept by the existing sums when a sample arrives: the last ~50
# samples dominate, so a board that warms up or gains a peripheral is followed.
FORGET = 0.98
MIN_SAMPLES = 5
IDLE_BUSY = 0.05        # busy fraction below which a window counts as rest
MIN_BUSY_SPREAD = 0.05  # variance of busy fractions below which no slope is fitted


@dataclass(frozen=True)
class PowerFigures:
    idle_w: float
    active_w: float
    source: str   # what the figures come from, in words


@dataclass(frozen=True)
class PowerFit:
    """Exponentially weighted sums for a least-squares line and the rest mean."""

    n: float = 0.0
    sum_u: float = 0.0
    sum_p: float = 0.0
    sum_uu: float = 0.0
    sum_up: float = 0.0
    rest_n: float = 0.0
    rest_p: float = 0.0
    samples: int = 0
    sensor: str = ""

    def observed(self, busy: float, watts: float, sensor: str) -> PowerFit:
        """After one window in which the device's compute was busy ``busy`` (0..1)
        of the time and the sensor read ``watts`` on average."""
        if not 0.0 <= busy <= 1.0:
            raise ValueError(f"busy is a fraction within 0..1, got {busy}")
        if watts < 0:
            raise ValueError(f"power cannot be negative, got {watts} W")
        rest = busy < IDLE_BUSY
        return PowerFit(
            n=self.n * FORGET + 1, sum_u=self.sum_u * FORGET + busy, sum_p=self.sum_p * FORGET + watts,
            sum_uu=self.sum_uu * FORGET + busy * busy, sum_up=self.sum_up * FORGET + busy * watts,
            rest_n=self.rest_n * FORGET + rest, rest_p=self.rest_p * FORGET + (watts if rest else 0.0),
            samples=self.samples + 1, sensor=sensor,
        )

    def figures(self, profile_idle_w: float, profile_active_w: float, profile_name: str) -> PowerFigures:
        """Idle and active watts: fitted where the samples support it, else the profile's."""
        if self.samples < MIN_SAMPLES:
            return PowerFigures(profile_idle_w, profile_active_w, f"{profile_name} profile (no power sensor samples yet)"
                                if self.sensor else f"{profile_name} profile (no power sensor)")
        mean_u = self.sum_u / self.n
        mean_p = self.sum_p / self.n
        variance = self.sum_uu / self.n - mean_u * mean_u
        if variance >= MIN_BUSY_SPREAD**2:
            slope = (self.sum_up / self.n - mean_u * mean_p) / variance
            idle = mean_p - slope * mean_u
            if idle > 0 and slope >= 0:
                return PowerFigures(idle, idle + slope, f"fitted to {self.samples} samples of {self.sensor}")
        if self.rest_n >= 1:
            idle = self.rest_p / self.rest_n
            # the profile's active-minus-idle step, on top of the measured rest
            return PowerFigures(idle, idle + max(profile_active_w - profile_idle_w, 0.0),
                                f"idle from {self.samples} samples of {self.sensor}; active = idle + the "
                                f"{profile_name} profile's step (too little spread in load to fit it)")
        return PowerFigures(profile_idle_w, profile_active_w,
                            f"{profile_name} profile ({self.sensor} samples never saw the device at rest)")
