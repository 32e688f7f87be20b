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

SPECULATIVE on node n (``LlmNode.drafting`` given): the device drafts k
tokens a round, the node checks them in V(k) (partitioner.speculation: k*,
R(k*) and E(k*) tokens a round; d the device's draft step)::

    first   = max(p / S_p,n * 1e3, k * d) + V(k)  the device drafts while the node prefills
    ttft    = L.rtt + up + q_n + o_n + first + down_1
    T       = ttft + (m / E - 1) * R
    J       = [ P_tx * up + P_active * D + P_idle * (T - up - D) ] / 1e3,  D = (m / E) * k * d

Its output is the node's own greedy generation, so it competes with REMOTE
on that node on time and energy alone; it only applies to greedy requests.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner import choice
from partitioner.choice import TIE_REL_TOL, Objective, count, integer, non_negative, positive, set_field
from partitioner.costmodel import LOCAL, REMOTE, Link, Power
from partitioner.speculation import Drafting, best_draft

SPECULATIVE = "speculative"

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
# A prompt not yet tokenised travels as text: about 4 characters per token
# for English (OpenAI's tokenizer guide, "a helpful rule of thumb"), plus
# the request's own fields and framing.
PROMPT_BYTES_PER_TOKEN = 4
REQUEST_FRAMING_BYTES = 64


def estimated_prompt_bytes(prompt_tokens: int) -> int:
    """Uplink bytes of a prompt known only by its length (explain, offload-tune)."""
    return max(prompt_tokens, 1) * PROMPT_BYTES_PER_TOKEN + REQUEST_FRAMING_BYTES


# --- input validation helpers -------------------------------------------------


_NO_SPEED = (
    ": a side that cannot run the model is not a candidate; pass local=None or leave the node out of `nodes` instead"
)


def _rate(where: str, value: object) -> float:
    return positive(where, value, "tokens/s", _NO_SPEED)


def _tokens(where: str, value: object) -> int:
    tokens = integer(where, value, "tokens")
    if tokens < 1:
        raise ValueError(f"{where} must be >= 1 token, got {value!r}")
    return tokens


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
        set_field(self, "prompt_tok_s", _rate("LlmSpeed.prompt_tok_s", self.prompt_tok_s))
        set_field(self, "gen_tok_s", _rate("LlmSpeed.gen_tok_s", self.gen_tok_s))
        set_field(self, "overhead_ms", non_negative("LlmSpeed.overhead_ms", self.overhead_ms, "ms"))


@dataclass(frozen=True)
class GenerationShape:
    """What one request asks for."""

    prompt_tokens: int  # tokens in the prompt; >= 1
    max_tokens: int  # tokens to generate at most (predictions assume all of them); >= 1
    prompt_bytes: int  # bytes the request occupies on the wire (uplink)
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN  # streamed chunk per generated token (downlink), bytes

    def __post_init__(self) -> None:
        set_field(self, "prompt_tokens", _tokens("GenerationShape.prompt_tokens", self.prompt_tokens))
        set_field(self, "max_tokens", _tokens("GenerationShape.max_tokens", self.max_tokens))
        set_field(self, "prompt_bytes", count("GenerationShape.prompt_bytes", self.prompt_bytes, "bytes"))
        set_field(self, "bytes_per_token", count("GenerationShape.bytes_per_token", self.bytes_per_token, "bytes"))


@dataclass(frozen=True)
class LlmNode:
    """One cloud node as the router sees it for this model."""

    node: str  # node name, unique among the nodes
    link: Link  # measured link from the device to this node
    queue_ms: float  # the node's reported, measured queue delay, ms
    speed: LlmSpeed  # the node's measured speeds for this model
    drafting: Drafting | None = None  # the device can draft for this node's model: a SPECULATIVE route too

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"LlmNode.node must be a non-empty name, got {self.node!r}")
        _is(f"LlmNode({self.node}).link", self.link, Link)
        _is(f"LlmNode({self.node}).speed", self.speed, LlmSpeed)
        set_field(self, "queue_ms", non_negative(f"LlmNode({self.node}).queue_ms", self.queue_ms, "ms"))


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
            set_field(
                self,
                "remote_tokens_left",
                count("LlmPolicy.remote_tokens_left", self.remote_tokens_left, "tokens"),
            )
        if self.slo_ms is not None:
            set_field(self, "slo_ms", positive("LlmPolicy.slo_ms", self.slo_ms, "ms"))
        if self.ttft_slo_ms is not None:
            set_field(self, "ttft_slo_ms", positive("LlmPolicy.ttft_slo_ms", self.ttft_slo_ms, "ms"))
        if self.energy_budget_j is not None:
            set_field(self, "energy_budget_j", positive("LlmPolicy.energy_budget_j", self.energy_budget_j, "J"))


# --- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class LlmCandidate:
    """One route with its predictions and what rules it out."""

    kind: str  # "local" | "remote" | "speculative"
    node: str | None  # cloud node, None for local
    ttft_ms: float  # predicted time to first token, ms
    total_ms: float  # predicted time to the last of max_tokens tokens, ms
    energy_j: float  # predicted device energy, J
    score: float  # what the objective minimises
    violations: tuple[str, ...]  # human-readable, hard ones first
    hard_violation: bool  # True if any violation is of a hard constraint
    draft_tokens: int = 0  # speculative: tokens the device drafts a round

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


def _node_terms(shape: GenerationShape, node: LlmNode, power: Power) -> tuple[float, float, float, float]:
    """(up, down_1, prefill, P_tx) of a route through one node: its wire and prefill terms."""
    link = node.link
    up = shape.prompt_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
    down_1 = shape.bytes_per_token * 8 / (link.downlink_mbps * 1e6) * 1e3
    prefill = shape.prompt_tokens / node.speed.prompt_tok_s * 1e3
    return up, down_1, prefill, power.radio_alpha_w_per_mbps * link.uplink_mbps + power.radio_beta_w


def _remote(shape: GenerationShape, node: LlmNode, power: Power) -> tuple[float, float, float]:
    """(ttft, T, J) on one node, term by term as in the module docstring."""
    up, down_1, prefill, radio_w = _node_terms(shape, node, power)
    per_token = 1e3 / node.speed.gen_tok_s
    ttft = node.link.rtt_ms + up + node.queue_ms + node.speed.overhead_ms + prefill + per_token + down_1
    total = ttft + (shape.max_tokens - 1) * max(per_token, down_1)
    energy = (radio_w * up + power.idle_w * (total - up)) / 1e3
    return ttft, total, energy


def _speculative(shape: GenerationShape, node: LlmNode, power: Power) -> tuple[tuple[float, float, float], int]:
    """((ttft, T, J), k) drafting on the device for one node, as in the module docstring."""
    assert node.drafting is not None
    drafting = node.drafting
    plan = best_draft(drafting, node.link.rtt_ms)
    up, down_1, prefill, radio_w = _node_terms(shape, node, power)
    first = max(prefill, plan.k * drafting.draft_ms) + drafting.check_ms(plan.k)
    ttft = node.link.rtt_ms + up + node.queue_ms + node.speed.overhead_ms + first + down_1
    rounds = shape.max_tokens / plan.tokens_per_round
    total = ttft + max(rounds - 1, 0.0) * plan.round_ms
    drafting_ms = min(rounds * plan.k * drafting.draft_ms, total - up)
    energy = (radio_w * up + power.active_w * drafting_ms + power.idle_w * (total - up - drafting_ms)) / 1e3
    return (ttft, total, energy), plan.k


_TTFT_SLO = choice.Soft("TTFT SLO", "first token", "TTFT SLO", "the quickest to first token", "ms")


def _violations(
    policy: LlmPolicy, shape: GenerationShape, kind: str, ttft_ms: float, total_ms: float, energy_j: float
) -> list[choice.Violation]:
    """Each constraint the route breaks, hard ones first."""
    found: list[choice.Violation] = []
    if kind != LOCAL and not policy.allow_remote:
        found.append(("remote not allowed", "remote execution not allowed", True))
    left = policy.remote_tokens_left
    if kind != LOCAL and left is not None and shape.max_tokens > left:
        found.append(("remote token cap", f"max_tokens {shape.max_tokens} > remote tokens left {left}", True))
    found += choice.SLO.breach(total_ms, policy.slo_ms)
    found += _TTFT_SLO.breach(ttft_ms, policy.ttft_slo_ms)
    found += choice.ENERGY_BUDGET.breach(energy_j, policy.energy_budget_j)
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
    weight = choice.weight(weight_latency)
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        _is(f"nodes[{i}]", node, LlmNode)
        if node.node in seen:
            raise ValueError(f"cloud node {node.node!r} is listed twice")
        seen.add(node.node)
    if local is None and not nodes:
        raise ValueError("no way to run this model: it is not on the device (local=None) and no cloud node was given")
    return tuple(nodes), weight


def _evaluate(
    shape: GenerationShape,
    local: LlmSpeed | None,
    nodes: Sequence[LlmNode],
    power: Power,
    objective: object,
    weight_latency: object,
    policy: LlmPolicy,
) -> tuple[Objective, list[tuple[LlmCandidate, choice.Broken]]]:
    """Every candidate with the (name, hard) of each constraint it breaks."""
    objective = choice.objective(objective)
    checked_nodes, weight = _checked_inputs(shape, local, nodes, power, weight_latency, policy)

    routes: list[tuple[str, str | None, tuple[float, float, float], int]] = []
    if local is not None:
        routes.append((LOCAL, None, _local(shape, local, power), 0))
    for node in checked_nodes:
        routes.append((REMOTE, node.node, _remote(shape, node, power), 0))
        if node.drafting is not None:
            routes.append((SPECULATIVE, node.node, *_speculative(shape, node, power)))

    _, ref_total, ref_energy = routes[0][2]
    if objective is Objective.WEIGHTED and (ref_total <= 0 or ref_energy <= 0):
        kind, node_name = routes[0][0], routes[0][1]
        reference = kind if node_name is None else f"{kind} on {node_name}"
        raise ValueError(
            f"the weighted objective divides by the reference route's ({reference}) predicted latency "
            f"and energy, which are {ref_total!r} ms and {ref_energy!r} J here: both must be > 0"
        )

    evaluated = []
    for kind, node_name, (ttft, total, energy), draft_tokens in routes:
        broken = _violations(policy, shape, kind, ttft, total, energy)
        candidate = LlmCandidate(
            kind=kind,
            node=node_name,
            ttft_ms=ttft,
            total_ms=total,
            energy_j=energy,
            score=choice.score(objective, weight, total, energy, ref_total, ref_energy),
            violations=tuple(message for _, message, _ in broken),
            hard_violation=any(hard for _, _, hard in broken),
            draft_tokens=draft_tokens,
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


# Ties go to LOCAL, which keeps the prompt on the device (it is built first,
# so it also has the lowest index), then to the node listed first in `nodes`.
_CHOOSER: choice.Chooser[LlmCandidate] = choice.Chooser(
    noun="route",
    counted="candidate",
    prefer=lambda c: c.kind != LOCAL,
    tie_rule="local, which keeps the prompt on the device",
    total_ms=lambda c: c.total_ms,
    ttft_ms=lambda c: c.ttft_ms,
)


def _why_infeasible(
    candidates: Sequence[LlmCandidate],
    broken: Sequence[choice.Broken],
    policy: LlmPolicy,
    best_effort: int | None,
) -> str:
    if best_effort is None:
        # LOCAL breaks no hard constraint, so this only happens when the model is not on the device.
        where = "" if candidates[0].kind == LOCAL else "the model is not on the device and "
        return (
            f"No route is feasible: {where}all {choice.plural(len(candidates), 'candidate')} break a hard "
            f"constraint ({choice.tally(broken, hard_only=True)}). "
            f"{choice.name(candidates[0])} breaks: {'; '.join(candidates[0].violations)}."
        )
    slo, ttft_slo, budget = policy.slo_ms, policy.ttft_slo_ms, policy.energy_budget_j
    limits = (
        (choice.SLO, slo, lambda c: c.total_ms),
        (_TTFT_SLO, ttft_slo, lambda c: c.ttft_ms),
        (choice.ENERGY_BUDGET, budget, lambda c: c.energy_j),
    )

    def together() -> str:  # each soft constraint alone can be met, not all together
        named = [
            text
            for value, text in (
                (slo, f"the SLO ({slo} ms)"),
                (ttft_slo, f"the TTFT SLO ({ttft_slo} ms)"),
                (budget, f"the energy budget ({budget} J)"),
            )
            if value is not None
        ]
        return f"none meets {', '.join(named[:-1])} and {named[-1]} together"

    return _CHOOSER.why_best_effort(candidates, best_effort, limits, together)


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
    verdict = _CHOOSER.decide(
        objective, evaluated, lambda candidates, broken, effort: _why_infeasible(candidates, broken, policy, effort)
    )
    return LlmDecision(objective=objective, **verdict._asdict())


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


@dataclass(frozen=True)
class ResumeChoice:
    """How the device goes on from a generation a node handed over."""

    ship: bool             # fetch the node's KV state (else evaluate the tokens here)
    ship_ms: float         # predicted: RTT + the state over the downlink
    evaluate_ms: float     # predicted: the prompt in batches, then each streamed token one decode at a time
    why: str


def resume_from_state(state_bytes: int, link: Link | None, *, prompt_tokens: int, streamed_tokens: int,
                      prompt_tok_s: float, decode_tok_s: float) -> ResumeChoice:
    """Fetch a handed-over KV state or evaluate its tokens on the device,
    whichever is predicted to take less time. Loading KV over the network
    beats recomputing it when the link moves the state faster than the
    device can rebuild it (CacheGen, Liu et al., SIGCOMM'24, makes that
    comparison for long contexts). Both ways the last streamed token is
    evaluated on the device, so neither side counts it. With no measured
    link or device speed there is nothing to compare: evaluate, which costs
    no transfer and cannot fail on the link."""
    _tokens("resume_from_state.prompt_tokens", prompt_tokens)
    count("resume_from_state.streamed_tokens", streamed_tokens, "tokens")
    count("resume_from_state.state_bytes", state_bytes, "bytes")
    replayed = max(streamed_tokens - 1, 0)
    evaluate_ms = (prompt_tokens / prompt_tok_s + replayed / decode_tok_s) * 1e3 \
        if prompt_tok_s > 0 and decode_tok_s > 0 else math.inf
    ship_ms = link.rtt_ms + 8 * state_bytes / (link.downlink_mbps * 1e3) if link is not None else math.inf
    if math.isinf(ship_ms) or math.isinf(evaluate_ms):
        missing = "link" if link is None else "device speed"
        return ResumeChoice(False, ship_ms, evaluate_ms, f"no measured {missing} to compare: evaluating the tokens")
    tokens = f"{prompt_tokens} prompt + {replayed} streamed tokens"
    if ship_ms < evaluate_ms:
        return ResumeChoice(True, ship_ms, evaluate_ms, f"fetching the node's KV state ({state_bytes / 1e6:.1f} MB, "
                            f"predicted {ship_ms:.0f} ms) rather than evaluating {tokens} ({evaluate_ms:.0f} ms)")
    return ResumeChoice(False, ship_ms, evaluate_ms, f"evaluating {tokens} ({evaluate_ms:.0f} ms) rather than fetching "
                        f"the node's KV state ({state_bytes / 1e6:.1f} MB, predicted {ship_ms:.0f} ms)")
