"""The corrections completed requests make to the device's profile (hand-computed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from partitioner.calibration import EDGE_FACTOR_BOUNDS, SMOOTHING, Calibration
from partitioner.costmodel import StagePrediction, choose
from tests.test_costmodel import node, power, three_segments


@dataclass
class Measured:
    edge_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0


def predicted(edge_ms: float = 0.0, encode_ms: float = 0.0, decode_ms: float = 0.0) -> StagePrediction:
    return StagePrediction(edge_ms=edge_ms, encode_ms=encode_ms, network_ms=0.0, cloud_ms=0.0, decode_ms=decode_ms,
                           total_ms=edge_ms + encode_ms + decode_ms)


def test_a_slower_device_raises_the_edge_factor_by_the_smoothed_error() -> None:
    # measured 60 ms where 50 were predicted: ratio 1.2, factor 1 + 0.2 * 0.2 = 1.04
    after = Calibration().observed(predicted(edge_ms=50.0), Measured(edge_ms=60.0), offloaded=False)
    assert SMOOTHING == 0.2
    assert after.edge_factor == pytest.approx(1.04)
    assert after.offload_ms == 0.0 and after.samples == 1


def test_cloud_calls_teach_the_device_side_cost_of_offloading() -> None:
    # encode + decode predicted 1.5 ms, measured 11.5: excess 10 ms, smoothed to 2 ms
    after = Calibration().observed(predicted(encode_ms=1.0, decode_ms=0.5), Measured(encode_ms=11.0, decode_ms=0.5),
                                   offloaded=True)
    assert after.offload_ms == pytest.approx(2.0)
    assert after.edge_factor == 1.0  # no device compute in a REMOTE plan: nothing learned about it


def test_corrections_converge_on_the_true_error_and_stay_bounded() -> None:
    calibration = Calibration()
    for _ in range(60):  # each update uses what the current calibration predicts
        calibration = calibration.observed(predicted(edge_ms=50.0 * calibration.edge_factor,
                                                     encode_ms=1.0 + calibration.offload_ms),
                                           Measured(edge_ms=65.0, encode_ms=4.0), offloaded=True)
    assert calibration.edge_factor == pytest.approx(1.3, rel=1e-3)
    assert calibration.offload_ms == pytest.approx(3.0, rel=1e-3)
    wild = Calibration()
    for _ in range(100):
        wild = wild.observed(predicted(edge_ms=1.0 * wild.edge_factor), Measured(edge_ms=1000.0), offloaded=False)
    assert wild.edge_factor == EDGE_FACTOR_BOUNDS[1]


def test_timer_noise_teaches_nothing_about_speed() -> None:
    after = Calibration().observed(predicted(edge_ms=0.2), Measured(edge_ms=3.0), offloaded=False)
    assert after.edge_factor == 1.0


def candidate(decision, label: str):
    return next(c for c in decision.candidates if c.label == label)


def test_calibrated_costs_change_the_plan_as_hand_computed() -> None:
    costs = three_segments()
    # uncalibrated: split:1 58.0 ms beats local 92.0 ms (see test_costmodel)
    assert choose(costs, [node()], power()).winner.label == "split:1"
    # each cloud call costs the device 40 ms more: split:1 = 58 + 40 = 98 > 92
    slow_calls = Calibration(offload_ms=40.0).apply(costs)
    decision = choose(slow_calls, [node()], power())
    assert decision.winner.label == "local"
    assert candidate(decision, "split:1").stages.total_ms == pytest.approx(98.0)
    # the device runs twice as fast as profiled: local = 46 ms, split:1 = 58 - 6 = 52 ms
    fast_device = choose(Calibration(edge_factor=0.5).apply(costs), [node()], power())
    assert fast_device.winner.label == "local"
    assert fast_device.winner.stages.total_ms == pytest.approx(46.0)
    assert candidate(fast_device, "split:1").stages.total_ms == pytest.approx(52.0)


def test_an_uncalibrated_agent_plans_with_the_profile_as_measured() -> None:
    costs = three_segments()
    assert Calibration().apply(costs) is costs


def test_concurrent_requests_predicted_with_an_older_calibration_do_not_overshoot() -> None:
    # 16 requests planned with the same (initial) calibration finish one after another on a device 2x slower
    start, calibration = Calibration(), Calibration()
    for _ in range(16):
        calibration = calibration.observed(predicted(edge_ms=50.0), Measured(edge_ms=100.0), offloaded=False, used=start)
    assert 1.9 < calibration.edge_factor <= 2.0  # moves toward the truth, never past it


def test_time_outside_every_stage_is_charged_to_every_plan_alike() -> None:
    # 20 ms outside the stages, smoothed: 0.2 * 20 = 4 ms per request, on every plan
    after = Calibration().observed(predicted(edge_ms=50.0), Measured(edge_ms=50.0), offloaded=False, outside_ms=20.0)
    assert after.request_ms == pytest.approx(4.0)
    before = choose(three_segments(), [node()], power())
    now = choose(after.apply(three_segments()), [node()], power())
    for old, new in zip(before.candidates, now.candidates):
        assert new.stages.total_ms == pytest.approx(old.stages.total_ms + 4.0)
        assert new.energy_j == pytest.approx(old.energy_j + power().active_w * 4.0 / 1e3)
    assert now.winner.label == before.winner.label  # the same for every plan: it moves no decision
