"""Per-request routing of an LLM generation: LOCAL or REMOTE on a cloud node, and why.

Pure decision logic, the LLM counterpart of :mod:`partitioner.costmodel`
(whose ``Objective``, ``Link`` and ``Power`` it reuses): frozen dataclasses
in, an :class:`LlmDecision` with its reasons out. No I/O, no clock, no
randomness. The daemon measures the speeds, the link and the nodes' queues;
this module only decides (see DESIGN.md, "The partitioner's model": "for LLMs
the same model decides LOCAL vs REMOTE per request").

A generation is a prompt of p tokens (``prompt_tokens``, P bytes on the
wire) followed by up to m generated tokens (``max_tokens``, streamed back at
b bytes each). Predictions assume all m tokens are generated: an early
end-of-sequence shortens every side, so m is the budget the caller asked for.
Units: ms, bytes, tokens/s, Mbit/s (1e6 bit/s), W, J.

LOCAL, with the device's speeds (prompt rate S_p, generation rate S_g, fixed
cost o)::

    prefill = p / S_p * 1e3
    ttft    = o + prefill + 1e3 / S_g
    T       = o + prefill + m * 1e3 / S_g
    J       = P_active * T / 1e3

REMOTE on node n (its speeds S_p,n, S_g,n, o_n, reported queue q_n, link L)::

    up      = 8 * P / (L.uplink_mbps * 1e6) * 1e3
    down_1  = 8 * b / (L.downlink_mbps * 1e6) * 1e3      one streamed token
    ttft    = L.rtt + up + q_n + o_n + p / S_p,n * 1e3 + 1e3 / S_g,n + down_1
    T       = ttft + (m - 1) * max(1e3 / S_g,n, down_1)
    J       = [ P_tx(L.uplink_mbps) * up + P_idle * (T - up) ] / 1e3
    P_tx(B) = alpha * B + beta                  (Huang et al., MobiSys'12)

The round trip is paid once: half to send the request, half for the first
token to come back; later tokens are pipelined behind it. Generation and the
downlink overlap while streaming, so the slower of the two paces every token
after the first. The device is charged idle power while it waits and while it
receives the stream, as in the tensor cost model: the chunks are small and a
downlink radio model would be a second model for a few kilobytes. The device
is assumed free for LOCAL; contention on it belongs in its measured speeds.

Objectives: LATENCY minimises T, ENERGY minimises J, WEIGHTED minimises
``w * T / T_ref + (1 - w) * J / J_ref``. The reference is the LOCAL candidate
when the model is on the device, else the first node given (REMOTE on
``nodes[0]``); it is only a unit that cancels ms against J, so it stays the
reference even when a constraint rules it out, and it always scores 1.

Constraints: hard ones (``allow_remote``, the cloud token cap
``remote_tokens_left`` against m) and soft ones (SLO on T, SLO on ttft,
energy budget) all make a candidate infeasible; ``LlmDecision.best_effort``
ignores the soft ones, so a caller whose SLO cannot be met still has the best
route it may legally take.

Ties (scores within ``TIE_REL_TOL``, relative) go to LOCAL, which keeps the
prompt on the device and off the network, then to the node listed first in
``nodes``, the caller's own preference order.
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.costmodel import (
    LOCAL,
    REMOTE,
    TIE_REL_TOL,
    Link,
    Objective,
    Power,
    _count,
    _non_negative,
    _number,
    _objective,
    _plural,
    _positive,
    _set,
    _tied,
)

__all__ = [
    "TIE_REL_TOL",
    "GenerationShape",
    "LlmCandidate",
    "LlmDecision",
    "LlmNode",
    "LlmPolicy",
    "LlmSpeed",
    "evaluate_generation",
    "route_generation",
]

# One streamed token on the wire: a few bytes of UTF-8 text, the protobuf
# fields around it, gRPC's 5-byte message prefix and HTTP/2's 9-byte DATA
# frame header. An estimate from those framing sizes, not a measurement;
# callers that measure their stream should pass their own figure.
DEFAULT_BYTES_PER_TOKEN = 48


# --- input validation helpers -------------------------------------------------


def _rate(where: str, value: object) -> float:
    number = _number(where, value)
    if number <= 0:
        raise ValueError(
            f"{where} must be > 0 tokens/s, got {value!r}: a side that cannot run the model "
            "is not a candidate; pass local=None or leave the node out of `nodes` instead"
        )
    return number


def _tokens(where: str, value: object) -> int:
    try:
        count = operator.index(value)  # accepts numpy integers, refuses 1.5
    except TypeError:
        raise ValueError(f"{where} must be an integer number of tokens, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{where} must be >= 1 token, got {value!r}")
    return count


def _is(where: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{where} must be a {kind.__name__}, got {type(value).__name__} {value!r}")


# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class LlmSpeed:
    """Measured speeds of one side (the device or one cloud node) for one model."""

    prompt_tok_s: float  # prompt evaluation (prefill), tokens/s; > 0
    gen_tok_s: float  # generation of one stream, tokens/s; > 0
    overhead_ms: float = 0.0  # fixed cost per request (scheduling, sampler setup), ms

    def __post_init__(self) -> None:
        _set(self, "prompt_tok_s", _rate("LlmSpeed.prompt_tok_s", self.prompt_tok_s))
        _set(self, "gen_tok_s", _rate("LlmSpeed.gen_tok_s", self.gen_tok_s))
        _set(self, "overhead_ms", _non_negative("LlmSpeed.overhead_ms", self.overhead_ms, "ms"))


@dataclass(frozen=True)
class GenerationShape:
    """What one request asks for."""

    prompt_tokens: int  # tokens in the prompt; >= 1
    max_tokens: int  # tokens to generate at most (predictions assume all of them); >= 1
    prompt_bytes: int  # bytes the request occupies on the wire (uplink)
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN  # streamed chunk per generated token (downlink), bytes

    def __post_init__(self) -> None:
        _set(self, "prompt_tokens", _tokens("GenerationShape.prompt_tokens", self.prompt_tokens))
        _set(self, "max_tokens", _tokens("GenerationShape.max_tokens", self.max_tokens))
        _set(self, "prompt_bytes", _count("GenerationShape.prompt_bytes", self.prompt_bytes, "bytes"))
        _set(self, "bytes_per_token", _count("GenerationShape.bytes_per_token", self.bytes_per_token, "bytes"))


@dataclass(frozen=True)
class LlmNode:
    """One cloud node as the router sees it for this model."""

    node: str  # node name, unique among the nodes
    link: Link  # measured link from the device to this node
    queue_ms: float  # the node's reported, measured queue delay, ms
    speed: LlmSpeed  # the node's measured speeds for this model

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"LlmNode.node must be a non-empty name, got {self.node!r}")
        _is(f"LlmNode({self.node}).link", self.link, Link)
        _is(f"LlmNode({self.node}).speed", self.speed, LlmSpeed)
        _set(self, "queue_ms", _non_negative(f"LlmNode({self.node}).queue_ms", self.queue_ms, "ms"))


@dataclass(frozen=True)
class LlmPolicy:
    """What a route must satisfy. Hard ones are never relaxed; soft ones are by best_effort."""

    allow_remote: bool = True  # hard: False keeps the prompt on the device (privacy), LOCAL only
    remote_tokens_left: int | None = None  # hard: REMOTE only if max_tokens <= this cloud allowance; None = no cap
    slo_ms: float | None = None  # soft: predicted total time must not exceed this, ms
    ttft_slo_ms: float | None = None  # soft: predicted time to first token must not exceed this, ms
    energy_budget_j: float | None = None  # soft: predicted device energy must not exceed this, J

    def __post_init__(self) -> None:
        # A truthy string such as "false" must not silently allow the cloud.
        _is("LlmPolicy.allow_remote", self.allow_remote, bool)
        if self.remote_tokens_left is not None:
            _set(
                self,
                "remote_tokens_left",
                _count("LlmPolicy.remote_tokens_left", self.remote_tokens_left, "tokens"),
            )
        if self.slo_ms is not None:
            _set(self, "slo_ms", _positive("LlmPolicy.slo_ms", self.slo_ms, "ms"))
        if self.ttft_slo_ms is not None:
            _set(self, "ttft_slo_ms", _positive("LlmPolicy.ttft_slo_ms", self.ttft_slo_ms, "ms"))
        if self.energy_budget_j is not None:
            _set(self, "energy_budget_j", _positive("LlmPolicy.energy_budget_j", self.energy_budget_j, "J"))


# --- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class LlmCandidate:
    """One route with its predictions and what rules it out."""

    kind: str  # "local" | "remote"
    node: str | None  # cloud node, None for local
    ttft_ms: float  # predicted time to first token, ms
    total_ms: float  # predicted time to the last of max_tokens tokens, ms
    energy_j: float  # predicted device energy, J
    score: float  # what the objective minimises
    violations: tuple[str, ...]  # human-readable, hard ones first
    hard_violation: bool  # True if any violation is of a hard constraint

    @property
    def label(self) -> str:
        return self.kind

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class LlmDecision:
    """The chosen route, every candidate considered, and why."""

    winner: LlmCandidate | None  # None when no candidate is feasible
    best_effort: LlmCandidate | None  # best meeting the hard constraints, soft ones ignored
    candidates: tuple[LlmCandidate, ...]  # local (if on the device), then the nodes in the given order
    objective: Objective
    why: str  # why the winner won, or why nothing is feasible

    @property
    def feasible(self) -> bool:
        return self.winner is not None


# --- the model ----------------------------------------------------------------


def _local(shape: GenerationShape, speed: LlmSpeed, power: Power) -> tuple[float, float, float]:
    """(ttft, T, J) on the device, as in the module docstring."""
    prefill = shape.prompt_tokens / speed.prompt_tok_s * 1e3
    per_token = 1e3 / speed.gen_tok_s
    ttft = speed.overhead_ms + prefill + per_token
    total = speed.overhead_ms + prefill + shape.max_tokens * per_token
    return ttft, total, power.active_w * total / 1e3


def _remote(shape: GenerationShape, node: LlmNode, power: Power) -> tuple[float, float, float]:
    """(ttft, T, J) on one node, term by term as in the module docstring."""
    link, speed = node.link, node.speed
    up = shape.prompt_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
    down_1 = shape.bytes_per_token * 8 / (link.downlink_mbps * 1e6) * 1e3
    prefill = shape.prompt_tokens / speed.prompt_tok_s * 1e3
    per_token = 1e3 / speed.gen_tok_s
    ttft = link.rtt_ms + up + node.queue_ms + speed.overhead_ms + prefill + per_token + down_1
    total = ttft + (shape.max_tokens - 1) * max(per_token, down_1)
    radio_w = power.radio_alpha_w_per_mbps * link.uplink_mbps + power.radio_beta_w
    energy = (radio_w * up + power.idle_w * (total - up)) / 1e3
    return ttft, total, energy


def _violations(
    policy: LlmPolicy, shape: GenerationShape, kind: str, ttft_ms: float, total_ms: float, energy_j: float
) -> list[tuple[str, str, bool]]:
    """(constraint, message, hard) for each constraint the route breaks, hard ones first."""
    found: list[tuple[str, str, bool]] = []
    if kind == REMOTE and not policy.allow_remote:
        found.append(("remote not allowed", "remote execution not allowed", True))
    left = policy.remote_tokens_left
    if kind == REMOTE and left is not None and shape.max_tokens > left:
        found.append(("remote token cap", f"max_tokens {shape.max_tokens} > remote tokens left {left}", True))
    slo = policy.slo_ms
    if slo is not None and total_ms > slo:
        found.append(("SLO", f"latency {total_ms:.1f} ms > SLO {slo:.1f} ms", False))
    ttft_slo = policy.ttft_slo_ms
    if ttft_slo is not None and ttft_ms > ttft_slo:
        found.append(("TTFT SLO", f"first token {ttft_ms:.1f} ms > TTFT SLO {ttft_slo:.1f} ms", False))
    budget = policy.energy_budget_j
    if budget is not None and energy_j > budget:
        found.append(("energy budget", f"energy {energy_j:.4g} J > budget {budget:.4g} J", False))
    return found


def _checked_inputs(
    shape: object, local: object, nodes: object, power: object, weight_latency: object, policy: object
) -> tuple[tuple[LlmNode, ...], float]:
    """Type and cross checks; returns the nodes as a tuple and the validated weight."""
    _is("shape", shape, GenerationShape)
    if local is not None:
        _is("local", local, LlmSpeed)
    _is("power", power, Power)
    _is("policy", policy, LlmPolicy)
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence):
        raise ValueError(f"nodes must be a sequence of LlmNode, got {type(nodes).__name__} {nodes!r}")
    weight = _number("weight_latency", weight_latency)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight_latency must be in [0, 1], got {weight_latency!r}")
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        _is(f"nodes[{i}]", node, LlmNode)
        if node.node in seen:
            raise ValueError(f"cloud node {node.node!r} is listed twice")
        seen.add(node.node)
    if local is None and not nodes:
        raise ValueError("no way to run this model: it is not on the device (local=None) and no cloud node was given")
    return tuple(nodes), weight


def _name(candidate: LlmCandidate) -> str:
    return candidate.label if candidate.node is None else f"{candidate.label} on {candidate.node}"


def _evaluate(
    shape: GenerationShape,
    local: LlmSpeed | None,
    nodes: Sequence[LlmNode],
    power: Power,
    objective: object,
    weight_latency: object,
    policy: LlmPolicy,
) -> tuple[Objective, list[tuple[LlmCandidate, tuple[tuple[str, bool], ...]]]]:
    """Every candidate with the (name, hard) of each constraint it breaks."""
    objective = _objective(objective)
    checked_nodes, weight = _checked_inputs(shape, local, nodes, power, weight_latency, policy)

    routes: list[tuple[str, str | None, tuple[float, float, float]]] = []
    if local is not None:
        routes.append((LOCAL, None, _local(shape, local, power)))
    routes.extend((REMOTE, node.node, _remote(shape, node, power)) for node in checked_nodes)

    _, ref_total, ref_energy = routes[0][2]
    if objective is Objective.WEIGHTED and (ref_total <= 0 or ref_energy <= 0):
        kind, node_name = routes[0][0], routes[0][1]
        reference = kind if node_name is None else f"{kind} on {node_name}"
        raise ValueError(
            f"the weighted objective divides by the reference route's ({reference}) predicted latency "
            f"and energy, which are {ref_total!r} ms and {ref_energy!r} J here: both must be > 0"
        )

    def score(total_ms: float, energy_j: float) -> float:
        if objective is Objective.LATENCY:
            return total_ms
        if objective is Objective.ENERGY:
            return energy_j
        return weight * total_ms / ref_total + (1 - weight) * energy_j / ref_energy

    evaluated = []
    for kind, node_name, (ttft, total, energy) in routes:
        broken = _violations(policy, shape, kind, ttft, total, energy)
        candidate = LlmCandidate(
            kind=kind,
            node=node_name,
            ttft_ms=ttft,
            total_ms=total,
            energy_j=energy,
            score=score(total, energy),
            violations=tuple(message for _, message, _ in broken),
            hard_violation=any(hard for _, _, hard in broken),
        )
        evaluated.append((candidate, tuple((name, hard) for name, _, hard in broken)))
    return objective, evaluated


def evaluate_generation(
    shape: GenerationShape,
    local: LlmSpeed | None,
    nodes: Sequence[LlmNode],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    policy: LlmPolicy = LlmPolicy(),
) -> tuple[LlmCandidate, ...]:
    """Every candidate route, predicted and checked: local (if on the device), then the nodes in order."""
    _, evaluated = _evaluate(shape, local, nodes, power, objective, weight_latency, policy)
    return tuple(candidate for candidate, _ in evaluated)


def _pick(candidates: Sequence[LlmCandidate], pool: Sequence[int]) -> int | None:
    """Index of the lowest score in pool, or None if pool is empty.

    Among scores within TIE_REL_TOL the lowest index wins: candidates are
    built local first, then in the caller's node order, so a tie keeps the
    prompt on the device, and between nodes goes to the one listed first.
    """
    if not pool:
        return None
    best = min(candidates[i].score for i in pool)
    return min(i for i in pool if _tied(candidates[i].score, best))


def _metric(objective: Objective, candidate: LlmCandidate) -> str:
    total, energy = candidate.total_ms, candidate.energy_j
    if objective is Objective.LATENCY:
        return f"{total:.1f} ms"
    if objective is Objective.ENERGY:
        return f"{energy:.4g} J"
    return f"score {candidate.score:.4g} ({total:.1f} ms, {energy:.4g} J)"


def _tally(broken: Sequence[tuple[tuple[str, bool], ...]], *, hard_only: bool = False) -> str:
    """'TTFT SLO: 2, remote not allowed: 1': how many candidates each constraint rules out."""
    counts: dict[str, int] = {}
    for names in broken:
        for name, hard in names:
            if hard or not hard_only:
                counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name}: {count}" for name, count in counts.items())


def _why_winner(
    objective: Objective,
    candidates: Sequence[LlmCandidate],
    broken: Sequence[tuple[tuple[str, bool], ...]],
    win: int,
) -> str:
    winner = candidates[win]
    runner = _pick(candidates, [i for i, c in enumerate(candidates) if c.feasible and i != win])
    scale = f" ({_name(candidates[0])} = 1)" if objective is Objective.WEIGHTED else ""
    why = f"{_name(winner)} wins on {objective.value}{scale} at {_metric(objective, winner)}"
    if runner is None:
        why += ", the only feasible route."
    else:
        other = candidates[runner]
        if _tied(winner.score, other.score):
            rule = "local, which keeps the prompt on the device" if winner.kind == LOCAL else "the node listed first"
            why += f", tied with {_name(other)}: the tie goes to {rule}."
        else:
            why += f", ahead of {_name(other)} at {_metric(objective, other)}."
    why += f" First token in {winner.ttft_ms:.1f} ms."
    ruled_out = [broken[i] for i, c in enumerate(candidates) if not c.feasible]
    if ruled_out:
        why += f" {len(ruled_out)} of {_plural(len(candidates), 'candidate')} ruled out ({_tally(ruled_out)})."
    return why


def _why_infeasible(
    candidates: Sequence[LlmCandidate],
    broken: Sequence[tuple[tuple[str, bool], ...]],
    policy: LlmPolicy,
    best_effort: int | None,
) -> str:
    if best_effort is None:
        # LOCAL breaks no hard constraint, so this only happens when the model is not on the device.
        where = "" if candidates[0].kind == LOCAL else "the model is not on the device and "
        return (
            f"No route is feasible: {where}all {_plural(len(candidates), 'candidate')} break a hard "
            f"constraint ({_tally(broken, hard_only=True)}). "
            f"{_name(candidates[0])} breaks: {'; '.join(candidates[0].violations)}."
        )
    allowed = [i for i, c in enumerate(candidates) if not c.hard_violation]

    def best_by(key: str) -> LlmCandidate:
        return candidates[min(allowed, key=lambda i: (getattr(candidates[i], key), i))]

    slo, ttft_slo, budget = policy.slo_ms, policy.ttft_slo_ms, policy.energy_budget_j
    binding = []
    if slo is not None and all(candidates[i].total_ms > slo for i in allowed):
        fastest = best_by("total_ms")
        binding.append(f"the fastest, {_name(fastest)}, needs {fastest.total_ms:.1f} ms > SLO {slo:.1f} ms")
    if ttft_slo is not None and all(candidates[i].ttft_ms > ttft_slo for i in allowed):
        first = best_by("ttft_ms")
        binding.append(f"the quickest to first token, {_name(first)}, needs {first.ttft_ms:.1f} ms > TTFT SLO {ttft_slo:.1f} ms")
    if budget is not None and all(candidates[i].energy_j > budget for i in allowed):
        frugal = best_by("energy_j")
        binding.append(f"the most frugal, {_name(frugal)}, needs {frugal.energy_j:.4g} J > budget {budget:.4g} J")
    if not binding:  # each soft constraint alone can be met, not all together
        limits = [
            text
            for value, text in (
                (slo, f"the SLO ({slo} ms)"),
                (ttft_slo, f"the TTFT SLO ({ttft_slo} ms)"),
                (budget, f"the energy budget ({budget} J)"),
            )
            if value is not None
        ]
        binding.append(f"none meets {', '.join(limits[:-1])} and {limits[-1]} together")
    chosen = candidates[best_effort]
    return (
        f"No route is feasible: of the {_plural(len(allowed), 'candidate')} the hard constraints allow, "
        f"{' and '.join(binding)}. Best effort, ignoring the soft constraints: {_name(chosen)} "
        f"({chosen.total_ms:.1f} ms, first token {chosen.ttft_ms:.1f} ms, {chosen.energy_j:.4g} J)."
    )


def route_generation(
    shape: GenerationShape,
    local: LlmSpeed | None,
    nodes: Sequence[LlmNode],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    policy: LlmPolicy = LlmPolicy(),
) -> LlmDecision:
    """The feasible route with the lowest score, every candidate, and why."""
    objective, evaluated = _evaluate(shape, local, nodes, power, objective, weight_latency, policy)
    candidates = tuple(candidate for candidate, _ in evaluated)
    broken = [names for _, names in evaluated]
    win = _pick(candidates, [i for i, c in enumerate(candidates) if c.feasible])
    effort = _pick(candidates, [i for i, c in enumerate(candidates) if not c.hard_violation])
    if win is None:
        why = _why_infeasible(candidates, broken, policy, effort)
    else:
        why = _why_winner(objective, candidates, broken, win)
    return LlmDecision(
        winner=None if win is None else candidates[win],
        best_effort=None if effort is None else candidates[effort],
        candidates=candidates,
        objective=objective,
        why=why,
    )


def expected_queue_ms(*, reported_ms: float, slots: int, active: int, queued: int, max_tokens: int,
                      gen_tok_s: float) -> float:
    """The wait a new request should expect on a node, from what it reports.

    The reported figure is a smoothed past wait; when every slot is taken now,
    the request also waits for its place in line: the requests ahead of it
    (queued + 1) leave at a rate of ``slots`` per typical generation, taken
    as one of this request's size at the node's per-stream speed.
    """
    if slots < 1 or gen_tok_s <= 0:
        raise ValueError(f"slots must be >= 1 and gen_tok_s > 0, got {slots} and {gen_tok_s}")
    if active < slots:
        return reported_ms
    typical_generation_ms = max_tokens * 1e3 / gen_tok_s
    return max(reported_ms, (queued + 1) / slots * typical_generation_ms)
