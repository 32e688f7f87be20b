"""Unit tests of LLM request routing, with expected numbers worked out by hand.

Conventions used in the arithmetic comments (see partitioner/llm_routing.py):
wire ms = bytes * 8 / (Mbit/s * 1e6) * 1e3, so 12_500 B at 10 Mbit/s is
100_000 bit / 1e7 bit/s = 10 ms, and one 125 B token at 10 Mbit/s is 0.1 ms.

The default setting, used unless a test says otherwise:
  prompt 50 tokens, 12_500 B up; 125 B per streamed token; m = 100 tokens.
  device: prefill 500 tok/s -> 50 / 500 = 100 ms; 50 tok/s -> 20 ms/token.
  node a: rtt 100 ms, 10 Mbit/s both ways (up 10 ms, 0.1 ms per token),
          no queue, overhead 5 ms, prefill 5000 tok/s -> 10 ms, 250 tok/s -> 4 ms/token.
  power:  active 5 W, idle 1 W, P_tx at 10 Mbit/s = 0.4 * 10 + 1 = 5 W.
"""

import pytest

from partitioner.costmodel import Link, Objective, Power
from partitioner.llm_routing import (
    GenerationShape,
    LlmNode,
    LlmPolicy,
    LlmSpeed,
    evaluate_generation,
    resume_from_state,
    route_generation,
)

# --- factories ----------------------------------------------------------------


def shape(*, prompt_tokens=50, max_tokens=100, prompt_bytes=12_500, bytes_per_token=125) -> GenerationShape:
    return GenerationShape(
        prompt_tokens=prompt_tokens, max_tokens=max_tokens, prompt_bytes=prompt_bytes, bytes_per_token=bytes_per_token
    )


def device(*, prompt=500.0, gen=50.0, overhead=0.0) -> LlmSpeed:
    return LlmSpeed(prompt_tok_s=prompt, gen_tok_s=gen, overhead_ms=overhead)


def node(name="a", *, rtt=100.0, uplink=10.0, downlink=10.0, queue=0.0, prompt=5000.0, gen=250.0, overhead=5.0):
    return LlmNode(
        node=name,
        link=Link(uplink_mbps=uplink, downlink_mbps=downlink, rtt_ms=rtt),
        queue_ms=queue,
        speed=LlmSpeed(prompt_tok_s=prompt, gen_tok_s=gen, overhead_ms=overhead),
    )


def power(active=5.0, idle=1.0, alpha=0.4, beta=1.0) -> Power:
    return Power(active_w=active, idle_w=idle, radio_alpha_w_per_mbps=alpha, radio_beta_w=beta)


# Radio-hungry device computing cheaply: P_tx at 10 Mbit/s = 0.5 * 10 + 5 = 10 W.
RADIO_HUNGRY = dict(active=1.0, idle=0.5, alpha=0.5, beta=5.0)


# --- predictions --------------------------------------------------------------


def test_fast_idle_node_wins_a_long_generation_with_exact_predictions():
    d = route_generation(shape(), device(), [node()], power())
    local, remote = d.candidates
    # local:  ttft = 0 + 100 + 20 = 120;  T = 0 + 100 + 100 * 20 = 2100;  J = 5 * 2.1 = 10.5
    assert (local.kind, local.node, local.label) == ("local", None, "local")
    assert (local.ttft_ms, local.total_ms, local.energy_j) == pytest.approx((120.0, 2100.0, 10.5))
    # remote: ttft = rtt 100 + up 10 + queue 0 + overhead 5 + prefill 10 + 4 + down 0.1 = 129.1
    #         T    = 129.1 + 99 * max(4, 0.1)                 = 129.1 + 396 = 525.1
    #         J    = (5 W * 10 ms + 1 W * (525.1 - 10) ms) / 1e3 = 0.05 + 0.5151 = 0.5651
    assert (remote.kind, remote.node, remote.label) == ("remote", "a", "remote")
    assert (remote.ttft_ms, remote.total_ms, remote.energy_j) == pytest.approx((129.1, 525.1, 0.5651))
    assert remote.score == pytest.approx(525.1) and local.score == pytest.approx(2100.0)
    assert d.winner == remote and d.best_effort == remote and d.feasible
    assert d.objective is Objective.LATENCY
    assert all(c.feasible and not c.hard_violation and c.violations == () for c in d.candidates)
    assert d.why == "remote on a wins on latency at 525.1 ms, ahead of local at 2100.0 ms. First token in 129.1 ms."


def test_evaluate_generation_returns_the_same_candidates_in_order():
    cands = evaluate_generation(shape(), device(), [node("a"), node("b", queue=2000.0)], power())
    assert [(c.kind, c.node) for c in cands] == [("local", None), ("remote", "a"), ("remote", "b")]
    assert cands == route_generation(shape(), device(), [node("a"), node("b", queue=2000.0)], power()).candidates


@pytest.mark.parametrize(
    ("busy", "remote_ttft", "remote_total"),
    [
        # Overloaded: queue 2000 ms. ttft = 129.1 + 2000 = 2129.1; T = 2129.1 + 396 = 2525.1.
        (dict(queue=2000.0), 2129.1, 2525.1),
        # Slow: 40 tok/s -> 25 ms/token. ttft = 100 + 10 + 5 + 10 + 25 + 0.1 = 150.1;
        # T = 150.1 + 99 * 25 = 2625.1.
        (dict(gen=40.0), 150.1, 2625.1),
    ],
)
def test_overloaded_or_slow_node_loses_to_local(busy, remote_ttft, remote_total):
    d = route_generation(shape(), device(), [node(**busy)], power())
    remote = d.candidates[1]
    assert (remote.ttft_ms, remote.total_ms) == pytest.approx((remote_ttft, remote_total))
    assert d.winner.kind == "local" and d.winner.total_ms == pytest.approx(2100.0)
    assert d.why == (
        f"local wins on latency at 2100.0 ms, ahead of remote on a at {remote_total:.1f} ms. First token in 120.0 ms."
    )


def test_short_generation_stays_local_because_of_the_round_trip():
    # m = 1: local   T = ttft = 100 + 20 = 120,  J = 5 * 0.12 = 0.6
    #        remote  T = ttft = 129.1 (rtt 100 alone is most of it), no later tokens
    one = route_generation(shape(max_tokens=1), device(), [node()], power())
    assert [t for c in one.candidates for t in (c.ttft_ms, c.total_ms)] == pytest.approx([120.0, 120.0, 129.1, 129.1])
    assert one.winner.kind == "local"
    assert one.why == "local wins on latency at 120.0 ms, ahead of remote on a at 129.1 ms. First token in 120.0 ms."
    # m = 2: local 100 + 40 = 140; remote 129.1 + 4 = 133.1: the cloud's 16 ms/token gain repays the trip.
    two = route_generation(shape(max_tokens=2), device(), [node()], power())
    assert [c.total_ms for c in two.candidates] == pytest.approx([140.0, 133.1])
    assert two.winner.kind == "remote"


def test_streaming_is_paced_by_a_slow_downlink():
    # 32 kbit/s down, default 48 B per token: 384 bit / 32_000 bit/s = 12 ms per token > 4 ms to generate.
    #   ttft = 100 + 10 + 0 + 5 + 10 + 4 + 12 = 141;  T = 141 + 99 * 12 = 1329
    #   J    = (5 * 10 + 1 * 1319) / 1e3 = 1.369
    s = GenerationShape(prompt_tokens=50, max_tokens=100, prompt_bytes=12_500)
    assert s.bytes_per_token == 48
    slow = evaluate_generation(s, device(), [node(downlink=0.032)], power())[1]
    assert (slow.ttft_ms, slow.total_ms, slow.energy_j) == pytest.approx((141.0, 1329.0, 1.369))
    # At 10 Mbit/s the same 48 B take 0.0384 ms, so generation paces: T = 100 + 10 + 5 + 10 + 4 + 0.0384 + 396.
    fast = evaluate_generation(s, device(), [node()], power())[1]
    assert fast.total_ms == pytest.approx(525.0384)


# --- objectives ---------------------------------------------------------------


def test_energy_objective_keeps_local_while_latency_goes_remote():
    # m = 2 on a radio-hungry device (active 1 W, idle 0.5 W, P_tx 10 W):
    #   local:  T = 140;    J = 1 * 0.14                            = 0.14
    #   remote: T = 133.1;  J = (10 * 10 + 0.5 * (133.1 - 10)) / 1e3 = (100 + 61.55) / 1e3 = 0.16155
    s, pw = shape(max_tokens=2), power(**RADIO_HUNGRY)
    cands = evaluate_generation(s, device(), [node()], pw)
    assert [c.total_ms for c in cands] == pytest.approx([140.0, 133.1])
    assert [c.energy_j for c in cands] == pytest.approx([0.14, 0.16155])
    fastest = route_generation(s, device(), [node()], pw, objective=Objective.LATENCY)
    frugal = route_generation(s, device(), [node()], pw, objective=Objective.ENERGY)
    assert (fastest.winner.kind, fastest.winner.score) == ("remote", pytest.approx(133.1))
    assert (frugal.winner.kind, frugal.winner.score) == ("local", pytest.approx(0.14))
    assert frugal.why.startswith("local wins on energy at 0.14 J, ahead of remote on a at 0.16")
    # The objective may be given by its string value.
    assert route_generation(s, device(), [node()], pw, objective="energy").objective is Objective.ENERGY


def test_weighted_objective_is_normalised_by_local():
    # w = 0.5, reference local (140 ms, 0.14 J):
    #   local  = 0.5 * 140/140 + 0.5 * 0.14/0.14           = 1
    #   remote = 0.5 * 133.1/140 + 0.5 * 0.16155/0.14      = 0.47536 + 0.57696 = 1.05232
    s, pw = shape(max_tokens=2), power(**RADIO_HUNGRY)
    d = route_generation(s, device(), [node()], pw, objective=Objective.WEIGHTED, weight_latency=0.5)
    assert [c.score for c in d.candidates] == pytest.approx([1.0, 0.5 * 133.1 / 140 + 0.5 * 0.16155 / 0.14])
    assert d.winner.kind == "local"
    assert d.why.startswith("local wins on weighted (local = 1) at score 1 (140.0 ms, 0.14 J)")
    # The ends of the weight reproduce the single objectives.
    assert route_generation(s, device(), [node()], pw, objective="weighted", weight_latency=1.0).winner.kind == "remote"
    assert route_generation(s, device(), [node()], pw, objective="weighted", weight_latency=0.0).winner.kind == "local"


def test_weighted_reference_is_the_first_node_when_the_model_is_not_local():
    # a: 525.1 ms, 0.5651 J; b (queue 2000): 2525.1 ms, J = 0.05 + 2.5151 = 2.5651.
    a, b = node("a"), node("b", queue=2000.0)
    d = route_generation(shape(), None, [a, b], power(), objective=Objective.WEIGHTED)
    assert [c.score for c in d.candidates] == pytest.approx([1.0, 0.5 * 2525.1 / 525.1 + 0.5 * 2.5651 / 0.5651])
    assert d.why.startswith("remote on a wins on weighted (remote on a = 1) at score 1")
    flipped = route_generation(shape(), None, [b, a], power(), objective=Objective.WEIGHTED)
    assert flipped.candidates[0].score == pytest.approx(1.0) and flipped.winner.node == "a"


# --- ties ---------------------------------------------------------------------


def test_exact_tie_goes_to_local():
    # Free downlink (0 B per token): remote T = 100 + 10 + q + 5 + 10 + 4 + 99 * 4 = 525 + q; q = 1575 -> 2100 = local.
    d = route_generation(shape(bytes_per_token=0), device(), [node(queue=1575.0)], power())
    assert [c.total_ms for c in d.candidates] == pytest.approx([2100.0, 2100.0])
    assert d.winner.kind == "local"
    assert d.why == (
        "local wins on latency at 2100.0 ms, tied with remote on a: the tie goes to local, "
        "which keeps the prompt on the device. First token in 120.0 ms."
    )


@pytest.mark.parametrize(
    ("queue", "expected"),
    [
        (1575.0 - 1e-7, "local"),  # 2100 - 1e-7: 4.8e-11 relative, a tie, so local
        (1575.0 - 1e-5, "remote"),  # 2100 - 1e-5: 4.8e-9 relative, a real gain
    ],
)
def test_tie_tolerance_is_one_part_in_a_billion(queue, expected):
    d = route_generation(shape(bytes_per_token=0), device(), [node(queue=queue)], power())
    assert d.winner.kind == expected


def test_tie_between_nodes_goes_to_the_first_listed():
    a, b = node("a"), node("b")
    assert route_generation(shape(), None, [a, b], power()).winner.node == "a"
    assert route_generation(shape(), None, [b, a], power()).winner.node == "b"
    assert route_generation(shape(), None, [a, b], power()).why == (
        "remote on a wins on latency at 525.1 ms, tied with remote on b: the tie goes to the node listed first. "
        "First token in 129.1 ms."
    )


# --- model not on the device --------------------------------------------------


def test_without_a_local_model_only_nodes_are_candidates():
    d = route_generation(shape(max_tokens=1), None, [node("busy", queue=2000.0), node("idle")], power())
    # Even a one-token request goes out: 129.1 ms on idle beats 2129.1 ms on busy.
    assert [(c.kind, c.node) for c in d.candidates] == [("remote", "busy"), ("remote", "idle")]
    assert d.winner.node == "idle" and d.winner.total_ms == pytest.approx(129.1)


def test_without_a_local_model_and_no_remote_allowed_nothing_runs():
    d = route_generation(shape(), None, [node("a"), node("b")], power(), policy=LlmPolicy(allow_remote=False))
    assert d.winner is None and d.best_effort is None and not d.feasible
    assert all(c.hard_violation for c in d.candidates)
    assert d.why == (
        "No route is feasible: the model is not on the device and all 2 candidates break a hard constraint "
        "(remote not allowed: 2). remote on a breaks: remote execution not allowed."
    )


# --- hard constraints ---------------------------------------------------------


def test_allow_remote_false_forces_local_even_when_remote_is_faster():
    d = route_generation(shape(), device(), [node()], power(), policy=LlmPolicy(allow_remote=False))
    remote = d.candidates[1]
    assert remote.total_ms == pytest.approx(525.1)  # four times faster, still out
    assert remote.violations == ("remote execution not allowed",) and remote.hard_violation
    assert d.winner.kind == "local" and d.best_effort.kind == "local"
    assert d.why == (
        "local wins on latency at 2100.0 ms, the only feasible route. First token in 120.0 ms. "
        "1 of 2 candidates ruled out (remote not allowed: 1)."
    )


@pytest.mark.parametrize(("left", "expected"), [(0, "local"), (99, "local"), (100, "remote"), (None, "remote")])
def test_remote_token_cap_removes_remote_when_max_tokens_exceeds_it(left, expected):
    d = route_generation(shape(), device(), [node()], power(), policy=LlmPolicy(remote_tokens_left=left))
    assert d.winner.kind == expected
    remote = d.candidates[1]
    if expected == "local":
        assert remote.violations == (f"max_tokens 100 > remote tokens left {left}",) and remote.hard_violation
        assert d.best_effort.kind == "local"  # the cap is hard: best effort respects it


# --- soft constraints ---------------------------------------------------------


def test_ttft_slo_nobody_meets_gives_best_effort():
    # TTFT SLO 100 ms: local 120, remote 129.1. Best effort is the fastest in total, remote at 525.1 ms.
    d = route_generation(shape(), device(), [node()], power(), policy=LlmPolicy(ttft_slo_ms=100.0))
    assert d.winner is None and not d.feasible
    assert all(not c.feasible and not c.hard_violation for c in d.candidates)
    assert d.candidates[0].violations == ("first token 120.0 ms > TTFT SLO 100.0 ms",)
    assert d.best_effort.kind == "remote" and d.best_effort.total_ms == pytest.approx(525.1)
    assert d.why == (
        "No route is feasible: of the 2 candidates the hard constraints allow, the quickest to first token, "
        "local, needs 120.0 ms > TTFT SLO 100.0 ms. Best effort, ignoring the soft constraints: "
        "remote on a (525.1 ms, first token 129.1 ms, 0.5651 J)."
    )


def test_ttft_slo_can_pick_the_slower_total():
    # TTFT SLO 125 ms: local's first token (120) meets it, remote's (129.1) does not, though remote ends 4x sooner.
    d = route_generation(shape(), device(), [node()], power(), policy=LlmPolicy(ttft_slo_ms=125.0))
    assert d.winner.kind == "local" and d.best_effort.kind == "remote"
    assert d.why.endswith("1 of 2 candidates ruled out (TTFT SLO: 1).")


def test_total_slo_and_energy_budget():
    busy = node(queue=2000.0)  # 2525.1 ms, 2.5651 J against local 2100 ms, 10.5 J
    # Budget 5 J rules out local: the slower but frugal node wins.
    d = route_generation(shape(), device(), [busy], power(), policy=LlmPolicy(energy_budget_j=5.0))
    assert d.candidates[0].violations == ("energy 10.5 J > budget 5 J",)
    assert d.winner.kind == "remote" and d.best_effort.kind == "local"
    # SLO 2200 ms leaves only local, budget 5 J only remote: each can be met, not both.
    both = route_generation(shape(), device(), [busy], power(), policy=LlmPolicy(slo_ms=2200.0, energy_budget_j=5.0))
    assert both.winner is None and both.best_effort.kind == "local"
    assert "none meets the SLO (2200.0 ms) and the energy budget (5.0 J) together" in both.why
    # SLO 2000 ms: nobody; the fastest is local at 2100 ms.
    none = route_generation(shape(), device(), [busy], power(), policy=LlmPolicy(slo_ms=2000.0))
    assert none.candidates[1].violations == ("latency 2525.1 ms > SLO 2000.0 ms",)
    assert "the fastest, local, needs 2100.0 ms > SLO 2000.0 ms" in none.why


def test_best_effort_never_breaks_a_hard_constraint():
    # No remote and TTFT SLO 100: remote would be best effort (525.1 ms) but is forbidden.
    policy = LlmPolicy(allow_remote=False, ttft_slo_ms=100.0)
    d = route_generation(shape(), device(), [node()], power(), policy=policy)
    assert d.winner is None and d.best_effort.kind == "local"
    remote = d.candidates[1]
    assert remote.violations == ("remote execution not allowed", "first token 129.1 ms > TTFT SLO 100.0 ms")


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LlmSpeed(prompt_tok_s=0.0, gen_tok_s=10.0), r"LlmSpeed.prompt_tok_s must be > 0 tokens/s, got 0.0"),
        (lambda: LlmSpeed(prompt_tok_s=10.0, gen_tok_s=-1.0), r"LlmSpeed.gen_tok_s must be > 0 tokens/s"),
        (lambda: LlmSpeed(prompt_tok_s=10.0, gen_tok_s=float("inf")), r"LlmSpeed.gen_tok_s must be finite"),
        (lambda: LlmSpeed(prompt_tok_s=10.0, gen_tok_s=10.0, overhead_ms=-1), r"overhead_ms must be >= 0 ms"),
        (lambda: LlmSpeed(prompt_tok_s="fast", gen_tok_s=10.0), r"prompt_tok_s must be a number, got 'fast'"),
        (lambda: shape(prompt_tokens=0), r"GenerationShape.prompt_tokens must be >= 1 token, got 0"),
        (lambda: shape(max_tokens=-3), r"GenerationShape.max_tokens must be >= 1 token, got -3"),
        (lambda: shape(max_tokens=1.5), r"max_tokens must be an integer number of tokens, got 1.5"),
        (lambda: shape(prompt_bytes=-1), r"GenerationShape.prompt_bytes must be >= 0 bytes"),
        (lambda: shape(bytes_per_token=-1), r"GenerationShape.bytes_per_token must be >= 0 bytes"),
        (lambda: node(""), r"LlmNode.node must be a non-empty name"),
        (lambda: node(queue=-5.0), r"LlmNode\(a\).queue_ms must be >= 0 ms"),
        (lambda: node(downlink=0.0), r"Link.downlink_mbps must be > 0 Mbit/s"),
        (
            lambda: LlmNode(node="a", link=Link(10.0, 10.0, 5.0), queue_ms=0.0, speed=(100.0, 10.0)),
            r"LlmNode\(a\).speed must be a LlmSpeed, got tuple",
        ),
        (lambda: LlmPolicy(allow_remote="false"), r"LlmPolicy.allow_remote must be a bool"),
        (lambda: LlmPolicy(remote_tokens_left=-1), r"LlmPolicy.remote_tokens_left must be >= 0 tokens"),
        (lambda: LlmPolicy(slo_ms=0.0), r"LlmPolicy.slo_ms must be > 0 ms"),
        (lambda: LlmPolicy(ttft_slo_ms=-1.0), r"LlmPolicy.ttft_slo_ms must be > 0 ms"),
        (lambda: LlmPolicy(energy_budget_j=0.0), r"LlmPolicy.energy_budget_j must be > 0 J"),
    ],
)
def test_inputs_are_validated(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(nodes=[node("a"), node("a")]), r"cloud node 'a' is listed twice"),
        (dict(weight_latency=1.5), r"weight_latency must be in \[0, 1\], got 1.5"),
        (dict(weight_latency=-0.1), r"weight_latency must be in \[0, 1\]"),
        (dict(objective="fastest"), r"objective must be one of 'latency', 'energy', 'weighted', got 'fastest'"),
        (dict(local=None, nodes=[]), r"no way to run this model: it is not on the device \(local=None\)"),
        (dict(nodes=["a"]), r"nodes\[0\] must be a LlmNode, got str"),
        (dict(nodes="ab"), r"nodes must be a sequence of LlmNode"),
        (dict(local=(500.0, 50.0)), r"local must be a LlmSpeed"),
        (dict(policy=None), r"policy must be a LlmPolicy"),
        # Weighted divides by the reference's energy: a device that draws 0 W cannot be the unit.
        (
            dict(objective=Objective.WEIGHTED, power=power(active=0.0)),
            r"weighted objective divides by the reference route's \(local\) predicted latency and energy",
        ),
    ],
)
def test_routing_arguments_are_validated(kwargs, message):
    args = dict(shape=shape(), local=device(), nodes=[node()], power=power())
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        route_generation(args.pop("shape"), args.pop("local"), args.pop("nodes"), args.pop("power"), **args)


def test_same_inputs_same_decision():
    args = (shape(), device(), [node("a"), node("b", queue=50.0)], power())
    assert route_generation(*args) == route_generation(*args)


def test_expected_queue_grows_with_the_line_when_all_slots_are_busy() -> None:
    from partitioner.llm_routing import expected_queue_ms

    # a typical generation: 80 tokens at 100 tok/s = 800 ms
    line = dict(max_tokens=80, gen_tok_s=100.0)
    # a free slot: the reported smoothed wait stands
    assert expected_queue_ms(reported_ms=5.0, slots=4, active=3, queued=0, **line) == 5.0
    # all 4 busy, 2 waiting: (2 + 1) / 4 * 800 = 600 ms
    assert expected_queue_ms(reported_ms=5.0, slots=4, active=4, queued=2, **line) == pytest.approx(600.0)
    # a reported wait longer than that estimate is kept
    assert expected_queue_ms(reported_ms=900.0, slots=4, active=4, queued=2, **line) == 900.0


def test_a_handed_over_state_is_fetched_only_when_the_link_beats_evaluating_it() -> None:
    state = 23_040 * 300  # SmolLM2-135M keeps 23,040 bytes of f16 K and V per token: 300 tokens
    fast, slow = Link(100.0, 100.0, 10.0), Link(1.0, 1.0, 50.0)
    speeds = dict(prompt_tokens=280, streamed_tokens=21, prompt_tok_s=400.0, decode_tok_s=40.0)
    evaluate_ms = (280 / 400 + 20 / 40) * 1e3  # the last streamed token is evaluated either way
    shipped = resume_from_state(state, fast, **speeds)
    assert shipped.ship and shipped.ship_ms == pytest.approx(10 + 8 * state / 100e3)
    assert shipped.evaluate_ms == pytest.approx(evaluate_ms) and "fetching" in shipped.why
    kept = resume_from_state(state, slow, **speeds)
    assert not kept.ship and kept.ship_ms == pytest.approx(50 + 8 * state / 1e3) and "evaluating" in kept.why
    # nothing measured, nothing to compare: evaluate (no transfer to fail)
    assert not resume_from_state(state, None, **speeds).ship
    assert not resume_from_state(state, fast, **{**speeds, "prompt_tok_s": 0.0}).ship
    with pytest.raises(ValueError):
        resume_from_state(-1, fast, **speeds)
