"""Hysteresis: change plan only when the new best beats the current plan by a margin.

Without it a link that wobbles around a break-even point makes the agent flap
between two plans on every request, paying the switch (cold sessions on both
sides, a different node) each time. Pure: the agent remembers the current plan
and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.costmodel import Candidate, Decision


@dataclass(frozen=True)
class Held:
    candidate: Candidate | None   # what to run (None: nothing is feasible, see the decision)
    switched: bool                # it differs from the current plan
    why: str


def _key(candidate: Candidate) -> tuple[str, str | None]:
    return candidate.label, candidate.node


def hold_or_switch(decision: Decision, current: tuple[str, str | None] | None, *, margin: float) -> Held:
    """Keep ``current`` (label, node) unless the decision's winner scores more
    than ``margin`` (relative, e.g. 0.1 = 10 %) better, or ``current`` is no
    longer feasible. ``margin`` 0 follows every decision."""
    if margin < 0:
        raise ValueError(f"hysteresis margin must be >= 0, got {margin}")
    best = decision.winner
    if best is None:
        return Held(None, current is not None, decision.why)
    if current is None:
        return Held(best, True, f"first decision: {decision.why}")
    if _key(best) == current:
        return Held(best, False, f"staying on {best.label}: {decision.why}")
    held = next((c for c in decision.candidates if _key(c) == current), None)
    if held is None or not held.feasible:
        broken = "; ".join(held.violations) if held else "no longer available"
        return Held(best, True, f"switched from {current[0]} ({broken}) to {best.label}: {decision.why}")
    gain = (held.score - best.score) / held.score if held.score > 0 else 0.0
    if gain > margin:
        return Held(best, True, f"switched from {held.label} to {best.label}: {gain:.1%} better, above the "
                                f"{margin:.0%} margin")
    return Held(held, False, f"staying on {held.label}: {best.label} would be only {gain:.1%} better, within the "
                             f"{margin:.0%} margin")
