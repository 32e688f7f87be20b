"""Hysteresis: change plan only when the new best beats the current plan by a margin.

Without it a link that wobbles around a break-even point makes the agent flap
between two plans on every request, paying the switch (cold sessions on both
sides) each time. The plan is held, not the node: which node runs it is load
balancing, and the best node for the held plan is taken on every request, so
equal nodes share the work. Pure: the agent remembers the current plan and
passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from partitioner.costmodel import Candidate

if TYPE_CHECKING:  # plan_table asks switch_gain whether a reused decision's hysteresis holds
    from partitioner.plan_table import Decisions


@dataclass(frozen=True)
class Held:
    candidate: Candidate | None   # what to run (None: nothing is feasible, see the decision)
    switched: bool                # it differs from the current plan
    why: str


def hold_or_switch(decision: Decisions, current: str | None, *, margin: float) -> Held:
    """Keep the plan ``current`` (a label such as "split:3"), on its best
    node, unless the decision's winner scores more than ``margin`` (relative,
    e.g. 0.1 = 10 %) better, or no node can run ``current`` any more.
    ``margin`` 0 follows every decision."""
    if margin < 0:
        raise ValueError(f"hysteresis margin must be >= 0, got {margin}")
    best = decision.winner
    if best is None:
        return Held(None, current is not None, decision.why)
    if current is None:
        return Held(best, True, f"first decision: {decision.why}")
    if best.label == current:
        return Held(best, False, f"staying on {best.label}: {decision.why}")
    same = decision.plans(current)
    held = min((c for c in same if c.feasible), key=lambda c: c.score, default=None)
    if held is None:
        broken = "; ".join(same[0].violations) if same else "no longer available"
        return Held(best, True, f"switched from {current} ({broken}) to {best.label}: {decision.why}")
    gain = switch_gain(held.score, best.score)
    if gain > margin:
        return Held(best, True, f"switched from {held.label} to {best.label}: {gain:.1%} better, above the "
                                f"{margin:.0%} margin")
    return Held(held, False, f"staying on {held.label}: {best.label} would be only {gain:.1%} better, within the "
                             f"{margin:.0%} margin")


def switch_gain(held_score: float, best_score: float) -> float:
    """How much better the winner scores than the held plan, as a share of
    the held plan's score: above the margin, the plan switches."""
    return (held_score - best_score) / held_score if held_score > 0 else 0.0


# Nodes whose prediction for the same plan is within this share of the best
# are treated as equal: link estimates wobble by a few per cent, and without
# a band one node would take all the work on noise.
EQUAL_NODES_REL = 0.05


def share_load(decision: Decisions, chosen: Candidate, usage: dict[str, tuple[int, float]]) -> Candidate:
    """Among the nodes predicted equal for ``chosen``'s plan, the least used:
    ``usage`` maps a node to (requests in flight, when it was last sent one)."""
    if chosen.node is None:
        return chosen
    equal = [c for c in decision.plans(chosen.label) if c.node is not None and c.feasible
             and c.score <= chosen.score * (1 + EQUAL_NODES_REL)]
    return min(equal, key=lambda c: usage.get(c.node, (0, 0)), default=chosen)
