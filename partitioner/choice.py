"""Choosing among candidates: the lowest feasible score, the same tie-break every time, and why.

Shared by :mod:`partitioner.costmodel` (tensor-model plans) and
:mod:`partitioner.llm_routing` (LLM routes), so that both check their inputs,
break ties and explain a decision in one way. Pure: no I/O, no clock.
"""

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, Protocol, TypeVar

# Scores closer than this (relative) count as a tie; see Chooser.pick for who wins.
TIE_REL_TOL = 1e-9


class Objective(str, Enum):
    LATENCY = "latency"
    ENERGY = "energy"
    WEIGHTED = "weighted"


# --- input validation ---------------------------------------------------------


def set_field(obj: object, name: str, value: object) -> None:
    """Store a normalised value on a frozen dataclass from __post_init__."""
    object.__setattr__(obj, name, value)


def number(where: str, value: object) -> float:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return result


def non_negative(where: str, value: object, unit: str) -> float:
    result = number(where, value)
    if result < 0:
        raise ValueError(f"{where} must be >= 0 {unit}, got {value!r}")
    return result


def positive(where: str, value: object, unit: str, hint: str = "") -> float:
    """`hint` (": ...") tells the caller what to do instead of passing zero."""
    result = number(where, value)
    if result <= 0:
        raise ValueError(f"{where} must be > 0 {unit}, got {value!r}{hint}")
    return result


def integer(where: str, value: object, unit: str) -> int:
    try:
        return operator.index(value)  # accepts numpy integers, refuses 1.5
    except TypeError:
        raise ValueError(f"{where} must be an integer number of {unit}, got {value!r}") from None


def count(where: str, value: object, unit: str) -> int:
    result = integer(where, value, unit)
    if result < 0:
        raise ValueError(f"{where} must be >= 0 {unit}, got {value!r}")
    return result


def objective(value: object) -> Objective:
    try:
        return Objective(value)
    except ValueError:
        names = ", ".join(repr(o.value) for o in Objective)
        raise ValueError(f"objective must be one of {names}, got {value!r}") from None


def weight(weight_latency: object) -> float:
    result = number("weight_latency", weight_latency)
    if not 0.0 <= result <= 1.0:
        raise ValueError(f"weight_latency must be in [0, 1], got {weight_latency!r}")
    return result


# --- scoring ------------------------------------------------------------------


def score(
    goal: Objective, weight_latency: float, total_ms: float, energy_j: float, ref_total_ms: float, ref_energy_j: float
) -> float:
    """What `goal` minimises; WEIGHTED divides by a reference so ms and J can be added."""
    if goal is Objective.LATENCY:
        return total_ms
    if goal is Objective.ENERGY:
        return energy_j
    return weight_latency * total_ms / ref_total_ms + (1 - weight_latency) * energy_j / ref_energy_j


def tied(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_REL_TOL * max(abs(a), abs(b))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- choosing and explaining --------------------------------------------------


class Choice(Protocol):
    """What the chooser reads of a candidate; costmodel.Candidate and llm_routing.LlmCandidate have it."""

    @property
    def label(self) -> str: ...
    @property
    def node(self) -> str | None: ...
    @property
    def score(self) -> float: ...
    @property
    def energy_j(self) -> float: ...
    @property
    def violations(self) -> tuple[str, ...]: ...
    @property
    def feasible(self) -> bool: ...
    @property
    def hard_violation(self) -> bool: ...


C = TypeVar("C", bound=Choice)

# (constraint, hard) for each constraint one candidate breaks.
Broken = tuple[tuple[str, bool], ...]
# (constraint, message, hard) for each constraint one candidate breaks.
Violation = tuple[str, str, bool]


def name(candidate: Choice) -> str:
    return candidate.label if candidate.node is None else f"{candidate.label} on {candidate.node}"


def tally(broken: Sequence[Broken], *, hard_only: bool = False) -> str:
    """'SLO: 3, memory limit: 1': how many candidates each constraint rules out."""
    counts: dict[str, int] = {}
    for names in broken:
        for constraint, hard in names:
            if hard or not hard_only:
                counts[constraint] = counts.get(constraint, 0) + 1
    return ", ".join(f"{constraint}: {n}" for constraint, n in counts.items())


def amount(value: float, unit: str) -> str:
    return f"{value:.1f} ms" if unit == "ms" else f"{value:.4g} J"


class Soft(NamedTuple):
    """The words for one soft constraint, so its violations and explanations agree."""

    constraint: str  # "SLO": its name in tallies
    measure: str  # "latency": what exceeds it
    bound: str  # "SLO", as in "> SLO 100.0 ms"
    closest: str  # "the fastest": the candidate that comes closest to it
    unit: str  # "ms" or "J"

    def breach(self, value: float, limit: float | None) -> list[Violation]:
        if limit is None or value <= limit:
            return []
        return [(self.constraint, f"{self.measure} {amount(value, self.unit)} > {self.bound} {amount(limit, self.unit)}", False)]


SLO = Soft("SLO", "latency", "SLO", "the fastest", "ms")
ENERGY_BUDGET = Soft("energy budget", "energy", "budget", "the most frugal", "J")


class Verdict(NamedTuple, Generic[C]):
    winner: C | None
    best_effort: C | None
    candidates: tuple[C, ...]
    why: str


@dataclass(frozen=True)
class Chooser(Generic[C]):
    """How one kind of candidate is chosen and explained; one per decision module."""

    noun: str  # what a candidate is in prose: "plan", "route"
    counted: str  # the word when counting candidates: "plan", "candidate"
    prefer: Callable[[C], int]  # lower wins a tie, before the order candidates were built in
    tie_rule: str  # why a lower `prefer` wins: "more segments on the device"
    total_ms: Callable[[C], float]
    ttft_ms: Callable[[C], float] | None = None  # time to first token, for streamed results

    def pick(self, candidates: Sequence[C], pool: Sequence[int]) -> int | None:
        """Index of the lowest score in pool, or None if pool is empty.

        Among scores within TIE_REL_TOL the lowest `prefer` wins, then the
        lowest index: candidates are built in the caller's own preference
        order of nodes, so the index says it.
        """
        if not pool:
            return None
        best = min(candidates[i].score for i in pool)
        return min((i for i in pool if tied(candidates[i].score, best)), key=lambda i: (self.prefer(candidates[i]), i))

    def decide(
        self,
        goal: Objective,
        evaluated: Sequence[tuple[C, Broken]],
        why_infeasible: Callable[[tuple[C, ...], list[Broken], int | None], str],
    ) -> Verdict[C]:
        """The feasible candidate with the lowest score, the best effort, and why.

        `why_infeasible(candidates, broken, best_effort)` explains a decision
        with no winner: what makes nothing feasible is the module's to say.
        """
        candidates = tuple(candidate for candidate, _ in evaluated)
        broken = [names for _, names in evaluated]
        win = self.pick(candidates, [i for i, c in enumerate(candidates) if c.feasible])
        effort = self.pick(candidates, [i for i, c in enumerate(candidates) if not c.hard_violation])
        if win is None:
            why = why_infeasible(candidates, broken, effort)
        else:
            why = self.why_winner(goal, candidates, broken, win)
        return Verdict(
            winner=None if win is None else candidates[win],
            best_effort=None if effort is None else candidates[effort],
            candidates=candidates,
            why=why,
        )

    def metric(self, goal: Objective, candidate: C) -> str:
        total, energy = self.total_ms(candidate), candidate.energy_j
        if goal is Objective.LATENCY:
            return amount(total, "ms")
        if goal is Objective.ENERGY:
            return amount(energy, "J")
        return f"score {candidate.score:.4g} ({amount(total, 'ms')}, {amount(energy, 'J')})"

    def why_winner(self, goal: Objective, candidates: Sequence[C], broken: Sequence[Broken], win: int) -> str:
        runner = self.pick(candidates, [i for i, c in enumerate(candidates) if c.feasible and i != win])
        ruled_out = [broken[i] for i, c in enumerate(candidates) if not c.feasible]
        return self.why_won(goal, candidates[win], None if runner is None else candidates[runner],
                            reference=candidates[0], count=len(candidates), ruled_out=len(ruled_out),
                            tallied=tally(ruled_out))

    def why_won(self, goal: Objective, winner: C, runner: C | None, *, reference: C, count: int, ruled_out: int,
                tallied: str) -> str:
        """The winner's reason from what it needs: the runner-up, the WEIGHTED
        objective's ``reference`` (which scores 1), and how many of ``count``
        candidates were ruled out by what (``tallied``, as ``tally`` says it)."""
        scale = f" ({name(reference)} = 1)" if goal is Objective.WEIGHTED else ""
        why = f"{name(winner)} wins on {goal.value}{scale} at {self.metric(goal, winner)}"
        if runner is None:
            why += f", the only feasible {self.noun}."
        else:
            other = runner
            if tied(winner.score, other.score):
                rule = self.tie_rule if self.prefer(winner) < self.prefer(other) else "the node listed first"
                why += f", tied with {name(other)}: the tie goes to {rule}."
            else:
                why += f", ahead of {name(other)} at {self.metric(goal, other)}."
        if self.ttft_ms is not None:
            why += f" First token in {amount(self.ttft_ms(winner), 'ms')}."
        if ruled_out:
            why += f" {ruled_out} of {plural(count, self.counted)} ruled out ({tallied})."
        return why

    def why_best_effort(
        self,
        candidates: Sequence[C],
        best_effort: int,
        limits: Sequence[tuple[Soft, float | None, Callable[[C], float]]],
        together: Callable[[], str],
    ) -> str:
        """Why nothing is feasible although the hard constraints allow some candidates.

        Names each soft constraint (with its limit, None if unset, and what it
        bounds) that no allowed candidate meets, with the one that comes
        closest; `together()` speaks when each alone can be met, only not all
        at once.
        """
        allowed = [i for i, c in enumerate(candidates) if not c.hard_violation]
        binding = []
        for soft, limit, value in limits:
            if limit is not None and all(value(candidates[i]) > limit for i in allowed):
                closest = candidates[min(allowed, key=lambda i: (value(candidates[i]), self.prefer(candidates[i]), i))]
                binding.append(
                    f"{soft.closest}, {name(closest)}, needs {amount(value(closest), soft.unit)} "
                    f"> {soft.bound} {amount(limit, soft.unit)}"
                )
        if not binding:
            binding.append(together())
        chosen = candidates[best_effort]
        first = "" if self.ttft_ms is None else f", first token {amount(self.ttft_ms(chosen), 'ms')}"
        return (
            f"No {self.noun} is feasible: of the {plural(len(allowed), self.counted)} the hard constraints allow, "
            f"{' and '.join(binding)}. Best effort, ignoring the soft constraints: {name(chosen)} "
            f"({amount(self.total_ms(chosen), 'ms')}{first}, {amount(chosen.energy_j, 'J')})."
        )
