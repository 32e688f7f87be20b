"""Draft-and-verify decoding: how many tokens the device drafts per round,
and what a round yields.

Pure decision logic (no I/O, no clock). Each round the device's model drafts
k tokens (d ms each), the text crosses the link, the cloud model checks it in
one decode call of k + 1 tokens (v(k + 1) ms, measured by the node), and the
reply brings the accepted prefix plus one token of the cloud model's own. If
each drafted token is accepted with probability a, independently, a round
yields on average (Leviathan et al., "Fast Inference from Transformers via
Speculative Decoding", ICML'23, eq. 1)::

    E(k)  = (1 - a^(k+1)) / (1 - a)          tokens
    R(k)  = k * d + rtt + V(k)               ms
    k*    = argmax over 1..k_max of E(k) / R(k)

V(k) is the node's time to check a draft of k. Checked position by position,
each a plain decode step of s ms (a node's default: the output is then token
for token its plain greedy one), V(k) = E(k) * s. Checked in one decode call
(``batched``), V(k) = v(k + 1), that call's measured time.

The device waits for each reply before it drafts again (no pipelining), so
the terms add. Acceptance is measured at text level in the cloud model's
tokens (the two models have different vocabularies), so ``a`` is whatever
that measurement gives, tokenisation mismatches included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Longest draft considered: past it E(k) gains almost nothing at any
# acceptance measured here, while v(k + 1) keeps growing.
MAX_DRAFT_TOKENS = 16


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round yields on average (the module docstring's E(k))."""
    if not 0.0 <= acceptance <= 1.0 or k < 0:
        raise ValueError(f"acceptance must be within 0..1 and k >= 0, got {acceptance!r} and {k!r}")
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def step_ms(tokens: int, measured: Mapping[int, float]) -> float:
    """A decode call of ``tokens`` tokens, from the sizes measured: linear
    between the nearest two, along the last two beyond them, flat when only
    one size is known."""
    known = sorted((n, ms) for n, ms in measured.items() if ms > 0)
    if not known:
        raise ValueError("no decode step measured")
    if tokens in measured and measured[tokens] > 0:
        return measured[tokens]
    below = [(n, ms) for n, ms in known if n < tokens]
    above = [(n, ms) for n, ms in known if n > tokens]
    if below and above:
        (n0, t0), (n1, t1) = below[-1], above[0]
    elif len(known) >= 2:
        (n0, t0), (n1, t1) = known[-2:] if below else known[:2]
    else:
        return known[0][1]
    return max(t0 + (t1 - t0) * (tokens - n0) / (n1 - n0), 0.0)


@dataclass(frozen=True)
class Drafting:
    """What a round costs and yields with one node."""

    draft_ms: float                  # d: one decode step of the device's model
    verify_ms: Mapping[int, float]   # the node's decode call by tokens in it (1: a plain step, s)
    acceptance: float                # a: measured share of drafted tokens accepted
    batched: bool = False            # the node checks a draft in one decode call

    def check_ms(self, k: int) -> float:
        """V(k)."""
        if self.batched:
            return step_ms(k + 1, self.verify_ms)
        return expected_tokens(self.acceptance, k) * step_ms(1, self.verify_ms)

    def round_ms(self, k: int, rtt_ms: float) -> float:
        return k * self.draft_ms + rtt_ms + self.check_ms(k)


@dataclass(frozen=True)
class DraftPlan:
    k: int
    round_ms: float
    tokens_per_round: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_round / self.round_ms * 1e3


def best_draft(drafting: Drafting, rtt_ms: float, *, k_max: int = MAX_DRAFT_TOKENS) -> DraftPlan:
    """The draft length with the most tokens per second (ties: the shorter)."""
    best: DraftPlan | None = None
    for k in range(1, max(k_max, 1) + 1):
        plan = DraftPlan(k, drafting.round_ms(k, rtt_ms), expected_tokens(drafting.acceptance, k))
        if best is None or plan.tokens_per_s > best.tokens_per_s * (1 + 1e-9):
            best = plan
    assert best is not None
    return best


class AcceptanceEstimate:
    """The share of drafted tokens the cloud model accepts, from rounds seen:
    a round that stopped short of its draft counts one rejection (the
    geometric model behind E(k)). Starts from ``prior`` worth ``prior_tokens``
    drafted tokens; older rounds fade by ``decay`` per round.

    The prior is weak on purpose: a round at k = 1 adds one rejection only
    a quarter of the time at the acceptance measured here (0.74), so a prior
    of 0.5 worth 8 tokens (4 rejections) weighs as much as the first ~15
    rounds. With it, over 64 tokens at 80 ms RTT, the adaptive length
    averaged 1.4 where fixed k = 2 and 4 ran faster (bench.llm --only
    speculative, 2026-12-07).
    The geometric model itself fits: a = 0.74 predicts accepted shares of
    0.50 at k = 4 and 0.32 at k = 8, against 0.51 and 0.30 measured."""

    def __init__(self, prior: float, *, prior_tokens: float = 2.0, decay: float = 0.98) -> None:
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior acceptance must be within 0..1, got {prior!r}")
        self.accepted = prior * prior_tokens
        self.rejected = (1.0 - prior) * prior_tokens
        self.decay = decay
        self.rounds = 0

    def add(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.accepted = self.accepted * self.decay + accepted
        self.rejected = self.rejected * self.decay + (1 if accepted < drafted else 0)
        self.rounds += 1

    @property
    def value(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total > 0 else 0.0
