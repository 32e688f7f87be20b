"""Unit tests of the cost model, with expected numbers worked out by hand.

Conventions used in the arithmetic comments: uplink_ms = bytes * 8 / (Mbit/s
* 1e6) * 1e3, so 12_500 B at 10 Mbit/s is 100_000 bit / 1e7 bit/s = 10 ms.
"""

import pytest

from partitioner.costmodel import (
    CloudOption,
    Constraints,
    Link,
    ModelCosts,
    Objective,
    Power,
    Transfer,
    choose,
    evaluate,
)

MB = 1_000_000


# --- factories ----------------------------------------------------------------


def three_segments(**changes) -> ModelCosts:
    """A 3-segment chain whose first segment shrinks the tensor tenfold.

    edge: 10 + 40 + 40 ms, +2 ms per onnxruntime run.
    crossings: inputs 150_000 B (1.2 Mbit), after 1: 12_500 B (0.1 Mbit),
    after 2: 50_000 B (0.4 Mbit). results: 1_250 B (0.01 Mbit).
    """
    fields = dict(
        edge_segment_ms=(10.0, 40.0, 40.0),
        edge_overhead_ms=2.0,
        crossings=(
            Transfer(wire_bytes=150_000, encode_ms=1.0, decode_ms=1.0),
            Transfer(wire_bytes=12_500, encode_ms=0.5, decode_ms=0.5),
            Transfer(wire_bytes=50_000, encode_ms=1.0, decode_ms=1.0),
        ),
        output=Transfer(wire_bytes=1_250, encode_ms=0.25, decode_ms=0.25),
        edge_memory_bytes=(0, 10 * MB, 40 * MB, 80 * MB),
    )
    fields.update(changes)
    return ModelCosts(**fields)


def node(name: str = "a", *, uplink=10.0, downlink=20.0, rtt=20.0, queue=5.0, segments=(1.0, 4.0, 4.0), overhead=1.0):
    return CloudOption(
        node=name,
        link=Link(uplink_mbps=uplink, downlink_mbps=downlink, rtt_ms=rtt),
        queue_ms=queue,
        segment_ms=segments,
        overhead_ms=overhead,
    )


def power(active=5.0, idle=1.0, alpha=0.4, beta=1.0) -> Power:
    return Power(active_w=active, idle_w=idle, radio_alpha_w_per_mbps=alpha, radio_beta_w=beta)


# Radio-hungry device: P_tx at 10 Mbit/s = 0.5 * 10 + 5 = 10 W, computing at 1 W.
RADIO_HUNGRY = dict(active=1.0, idle=0.5, alpha=0.5, beta=5.0)


def two_segments(*, inputs_bytes=100_000, cut_bytes=20_000, edge=(40.0, 40.0)) -> ModelCosts:
    """A 2-segment chain, free codecs and empty results, so only compute and uplink count."""
    return ModelCosts(
        edge_segment_ms=edge,
        edge_overhead_ms=0.0,
        crossings=(Transfer(inputs_bytes, 0.0, 0.0), Transfer(cut_bytes, 0.0, 0.0)),
        output=Transfer(0, 0.0, 0.0),
        edge_memory_bytes=(0, 0, 0),
    )


def fast_node(name: str = "a", *, segments=(2.0, 3.0)) -> CloudOption:
    # 20 Mbit/s both ways, 10 ms RTT, no queue, no overhead.
    return node(name, uplink=20.0, downlink=20.0, rtt=10.0, queue=0.0, segments=segments, overhead=0.0)


# Device for the two-segment cases: P_tx at 20 Mbit/s = 0.5 * 20 + 1 = 11 W.
TWO_SEG_POWER = dict(active=2.0, idle=0.5, alpha=0.5, beta=1.0)


def by_label(candidates, node_name=None):
    return {c.label: c for c in candidates if c.node in (None, node_name)}


# --- predictions --------------------------------------------------------------


def test_latency_picks_split_after_the_first_segment_with_exact_stages():
    d = choose(three_segments(), [node()], power())
    # split:1 on a:
    #   edge    = 10 + 2 (overhead)                     = 12
    #   encode  = crossings[1].encode                   = 0.5
    #   network = rtt 20 + up 100_000 bit / 1e7 (10 ms)
    #             + down 10_000 bit / 2e7 (0.5 ms)      = 30.5
    #   cloud   = queue 5 + (4 + 4) + overhead 1
    #             + crossings[1].decode 0.5 + output.encode 0.25 = 14.75
    #   decode  = output.decode                         = 0.25
    #   T       = 12 + 0.5 + 30.5 + 14.75 + 0.25        = 58.0
    w = d.winner
    assert (w.kind, w.k, w.node, w.label) == ("split", 1, "a", "split:1")
    s = w.stages
    assert s.edge_ms == pytest.approx(12.0)
    assert s.encode_ms == pytest.approx(0.5)
    assert s.network_ms == pytest.approx(30.5)
    assert s.cloud_ms == pytest.approx(14.75)
    assert s.decode_ms == pytest.approx(0.25)
    assert s.total_ms == pytest.approx(58.0)
    assert w.score == pytest.approx(58.0)
    assert w.uplink_bytes == 12_500
    assert w.memory_bytes == 10 * MB
    assert d.feasible and d.best_effort == w and d.objective is Objective.LATENCY
    # Runner-up is local: 10 + 40 + 40 + 2 = 92 ms.
    assert d.why == "split:1 on a wins on latency at 58.0 ms, ahead of local at 92.0 ms."


def test_every_candidate_latency_and_energy():
    cands = by_label(evaluate(three_segments(), [node()], power()), "a")
    # T:
    #   local  = 90 + 2                                           = 92
    #   remote = 0 + 1 + (20 + 120 + 0.5) + (5 + 9 + 1 + 1 + 0.25) + 0.25 = 158
    #            (up: 1_200_000 bit / 1e7 = 120 ms)
    #   split:2 = 52 + 1 + (20 + 40 + 0.5) + (5 + 4 + 1 + 1 + 0.25) + 0.25 = 125
    assert {k: c.stages.total_ms for k, c in cands.items()} == pytest.approx(
        {"local": 92.0, "remote": 158.0, "split:1": 58.0, "split:2": 125.0}
    )
    # J with active 5 W, idle 1 W, P_tx = 0.4 * 10 + 1 = 5 W:
    #   local   = 5 * 92 / 1e3                                    = 0.46
    #   remote  = 5 * (0 + 1 + 0.25) + 5 * 120 + 1 * (20 + 0.5 + 16.25)  = 6.25 + 600 + 36.75 mJ = 0.643
    #   split:1 = 5 * (12 + 0.5 + 0.25) + 5 * 10 + 1 * (20 + 0.5 + 14.75) = 63.75 + 50 + 35.25 mJ = 0.149
    #   split:2 = 5 * (52 + 1 + 0.25) + 5 * 40 + 1 * (20 + 0.5 + 11.25)  = 266.25 + 200 + 31.75 mJ = 0.498
    assert {k: c.energy_j for k, c in cands.items()} == pytest.approx(
        {"local": 0.46, "remote": 0.643, "split:1": 0.149, "split:2": 0.498}
    )
    local = cands["local"]
    assert (local.stages.encode_ms, local.stages.network_ms, local.stages.cloud_ms, local.stages.decode_ms) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert (local.node, local.k, local.uplink_bytes, local.memory_bytes) == (None, 3, 0, 80 * MB)
    remote = cands["remote"]
    # REMOTE runs nothing on the device, so no edge overhead.
    assert remote.stages.edge_ms == 0.0 and remote.uplink_bytes == 150_000 and remote.memory_bytes == 0


def test_candidates_come_in_a_stable_order():
    cands = evaluate(three_segments(), [node("a"), node("b")], power())
    assert [(c.label, c.node) for c in cands] == [
        ("local", None),
        ("remote", "a"),
        ("split:1", "a"),
        ("split:2", "a"),
        ("remote", "b"),
        ("split:1", "b"),
        ("split:2", "b"),
    ]
    assert all(c.feasible and not c.hard_violation and c.violations == () for c in cands)


def test_single_segment_model_has_only_local_and_remote():
    costs = ModelCosts(
        edge_segment_ms=(30.0,),
        edge_overhead_ms=0.0,
        crossings=(Transfer(12_500, 0.0, 0.0),),
        output=Transfer(0, 0.0, 0.0),
        edge_memory_bytes=(0, 1 * MB),
    )
    d = choose(costs, [node(segments=(1.0,), queue=0.0, overhead=0.0)], power())
    # remote: rtt 20 + up 10 ms + cloud 1 ms = 31 > local 30.
    assert [c.label for c in d.candidates] == ["local", "remote"]
    assert d.candidates[1].stages.total_ms == pytest.approx(31.0)
    assert d.winner.label == "local"


# --- objectives ---------------------------------------------------------------


def test_energy_objective_picks_a_different_plan_than_latency():
    # Two segments; 20 Mbit/s; P_tx = 11 W, active 2 W, idle 0.5 W.
    #   local:   T = 40 + 40 = 80;                J = 2 * 80 / 1e3 = 0.16
    #   remote:  up = 800_000 bit / 2e7 = 40 ms;  T = 10 + 40 + (2 + 3) = 55
    #            J = 11 * 40 + 0.5 * (10 + 0 + 5) = 440 + 7.5 mJ = 0.4475
    #   split:1: up = 160_000 bit / 2e7 = 8 ms;   T = 40 + 10 + 8 + 3 = 61
    #            J = 2 * 40 + 11 * 8 + 0.5 * (10 + 3) = 80 + 88 + 6.5 mJ = 0.1745
    costs, clouds, pw = two_segments(), [fast_node()], power(**TWO_SEG_POWER)
    cands = by_label(evaluate(costs, clouds, pw), "a")
    assert {k: c.stages.total_ms for k, c in cands.items()} == pytest.approx(
        {"local": 80.0, "remote": 55.0, "split:1": 61.0}
    )
    assert {k: c.energy_j for k, c in cands.items()} == pytest.approx(
        {"local": 0.16, "remote": 0.4475, "split:1": 0.1745}
    )

    fastest = choose(costs, clouds, pw, objective=Objective.LATENCY)
    frugal = choose(costs, clouds, pw, objective=Objective.ENERGY)
    assert (fastest.winner.label, fastest.winner.score) == ("remote", pytest.approx(55.0))
    assert (frugal.winner.label, frugal.winner.score) == ("local", pytest.approx(0.16))
    assert frugal.why == "local wins on energy at 0.16 J, ahead of split:1 on a at 0.1745 J."


def test_objective_may_be_given_as_its_string_value():
    d = choose(two_segments(), [fast_node()], power(**TWO_SEG_POWER), objective="energy")
    assert d.objective is Objective.ENERGY and d.winner.label == "local"


def test_weighted_objective_picks_the_compromise():
    # Normalised by local (T 80 ms, J 0.16 J), w = 0.5:
    #   local   = 0.5 * 80/80 + 0.5 * 0.16/0.16              = 1.0
    #   split:1 = 0.5 * 61/80 + 0.5 * 0.1745/0.16  = 0.38125 + 0.5453125 = 0.9265625
    #   remote  = 0.5 * 55/80 + 0.5 * 0.4475/0.16  = 0.34375 + 1.3984375 = 1.7421875
    # so the weighted plan is neither the fastest (remote) nor the most frugal (local).
    costs, clouds, pw = two_segments(), [fast_node()], power(**TWO_SEG_POWER)
    d = choose(costs, clouds, pw, objective=Objective.WEIGHTED, weight_latency=0.5)
    assert {c.label: c.score for c in d.candidates} == pytest.approx(
        {"local": 1.0, "split:1": 0.9265625, "remote": 1.7421875}
    )
    assert d.winner.label == "split:1"
    assert d.why.startswith("split:1 on a wins on weighted (local = 1) at score 0.9266 (61.0 ms, 0.1745 J)")
    # The ends of the weight reproduce the single objectives.
    assert choose(costs, clouds, pw, objective=Objective.WEIGHTED, weight_latency=1.0).winner.label == "remote"
    assert choose(costs, clouds, pw, objective=Objective.WEIGHTED, weight_latency=0.0).winner.label == "local"


# --- ties ---------------------------------------------------------------------


def test_exact_tie_goes_to_the_more_local_plan():
    # Cloud segments (2, 20): split:1 = 40 + 10 + up 10 (200_000 bit / 2e7) + 20 = 80 = local 80.
    # remote: 10 + up 50 (1_000_000 bit / 2e7) + 22 = 82.
    costs = two_segments(inputs_bytes=125_000, cut_bytes=25_000)
    d = choose(costs, [fast_node(segments=(2.0, 20.0))], power())
    totals = {c.label: c.stages.total_ms for c in d.candidates}
    assert totals == pytest.approx({"local": 80.0, "split:1": 80.0, "remote": 82.0})
    assert d.winner.label == "local"
    assert d.why == (
        "local wins on latency at 80.0 ms, tied with split:1 on a: the tie goes to more segments on the device."
    )


def test_split_and_remote_tie_goes_to_the_split():
    # Slow local (40 + 400); inputs 120_000 B -> 960_000 bit / 2e7 = 48 ms up:
    #   remote = 10 + 48 + 22 = 80; split:1 = 40 + 10 + 10 + 20 = 80.
    costs = two_segments(inputs_bytes=120_000, cut_bytes=25_000, edge=(40.0, 400.0))
    d = choose(costs, [fast_node(segments=(2.0, 20.0))], power())
    assert {c.label: c.stages.total_ms for c in d.candidates} == pytest.approx(
        {"local": 440.0, "split:1": 80.0, "remote": 80.0}
    )
    assert (d.winner.label, d.winner.k) == ("split:1", 1)


@pytest.mark.parametrize(
    ("cloud_last_ms", "expected"),
    [
        (20.0 - 1e-8, "local"),  # 80 - 1e-8: 1.25e-10 relative, a tie, so local
        (20.0 - 1e-6, "split:1"),  # 80 - 1e-6: 1.25e-8 relative, a real gain
    ],
)
def test_tie_tolerance_is_one_part_in_a_billion(cloud_last_ms, expected):
    costs = two_segments(inputs_bytes=125_000, cut_bytes=25_000)
    d = choose(costs, [fast_node(segments=(2.0, cloud_last_ms))], power())
    assert d.winner.label == expected


def test_tie_between_nodes_goes_to_the_first_listed():
    # Same node twice under two names; local is slow (440 ms), split:1 = 80 ms on both.
    costs = two_segments(inputs_bytes=125_000, cut_bytes=25_000, edge=(40.0, 400.0))
    a, b = fast_node("a", segments=(2.0, 20.0)), fast_node("b", segments=(2.0, 20.0))
    first_a = choose(costs, [a, b], power())
    first_b = choose(costs, [b, a], power())
    assert (first_a.winner.label, first_a.winner.node) == ("split:1", "a")
    assert (first_b.winner.label, first_b.winner.node) == ("split:1", "b")
    assert first_a.winner.stages.total_ms == pytest.approx(80.0)
    assert first_a.why == (
        "split:1 on a wins on latency at 80.0 ms, tied with split:1 on b: the tie goes to the node listed first."
    )


# --- soft constraints ---------------------------------------------------------


def test_slo_unreachable_by_every_plan():
    # Fastest plan is split:1 at 58 ms (see the first test); SLO 50 ms.
    d = choose(three_segments(), [node()], power(), constraints=Constraints(slo_ms=50.0))
    assert d.winner is None and not d.feasible
    assert d.best_effort.label == "split:1" and d.best_effort.node == "a"
    assert d.best_effort.stages.total_ms == pytest.approx(58.0)
    assert all(not c.feasible and not c.hard_violation for c in d.candidates)
    assert by_label(d.candidates, "a")["split:1"].violations == ("latency 58.0 ms > SLO 50.0 ms",)
    assert by_label(d.candidates, "a")["local"].violations == ("latency 92.0 ms > SLO 50.0 ms",)
    assert d.why == (
        "No plan is feasible: of the 4 plans the hard constraints allow, the fastest, split:1 on a, "
        "needs 58.0 ms > SLO 50.0 ms. Best effort, ignoring the soft constraints: "
        "split:1 on a (58.0 ms, 0.149 J)."
    )


def test_slo_met_exactly_is_feasible():
    d = choose(three_segments(), [node()], power(), constraints=Constraints(slo_ms=92.0))
    # local 92 meets it, split:1 58 wins; remote 158 and split:2 125 are out.
    assert d.winner.label == "split:1"
    assert by_label(d.candidates, "a")["local"].feasible
    assert [c.label for c in d.candidates if not c.feasible] == ["remote", "split:2"]
    assert d.why.endswith("2 of 4 plans ruled out (SLO: 2).")


def test_energy_budget_steers_the_latency_objective():
    costs, clouds, pw = two_segments(), [fast_node()], power(**TWO_SEG_POWER)
    # Budget 0.2 J: remote (0.4475 J) is out, split:1 (61 ms, 0.1745 J) is the fastest left.
    d = choose(costs, clouds, pw, constraints=Constraints(energy_budget_j=0.2))
    assert d.winner.label == "split:1" and d.winner.stages.total_ms == pytest.approx(61.0)
    remote = by_label(d.candidates, "a")["remote"]
    assert remote.violations == ("energy 0.4475 J > budget 0.2 J",) and not remote.hard_violation
    # Best effort ignores the budget: remote is fastest at 55 ms.
    assert d.best_effort.label == "remote"
    # Budget 0.17 J also removes split:1 (0.1745 J): local (0.16 J) is all that is left.
    assert choose(costs, clouds, pw, constraints=Constraints(energy_budget_j=0.17)).winner.label == "local"
    # Budget 0.1 J: nothing fits; the most frugal plan needs 0.16 J.
    none = choose(costs, clouds, pw, constraints=Constraints(energy_budget_j=0.1))
    assert none.winner is None and none.best_effort.label == "remote"
    assert "the most frugal, local, needs 0.16 J > budget 0.1 J" in none.why


def test_slo_and_budget_each_reachable_but_not_together():
    # SLO 70 ms leaves remote (55) and split:1 (61); budget 0.17 J leaves local (0.16).
    costs, clouds, pw = two_segments(), [fast_node()], power(**TWO_SEG_POWER)
    d = choose(costs, clouds, pw, constraints=Constraints(slo_ms=70.0, energy_budget_j=0.17))
    assert d.winner is None
    assert "none meets both the SLO (70.0 ms) and the energy budget (0.17 J)" in d.why


# --- hard constraints ---------------------------------------------------------


def test_memory_limit_removes_local():
    # Radio-hungry device, energy objective: J (1 W active, 0.5 W idle, P_tx 10 W):
    #   local   = 1 * 92 / 1e3                                      = 0.092
    #   split:1 = 1 * 12.75 + 10 * 10 + 0.5 * 35.25 = 12.75 + 100 + 17.625 mJ = 0.130375
    #   split:2 = 1 * 53.25 + 10 * 40 + 0.5 * 31.75 = 53.25 + 400 + 15.875 mJ = 0.469125
    #   remote  = 1 * 1.25 + 10 * 120 + 0.5 * 36.75 = 1.25 + 1200 + 18.375 mJ = 1.219625
    costs, clouds, pw = three_segments(), [node()], power(**RADIO_HUNGRY)
    free = choose(costs, clouds, pw, objective=Objective.ENERGY)
    assert {c.label: c.energy_j for c in free.candidates} == pytest.approx(
        {"local": 0.092, "split:1": 0.130375, "split:2": 0.469125, "remote": 1.219625}
    )
    assert free.winner.label == "local"

    # Local needs 80 MB, split:2 40 MB, split:1 10 MB: a 50 MB limit removes local only.
    limited = choose(costs, clouds, pw, objective=Objective.ENERGY, constraints=Constraints(memory_limit_bytes=50 * MB))
    local = limited.candidates[0]
    assert local.violations == ("memory 80000000 B > limit 50000000 B",) and local.hard_violation
    assert limited.winner.label == "split:1" and limited.winner.energy_j == pytest.approx(0.130375)
    assert limited.best_effort == limited.winner
    assert limited.why == (
        "split:1 on a wins on energy at 0.1304 J, ahead of split:2 on a at 0.4691 J. "
        "1 of 4 plans ruled out (memory limit: 1)."
    )


def test_privacy_floor_removes_remote_and_low_splits():
    costs, clouds = three_segments(), [node()]
    # Floor 1: only remote goes; split:1 (58 ms) still wins.
    assert choose(costs, clouds, power(), constraints=Constraints(privacy_min_local=1)).winner.label == "split:1"
    # Floor 2: remote and split:1 go; local 92 beats split:2 125.
    d = choose(costs, clouds, power(), constraints=Constraints(privacy_min_local=2))
    cands = by_label(d.candidates, "a")
    assert cands["remote"].violations == ("privacy: 0 segments on the device < floor 2",)
    assert cands["split:1"].violations == ("privacy: 1 segment on the device < floor 2",)
    assert cands["remote"].hard_violation and cands["split:1"].hard_violation
    assert cands["split:2"].feasible and cands["local"].feasible
    assert d.winner.label == "local" and d.winner.stages.total_ms == pytest.approx(92.0)
    # Floor 3 = n: only local.
    only = choose(costs, clouds, power(), constraints=Constraints(privacy_min_local=3))
    assert [c.label for c in only.candidates if c.feasible] == ["local"]


def test_best_effort_never_breaks_a_hard_constraint():
    # Floor 2 and SLO 50: the fastest plan overall (split:1, 58 ms) is forbidden,
    # so best effort is the fastest allowed one, local at 92 ms.
    d = choose(three_segments(), [node()], power(), constraints=Constraints(privacy_min_local=2, slo_ms=50.0))
    assert d.winner is None
    assert d.best_effort.label == "local" and d.best_effort.stages.total_ms == pytest.approx(92.0)
    assert "of the 2 plans the hard constraints allow, the fastest, local, needs 92.0 ms > SLO 50.0 ms" in d.why


def test_allow_remote_false_leaves_local():
    d = choose(three_segments(), [node()], power(), constraints=Constraints(allow_remote=False))
    assert d.winner.label == "local" and d.winner.stages.total_ms == pytest.approx(92.0)
    assert all(c.violations == ("remote execution not allowed",) for c in d.candidates[1:])
    assert d.why == (
        "local wins on latency at 92.0 ms, the only feasible plan. 3 of 4 plans ruled out (remote not allowed: 3)."
    )


def test_allowed_cuts():
    costs, clouds = three_segments(), [node()]
    # Only cut 2: split:1 (58) is out; local 92 < split:2 125 < remote 158.
    d = choose(costs, clouds, power(), constraints=Constraints(allowed_cuts=frozenset({2})))
    assert by_label(d.candidates, "a")["split:1"].violations == ("cut 1 not in allowed cuts [2]",)
    assert d.winner.label == "local"
    # Only cut 1: unchanged winner.
    assert choose(costs, clouds, power(), constraints=Constraints(allowed_cuts={1})).winner.label == "split:1"
    # No cuts: local and remote remain, REMOTE is not a cut.
    none = choose(costs, clouds, power(), constraints=Constraints(allowed_cuts=frozenset()))
    assert [c.label for c in none.candidates if c.feasible] == ["local", "remote"]


def test_no_plan_meets_the_hard_constraints():
    # 5 MB: only remote (0 B) fits, and remote is forbidden.
    d = choose(
        three_segments(),
        [node()],
        power(),
        constraints=Constraints(memory_limit_bytes=5 * MB, allow_remote=False, slo_ms=100.0),
    )
    assert d.winner is None and d.best_effort is None
    assert d.why == (
        "No plan is feasible: all 4 plans break a hard constraint "
        "(memory limit: 3, remote not allowed: 3). "
        "Local breaks: memory 80000000 B > limit 5000000 B."
    )


# --- several nodes ------------------------------------------------------------


def test_queue_delay_makes_the_second_node_win():
    # a: rtt 20, no queue -> split:1 = 58 - 5 = 53 ms. b: rtt 30, no queue -> 63 ms.
    costs = three_segments()
    b = node("b", rtt=30.0, queue=0.0)
    assert choose(costs, [node("a", queue=0.0), b], power()).winner.node == "a"
    # a reports a 20 ms queue -> split:1 on a = 73 ms; b's 63 ms wins.
    d = choose(costs, [node("a", queue=20.0), b], power())
    assert (d.winner.label, d.winner.node) == ("split:1", "b")
    assert d.winner.stages.total_ms == pytest.approx(63.0)
    assert by_label(d.candidates, "a")["split:1"].stages.total_ms == pytest.approx(73.0)
    assert d.why == "split:1 on b wins on latency at 63.0 ms, ahead of split:1 on a at 73.0 ms."


def test_no_clouds_means_local():
    d = choose(three_segments(), [], power())
    assert [c.label for c in d.candidates] == ["local"]
    assert d.winner.label == "local" and d.why == "local wins on latency at 92.0 ms, the only feasible plan."


# --- validation ---------------------------------------------------------------


def test_sequences_are_stored_as_tuples():
    costs = three_segments(edge_segment_ms=[10, 40, 40], edge_memory_bytes=[0, 1, 2, 3])
    assert costs.edge_segment_ms == (10.0, 40.0, 40.0) and costs.edge_memory_bytes == (0, 1, 2, 3)
    assert hash(costs)  # frozen and hashable, so it can key a cache


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: three_segments(edge_segment_ms=()), "at least one segment"),
        (lambda: three_segments(edge_segment_ms=(10.0, -1.0, 40.0)), r"edge_segment_ms\[1\] must be >= 0 ms"),
        (lambda: three_segments(edge_overhead_ms=float("nan")), "edge_overhead_ms must be finite"),
        (lambda: three_segments(crossings=three_segments().crossings[:2]), "crossings must have one entry per segment"),
        (lambda: three_segments(edge_memory_bytes=(0, 1, 2)), "edge_memory_bytes must have n \\+ 1 = 4 entries"),
        (lambda: Transfer(wire_bytes=-1, encode_ms=0.0, decode_ms=0.0), "wire_bytes must be >= 0 bytes"),
        (lambda: Transfer(wire_bytes=1.5, encode_ms=0.0, decode_ms=0.0), "wire_bytes must be an integer"),
        (lambda: Transfer(wire_bytes=1, encode_ms=-0.1, decode_ms=0.0), "encode_ms must be >= 0 ms"),
        (lambda: Link(uplink_mbps=0.0, downlink_mbps=10.0, rtt_ms=5.0), "zero bandwidth is not allowed"),
        (lambda: Link(uplink_mbps=10.0, downlink_mbps=-1.0, rtt_ms=5.0), "downlink_mbps must be > 0 Mbit/s"),
        (lambda: Link(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=-5.0), "rtt_ms must be >= 0 ms"),
        (lambda: power(active=-1.0), "active_w must be >= 0 W"),
        (lambda: node(""), "node must be a non-empty name"),
        (lambda: node(queue=-1.0), r"CloudOption\(a\).queue_ms must be >= 0 ms"),
        (lambda: Constraints(slo_ms=0.0), "slo_ms must be > 0 ms"),
        (lambda: Constraints(energy_budget_j=-1.0), "energy_budget_j must be > 0 J"),
        (lambda: Constraints(memory_limit_bytes=-1), "memory_limit_bytes must be >= 0 bytes"),
        (lambda: Constraints(privacy_min_local=-1), "privacy_min_local must be >= 0"),
        (lambda: Constraints(allow_remote="no"), "allow_remote must be True or False"),
    ],
)
def test_inputs_are_validated_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clouds=[node(segments=(1.0, 2.0))]), r"segment_ms has 2 entries, the model has n = 3"),
        (dict(clouds=[node("a"), node("a")]), "'a' is listed twice"),
        (dict(weight_latency=1.5), r"weight_latency must be in \[0, 1\]"),
        (dict(weight_latency=-0.1), r"weight_latency must be in \[0, 1\]"),
        (dict(objective="fastest"), "objective must be one of 'latency', 'energy', 'weighted'"),
        (dict(constraints=Constraints(privacy_min_local=4)), "privacy_min_local = 4 exceeds the model's n = 3"),
        (dict(constraints=Constraints(allowed_cuts={3})), r"allowed_cuts \[3\] are not cuts of a 3-segment model"),
        (dict(constraints=Constraints(allowed_cuts={0, 1})), r"allowed_cuts \[0\] are not cuts"),
        (dict(objective=Objective.WEIGHTED, power=power(active=0.0)), "weighted objective divides by the LOCAL"),
    ],
)
def test_inputs_are_validated_against_the_model(kwargs, message):
    args = dict(costs=three_segments(), clouds=[node()], power=power()) | kwargs
    costs, clouds, pw = args.pop("costs"), args.pop("clouds"), args.pop("power")
    with pytest.raises(ValueError, match=message):
        evaluate(costs, clouds, pw, **args)
    with pytest.raises(ValueError, match=message):
        choose(costs, clouds, pw, **args)


def test_same_inputs_same_decision():
    args = (three_segments(), [node("a"), node("b", queue=0.0)], power())
    assert choose(*args) == choose(*args)
