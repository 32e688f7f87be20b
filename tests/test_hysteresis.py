"""Hysteresis over real cost-model decisions built from small factories."""

from __future__ import annotations

import pytest

from partitioner.costmodel import CloudOption, Link, ModelCosts, Power, Transfer, choose
from partitioner.hysteresis import hold_or_switch, share_load

POWER = Power(active_w=5.0, idle_w=1.6, radio_alpha_w_per_mbps=0.283, radio_beta_w=0.133)


def decision(uplink_mbps: float, queues_ms: tuple[float, ...] = (0.0,)):
    """A 2-segment model: 40 + 40 ms on the device, 5 + 5 ms in the cloud.
    Input 100 kB, the cut tensor 10 kB, output 1 kB; no codec cost, RTT 0."""
    costs = ModelCosts(
        edge_segment_ms=(40.0, 40.0), edge_overhead_ms=0.0,
        crossings=(Transfer(100_000, 0.0, 0.0), Transfer(10_000, 0.0, 0.0)),
        output=Transfer(1_000, 0.0, 0.0), edge_memory_bytes=(0, 0, 0),
    )
    clouds = [CloudOption(node=f"n{i}", link=Link(uplink_mbps, 1000.0, 0.0), queue_ms=queue, segment_ms=(5.0, 5.0),
                          overhead_ms=0.0) for i, queue in enumerate(queues_ms)]
    return choose(costs, clouds, POWER)


def test_first_decision_takes_the_winner() -> None:
    held = hold_or_switch(decision(20.0), None, margin=0.1)
    assert held.switched and held.candidate.label == "split:1"  # 49.0 ms vs remote 50.0, local 80


def test_small_gains_do_not_switch_and_large_ones_do() -> None:
    # local: 80 ms. remote at 20 Mbit/s: 100 kB -> 40 ms + 10 ms cloud + 0.008 ms down = 50.008 ms.
    # split:1 at 20 Mbit/s: 40 + 4 (10 kB) + 5 + 0.008 = 49.008 ms: better than remote by 2.0 %
    d = decision(20.0)
    assert d.winner.label == "split:1"
    stay = hold_or_switch(d, "remote", margin=0.1)
    assert not stay.switched and stay.candidate.label == "remote" and "within the 10% margin" in stay.why
    # at 2 Mbit/s remote needs 400 + 10 ms and split:1 40 + 40 + 5 = 85 ms, local 80 ms: local wins by 80 %
    moved = hold_or_switch(decision(2.0), "remote", margin=0.1)
    assert moved.switched and moved.candidate.label == "local" and "above the 10% margin" in moved.why


def test_a_link_alternating_around_break_even_does_not_flap() -> None:
    # break-even of split:1 (45 ms + 80 000 bits / B) and local (80 ms) is B = 2.29 Mbit/s
    current = "local"
    switches = 0
    for uplink in [2.1, 2.5, 2.1, 2.5, 2.2, 2.4] * 5:
        held = hold_or_switch(decision(uplink), current, margin=0.1)
        switches += held.switched
        current = held.candidate.label
    assert switches == 0 and current == "local"
    # with no margin it flaps on every change
    current, switches = "local", 0
    for uplink in [2.1, 2.5] * 5:
        held = hold_or_switch(decision(uplink), current, margin=0.0)
        switches += held.switched
        current = held.candidate.label
    assert switches == 9


def test_an_infeasible_current_plan_is_left_even_within_the_margin() -> None:
    d = decision(20.0)
    held = hold_or_switch(d, "split:7", margin=0.5)  # no node offers it (a model with 2 segments)
    assert held.switched and "no longer available" in held.why
    with pytest.raises(ValueError):
        hold_or_switch(d, None, margin=-0.1)


def test_the_plan_is_held_but_its_node_follows_the_load() -> None:
    # remote at 20 Mbit/s: 50.008 ms on an idle node; split:1 wins on node n1 (idle) at 49.008 ms
    d = decision(20.0, queues_ms=(30.0, 0.0))
    held = hold_or_switch(d, "remote", margin=0.1)
    assert not held.switched and held.candidate.label == "remote" and held.candidate.node == "n1"
    busy_other = hold_or_switch(decision(20.0, queues_ms=(0.0, 30.0)), "remote", margin=0.1)
    assert busy_other.candidate.node == "n0"


def test_nodes_predicted_equal_share_the_work() -> None:
    d = decision(20.0, queues_ms=(0.0, 1.0, 20.0))  # n1 is 2 % behind n0, n2 40 % behind
    best = hold_or_switch(d, None, margin=0.1).candidate
    assert best.node == "n0"
    assert share_load(d, best, {"n0": (0, 3), "n1": (0, 2)}).node == "n1"   # equal enough, used less
    assert share_load(d, best, {"n0": (1, 0), "n1": (2, 0)}).node == "n0"   # fewer in flight wins
    assert share_load(d, best, {"n0": (5, 9), "n1": (5, 9), "n2": (0, 0)}).node in ("n0", "n1")  # n2 is slower
