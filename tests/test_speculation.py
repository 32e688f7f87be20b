"""The draft-length choice and the SPECULATIVE route's predictions, against
the formulas of partitioner.speculation and partitioner.llm_routing worked
by hand."""

from __future__ import annotations

import dataclasses

import pytest

from partitioner.costmodel import Link, Power
from partitioner.llm_routing import GenerationShape, LlmNode, LlmSpeed, route_generation
from partitioner.speculation import AcceptanceEstimate, Drafting, best_draft, expected_tokens, step_ms


def test_a_round_yields_the_geometric_expectation() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError):
        expected_tokens(1.5, 2)


def test_decode_calls_are_interpolated_between_the_sizes_measured() -> None:
    measured = {1: 10.0, 5: 30.0, 9: 40.0}
    assert step_ms(1, measured) == 10.0
    assert step_ms(3, measured) == pytest.approx(20.0)
    assert step_ms(13, measured) == pytest.approx(50.0)  # along the last two
    assert step_ms(4, {1: 10.0}) == 10.0                 # one size: flat
    with pytest.raises(ValueError):
        step_ms(2, {1: 0.0})


@pytest.mark.parametrize("rtt_ms", [5.0, 20.0, 80.0, 200.0])
@pytest.mark.parametrize("batched", [False, True])
def test_the_draft_length_is_the_best_rate_over_every_length(rtt_ms: float, batched: bool) -> None:
    drafting = Drafting(draft_ms=8.0, verify_ms={1: 20.0, 2: 24.0, 9: 50.0, 17: 90.0}, acceptance=0.7, batched=batched)
    plan = best_draft(drafting, rtt_ms)
    rates = {k: expected_tokens(0.7, k) / drafting.round_ms(k, rtt_ms) for k in range(1, 17)}
    assert plan.tokens_per_s == pytest.approx(max(rates.values()) * 1e3)
    assert rates[plan.k] == max(rates.values())


def test_a_longer_round_trip_drafts_longer() -> None:
    drafting = Drafting(draft_ms=8.0, verify_ms={1: 20.0, 2: 22.0, 17: 60.0}, acceptance=0.8, batched=True)
    assert best_draft(drafting, 5.0).k < best_draft(drafting, 200.0).k


def test_checked_step_by_step_a_round_costs_a_plain_step_per_token_it_yields() -> None:
    drafting = Drafting(draft_ms=8.0, verify_ms={1: 20.0}, acceptance=0.5)
    assert drafting.check_ms(2) == pytest.approx(20.0 * 1.75)
    assert drafting.round_ms(2, 40.0) == pytest.approx(16.0 + 40.0 + 35.0)


def test_acceptance_counts_a_short_round_as_one_rejection() -> None:
    estimate = AcceptanceEstimate(0.5, prior_tokens=0.0, decay=1.0)
    estimate.add(drafted=4, accepted=4)  # all stood: no rejection
    estimate.add(drafted=4, accepted=1)  # stopped after one
    assert estimate.value == pytest.approx(5 / 6)
    estimate.add(drafted=0, accepted=0)  # the first token's round says nothing
    assert estimate.rounds == 2


def node(drafting: Drafting | None, *, rtt: float) -> LlmNode:
    return LlmNode(node="a", link=Link(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=rtt), queue_ms=0.0,
                   speed=LlmSpeed(prompt_tok_s=1000.0, gen_tok_s=50.0), drafting=drafting)


POWER = Power(active_w=5.0, idle_w=1.0, radio_alpha_w_per_mbps=0.4, radio_beta_w=1.0)
SHAPE = GenerationShape(prompt_tokens=20, max_tokens=64, prompt_bytes=200, bytes_per_token=48)
# A node whose one-call check is nearly free beside its plain step (a GPU's shape): drafting pays on a short link.
CHEAP_CHECKS = Drafting(draft_ms=4.0, verify_ms={1: 20.0, 2: 21.0, 17: 30.0}, acceptance=0.8, batched=True)


def test_the_speculative_route_is_predicted_as_its_formula_says() -> None:
    decision = route_generation(SHAPE, None, [node(CHEAP_CHECKS, rtt=10.0)], POWER)
    speculative = next(c for c in decision.candidates if c.kind == "speculative")
    plan = best_draft(CHEAP_CHECKS, 10.0)
    up, down = 200 * 8 / 10e6 * 1e3, 48 * 8 / 10e6 * 1e3
    first = max(20 / 1000 * 1e3, plan.k * 4.0) + CHEAP_CHECKS.check_ms(plan.k)
    ttft = 10.0 + up + first + down
    assert speculative.draft_tokens == plan.k
    assert speculative.ttft_ms == pytest.approx(ttft)
    assert speculative.total_ms == pytest.approx(ttft + (64 / plan.tokens_per_round - 1) * plan.round_ms)


def test_drafting_wins_where_checks_are_cheap_and_the_link_short_and_loses_on_a_long_one() -> None:
    near = route_generation(SHAPE, None, [node(CHEAP_CHECKS, rtt=10.0)], POWER)
    assert near.winner.kind == "speculative"
    far = route_generation(SHAPE, None, [node(CHEAP_CHECKS, rtt=200.0)], POWER)
    assert far.winner.kind == "remote"
    # checked step by step, a round costs the node as much as streaming: drafting never pays
    exact = dataclasses.replace(CHEAP_CHECKS, batched=False)
    assert route_generation(SHAPE, None, [node(exact, rtt=5.0)], POWER).winner.kind == "remote"


def test_no_drafting_no_speculative_route() -> None:
    decision = route_generation(SHAPE, None, [node(None, rtt=10.0)], POWER)
    assert [c.kind for c in decision.candidates] == ["remote"]
