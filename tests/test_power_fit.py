"""Board watts fitted from power sensor samples (hand-computed)."""

from __future__ import annotations

import pytest

from devices.power_fit import MIN_SAMPLES, PowerFit


def fed(samples: list[tuple[float, float]]) -> PowerFit:
    fit = PowerFit()
    for busy, watts in samples:
        fit = fit.observed(busy, watts, "RAPL")
    return fit


def test_without_samples_the_profile_speaks_and_says_so() -> None:
    figures = PowerFit().figures(2.7, 6.4, "pi4")
    assert (figures.idle_w, figures.active_w) == (2.7, 6.4)
    assert "no power sensor" in figures.source


def test_a_line_through_samples_spread_over_load_gives_idle_and_active() -> None:
    # P = 3 + busy * 4: idle 3 W, active 7 W, whatever the weights of old samples
    figures = fed([(u, 3.0 + 4.0 * u) for u in (0.0, 0.5, 1.0, 0.25, 0.75, 0.1)]).figures(2.7, 6.4, "pi4")
    assert figures.idle_w == pytest.approx(3.0)
    assert figures.active_w == pytest.approx(7.0)
    assert "fitted to 6 samples of RAPL" == figures.source


def test_a_device_always_at_rest_measures_idle_and_keeps_the_profiles_step() -> None:
    # rest at 3.2 W; the pi4 profile's step active - idle = 6.4 - 2.7 = 3.7 W
    figures = fed([(0.0, 3.2)] * MIN_SAMPLES).figures(2.7, 6.4, "pi4")
    assert figures.idle_w == pytest.approx(3.2)
    assert figures.active_w == pytest.approx(3.2 + 3.7)
    assert "too little spread" in figures.source


def test_too_few_samples_or_never_at_rest_keeps_the_profile() -> None:
    assert fed([(0.0, 3.2)] * (MIN_SAMPLES - 1)).figures(2.7, 6.4, "pi4").idle_w == 2.7
    always_busy = fed([(0.5, 5.0)] * MIN_SAMPLES).figures(2.7, 6.4, "pi4")
    assert (always_busy.idle_w, always_busy.active_w) == (2.7, 6.4)
    assert "never saw the device at rest" in always_busy.source


def test_a_fit_that_makes_no_physical_sense_is_not_used() -> None:
    # more load, less power (another program was busy while we rested): no negative slope
    figures = fed([(0.0, 6.0), (1.0, 3.0)] * 3).figures(2.7, 6.4, "pi4")
    assert figures.active_w >= figures.idle_w
    assert figures.idle_w == pytest.approx(6.0)  # the rest samples' mean


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        PowerFit().observed(1.5, 3.0, "RAPL")
    with pytest.raises(ValueError, match="negative"):
        PowerFit().observed(0.5, -1.0, "RAPL")
