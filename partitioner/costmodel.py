"""Latency and device-energy cost model: LOCAL, SPLIT(k) or REMOTE, and why.

Pure decision logic: frozen dataclasses in, a :class:`Decision` with its
reasons out. No I/O, no clock, no randomness: the same inputs always give the
same decision. The daemon gathers profiles, link estimates and node load;
this module only decides (see DESIGN.md, "The partitioner's model").

A model is a chain of n segments. A plan runs the first k on the edge device
and the rest on one cloud node: k = n is LOCAL, 0 < k < n is SPLIT(k), k = 0
is REMOTE. Units: ms, bytes, Mbit/s (1e6 bit/s), W, J.

For k < n, with c = crossings[k] (what crosses the cut), o = output (the
results coming back) and the node's link L::

    edge(k)  = sum(t_E[:k]) + [k > 0] * edge_overhead      (one onnxruntime run)
    up(k)    = 8 * c.wire_bytes / (L.uplink_mbps * 1e6) * 1e3
    down     = 8 * o.wire_bytes / (L.downlink_mbps * 1e6) * 1e3
    net(k)   = L.rtt + up(k) + down
    cloud(k) = q_C + sum(t_C[k:]) + cloud_overhead + c.decode + o.encode

    T(k) = edge(k) + c.encode + net(k) + cloud(k) + o.decode
    J(k) = [ P_active * (edge(k) + c.encode + o.decode)    device computing
           + P_tx(L.uplink_mbps) * up(k)                     radio sending
           + P_idle * (L.rtt + down + cloud(k)) ] / 1e3      device waiting
    P_tx(B) = alpha * B + beta                  (Huang et al., MobiSys'12)

LOCAL: T(n) = edge(n) and J(n) = P_active * edge(n) / 1e3.

The device is charged idle power while it receives the results: they are
small next to what goes up, and Huang et al.'s downlink term would need a
second radio model for a few kilobytes.

Objectives: LATENCY minimises T, ENERGY minimises J, WEIGHTED minimises
``w * T(k) / T(n) + (1 - w) * J(k) / J(n)``. Dividing by LOCAL's own
prediction cancels the units (ms and J cannot be added), so ``w`` is a plain
share and LOCAL always scores 1: a score below 1 reads "better than staying
on the device". LOCAL is the reference even when a constraint rules it out,
because it is only a unit there, never a candidate.

Constraints: hard ones (memory limit, privacy floor, allowed cuts, remote
allowed) and soft ones (SLO, energy budget) all make a candidate infeasible;
``Decision.best_effort`` ignores the soft ones, so a caller whose SLO cannot
be met still has the best plan it may legally run.
"""

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

# Scores closer than this (relative) count as a tie; see _pick for who wins.
TIE_REL_TOL = 1e-9

LOCAL = "local"
SPLIT = "split"
REMOTE = "remote"


class Objective(str, Enum):
    LATENCY = "latency"
    ENERGY = "energy"
    WEIGHTED = "weighted"


# --- input validation helpers -------------------------------------------------


def _set(obj: object, name: str, value: object) -> None:
    """Store a normalised value on a frozen dataclass from __post_init__."""
    object.__setattr__(obj, name, value)


def _number(where: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return number


def _non_negative(where: str, value: object, unit: str) -> float:
    number = _number(where, value)
    if number < 0:
        raise ValueError(f"{where} must be >= 0 {unit}, got {value!r}")
    return number


def _positive(where: str, value: object, unit: str) -> float:
    number = _number(where, value)
    if number <= 0:
        raise ValueError(f"{where} must be > 0 {unit}, got {value!r}")
    return number


def _count(where: str, value: object, unit: str) -> int:
    try:
        count = operator.index(value)  # accepts numpy integers, refuses 1.5
    except TypeError:
        raise ValueError(f"{where} must be an integer number of {unit}, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{where} must be >= 0 {unit}, got {value!r}")
    return count


def _times(where: str, values: Iterable[object]) -> tuple[float, ...]:
    return tuple(_non_negative(f"{where}[{i}]", v, "ms") for i, v in enumerate(values))


def _bandwidth(where: str, value: object) -> float:
    number = _number(where, value)
    if number <= 0:
        raise ValueError(
            f"{where} must be > 0 Mbit/s, got {value!r}: zero bandwidth is not allowed, "
            "since a link that carries nothing cannot serve SPLIT or REMOTE; leave the node "
            "out of `clouds` (or set Constraints(allow_remote=False)) instead"
        )
    return number


# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A measured link from the edge device to one cloud node."""

    uplink_mbps: float  # edge -> cloud throughput, Mbit/s (1e6 bit/s); > 0
    downlink_mbps: float  # cloud -> edge throughput, Mbit/s; > 0
    rtt_ms: float  # round-trip time, ms

    def __post_init__(self) -> None:
        _set(self, "uplink_mbps", _bandwidth("Link.uplink_mbps", self.uplink_mbps))
        _set(self, "downlink_mbps", _bandwidth("Link.downlink_mbps", self.downlink_mbps))
        _set(self, "rtt_ms", _non_negative("Link.rtt_ms", self.rtt_ms, "ms"))


@dataclass(frozen=True)
class Power:
    """The edge device's power model."""

    active_w: float  # board power while computing, W
    idle_w: float  # board power while waiting for the cloud, W
    radio_alpha_w_per_mbps: float  # uplink radio P_tx = alpha * uplink_mbps + beta
    radio_beta_w: float  # (Huang et al., MobiSys'12), W per Mbit/s and W

    def __post_init__(self) -> None:
        _set(self, "active_w", _non_negative("Power.active_w", self.active_w, "W"))
        _set(self, "idle_w", _non_negative("Power.idle_w", self.idle_w, "W"))
        _set(
            self,
            "radio_alpha_w_per_mbps",
            _non_negative("Power.radio_alpha_w_per_mbps", self.radio_alpha_w_per_mbps, "W per Mbit/s"),
        )
        _set(self, "radio_beta_w", _non_negative("Power.radio_beta_w", self.radio_beta_w, "W"))


@dataclass(frozen=True)
class Transfer:
    """The tensors crossing the wire at one point, after the codec."""

    wire_bytes: int  # bytes on the wire
    encode_ms: float  # codec time on the sender, ms
    decode_ms: float  # codec time on the receiver, ms

    def __post_init__(self) -> None:
        _set(self, "wire_bytes", _count("Transfer.wire_bytes", self.wire_bytes, "bytes"))
        _set(self, "encode_ms", _non_negative("Transfer.encode_ms", self.encode_ms, "ms"))
        _set(self, "decode_ms", _non_negative("Transfer.decode_ms", self.decode_ms, "ms"))


@dataclass(frozen=True)
class ModelCosts:
    """What the planner knows of one model on the edge device (n segments)."""

    edge_segment_ms: tuple[float, ...]  # n measured or predicted edge times, ms
    edge_overhead_ms: float  # fixed cost of one onnxruntime run on the edge (added once when k > 0), ms
    crossings: tuple[Transfer, ...]  # n: [0] = model inputs (REMOTE), [k] = the cut after k segments
    output: Transfer  # results coming back from the cloud
    edge_memory_bytes: tuple[int, ...]  # n + 1: device memory to run k segments locally, k = 0..n

    def __post_init__(self) -> None:
        segments = _times("ModelCosts.edge_segment_ms", self.edge_segment_ms)
        n = len(segments)
        if n == 0:
            raise ValueError("ModelCosts.edge_segment_ms must list at least one segment")
        crossings = tuple(self.crossings)
        if len(crossings) != n:
            raise ValueError(
                f"ModelCosts.crossings must have one entry per segment (n = {n}: model inputs, "
                f"then the cut after each of segments 1..{n - 1}), got {len(crossings)}"
            )
        memory = tuple(
            _count(f"ModelCosts.edge_memory_bytes[{k}]", m, "bytes") for k, m in enumerate(self.edge_memory_bytes)
        )
        if len(memory) != n + 1:
            raise ValueError(
                f"ModelCosts.edge_memory_bytes must have n + 1 = {n + 1} entries (k = 0..{n} segments "
                f"on the device), got {len(memory)}"
            )
        _set(self, "edge_segment_ms", segments)
        _set(self, "edge_overhead_ms", _non_negative("ModelCosts.edge_overhead_ms", self.edge_overhead_ms, "ms"))
        _set(self, "crossings", crossings)
        _set(self, "edge_memory_bytes", memory)

    @property
    def n(self) -> int:
        """Number of segments in the chain."""
        return len(self.edge_segment_ms)


@dataclass(frozen=True)
class CloudOption:
    """One cloud node as the planner sees it for this model."""

    node: str  # node name, unique among the options
    link: Link  # measured link from the device to this node
    queue_ms: float  # the node's reported queue delay, ms
    segment_ms: tuple[float, ...]  # n segment times measured on this node, ms
    overhead_ms: float  # fixed cost of one run on this node, ms

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"CloudOption.node must be a non-empty name, got {self.node!r}")
        _set(self, "queue_ms", _non_negative(f"CloudOption({self.node}).queue_ms", self.queue_ms, "ms"))
        _set(self, "segment_ms", _times(f"CloudOption({self.node}).segment_ms", self.segment_ms))
        _set(self, "overhead_ms", _non_negative(f"CloudOption({self.node}).overhead_ms", self.overhead_ms, "ms"))


@dataclass(frozen=True)
class Constraints:
    """What a plan must satisfy. Hard ones are never relaxed; soft ones are by best_effort."""

    slo_ms: float | None = None  # soft: predicted T must not exceed this, ms
    energy_budget_j: float | None = None  # soft: predicted device energy must not exceed this, J
    memory_limit_bytes: int | None = None  # hard: device memory for the local part, bytes
    privacy_min_local: int = 0  # hard: at least this many segments on the device (> 0 forbids REMOTE)
    allowed_cuts: frozenset[int] | None = None  # hard: SPLIT only at these k; None = all
    allow_remote: bool = True  # hard: False forbids SPLIT and REMOTE

    def __post_init__(self) -> None:
        if self.slo_ms is not None:
            _set(self, "slo_ms", _positive("Constraints.slo_ms", self.slo_ms, "ms"))
        if self.energy_budget_j is not None:
            _set(self, "energy_budget_j", _positive("Constraints.energy_budget_j", self.energy_budget_j, "J"))
        if self.memory_limit_bytes is not None:
            _set(
                self,
                "memory_limit_bytes",
                _count("Constraints.memory_limit_bytes", self.memory_limit_bytes, "bytes"),
            )
        _set(
            self,
            "privacy_min_local",
            _count("Constraints.privacy_min_local", self.privacy_min_local, "segments"),
        )
        if self.allowed_cuts is not None:
            cuts = frozenset(_count("Constraints.allowed_cuts", k, "segments") for k in self.allowed_cuts)
            _set(self, "allowed_cuts", cuts)
        if not isinstance(self.allow_remote, bool):
            raise ValueError(f"Constraints.allow_remote must be True or False, got {self.allow_remote!r}")


# --- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class StagePrediction:
    """Predicted time of each stage of one plan, ms (see the module docstring)."""

    edge_ms: float  # segments run on the device, plus one run's overhead
    encode_ms: float  # codec on the device for what goes up
    network_ms: float  # rtt + uplink + downlink
    cloud_ms: float  # queue + segments + overhead + decode of what came up + encode of the results
    decode_ms: float  # codec on the device for the results
    total_ms: float  # T(k)


@dataclass(frozen=True)
class Candidate:
    """One plan with its predictions and what rules it out."""

    kind: str  # "local" | "split" | "remote"
    k: int  # segments on the edge: n for local, 0 for remote
    node: str | None  # cloud node, None for local
    stages: StagePrediction
    energy_j: float  # J(k), device energy
    score: float  # what the objective minimises
    violations: tuple[str, ...]  # human-readable, hard ones first
    hard_violation: bool  # True if any violation is of a hard constraint
    memory_bytes: int  # device memory for the local part
    uplink_bytes: int  # bytes sent from the device

    @property
    def label(self) -> str:
        return f"{SPLIT}:{self.k}" if self.kind == SPLIT else self.kind

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Decision:
    """The chosen plan, every candidate considered, and why."""

    winner: Candidate | None  # None when no candidate is feasible
    best_effort: Candidate | None  # best meeting the hard constraints, soft ones ignored
    candidates: tuple[Candidate, ...]  # local, then per node: remote, split:1..n-1
    objective: Objective
    why: str  # why the winner won, or why nothing is feasible

    @property
    def feasible(self) -> bool:
        return self.winner is not None


# --- the model ----------------------------------------------------------------


def _objective(objective: object) -> Objective:
    try:
        return Objective(objective)
    except ValueError:
        names = ", ".join(repr(o.value) for o in Objective)
        raise ValueError(f"objective must be one of {names}, got {objective!r}") from None


def _check_against_model(
    costs: ModelCosts, clouds: Sequence[CloudOption], constraints: Constraints, weight_latency: object
) -> float:
    """Cross-checks that need n; returns the validated weight."""
    weight = _number("weight_latency", weight_latency)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight_latency must be in [0, 1], got {weight_latency!r}")
    n = costs.n
    seen: set[str] = set()
    for cloud in clouds:
        if len(cloud.segment_ms) != n:
            raise ValueError(
                f"CloudOption({cloud.node}).segment_ms has {len(cloud.segment_ms)} entries, "
                f"the model has n = {n} segments"
            )
        if cloud.node in seen:
            raise ValueError(f"cloud node {cloud.node!r} is listed twice")
        seen.add(cloud.node)
    if constraints.privacy_min_local > n:
        raise ValueError(
            f"Constraints.privacy_min_local = {constraints.privacy_min_local} exceeds the model's "
            f"n = {n} segments: no plan could keep that many on the device"
        )
    if constraints.allowed_cuts is not None:
        outside = sorted(k for k in constraints.allowed_cuts if not 0 < k < n)
        if outside:
            raise ValueError(
                f"Constraints.allowed_cuts {outside} are not cuts of a {n}-segment model "
                f"(a SPLIT runs k = 1..{n - 1} segments on the device)"
            )
    return weight


def _local(costs: ModelCosts, power: Power) -> tuple[StagePrediction, float]:
    edge = sum(costs.edge_segment_ms) + costs.edge_overhead_ms
    stages = StagePrediction(edge_ms=edge, encode_ms=0.0, network_ms=0.0, cloud_ms=0.0, decode_ms=0.0, total_ms=edge)
    return stages, power.active_w * edge / 1e3


def _offloaded(costs: ModelCosts, power: Power, k: int, cloud: CloudOption) -> tuple[StagePrediction, float]:
    """T(k) and J(k) for k < n on one node, term by term as in the module docstring."""
    cut, out, link = costs.crossings[k], costs.output, cloud.link
    edge = sum(costs.edge_segment_ms[:k]) + (costs.edge_overhead_ms if k > 0 else 0.0)
    uplink = cut.wire_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
    downlink = out.wire_bytes * 8 / (link.downlink_mbps * 1e6) * 1e3
    network = link.rtt_ms + uplink + downlink
    remote = cloud.queue_ms + sum(cloud.segment_ms[k:]) + cloud.overhead_ms + cut.decode_ms + out.encode_ms
    total = edge + cut.encode_ms + network + remote + out.decode_ms
    radio_w = power.radio_alpha_w_per_mbps * link.uplink_mbps + power.radio_beta_w
    energy = (
        power.active_w * (edge + cut.encode_ms + out.decode_ms)
        + radio_w * uplink
        + power.idle_w * (link.rtt_ms + downlink + remote)
    ) / 1e3
    stages = StagePrediction(
        edge_ms=edge,
        encode_ms=cut.encode_ms,
        network_ms=network,
        cloud_ms=remote,
        decode_ms=out.decode_ms,
        total_ms=total,
    )
    return stages, energy


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _violations(
    constraints: Constraints, kind: str, k: int, total_ms: float, energy_j: float, memory_bytes: int
) -> list[tuple[str, str, bool]]:
    """(constraint, message, hard) for each constraint the plan breaks, hard ones first."""
    found: list[tuple[str, str, bool]] = []
    limit = constraints.memory_limit_bytes
    if limit is not None and memory_bytes > limit:
        found.append(("memory limit", f"memory {memory_bytes} B > limit {limit} B", True))
    floor = constraints.privacy_min_local
    if k < floor:
        found.append(("privacy floor", f"privacy: {_plural(k, 'segment')} on the device < floor {floor}", True))
    if kind != LOCAL and not constraints.allow_remote:
        found.append(("remote not allowed", "remote execution not allowed", True))
    cuts = constraints.allowed_cuts
    if kind == SPLIT and cuts is not None and k not in cuts:
        found.append(("allowed cuts", f"cut {k} not in allowed cuts {sorted(cuts)}", True))
    slo = constraints.slo_ms
    if slo is not None and total_ms > slo:
        found.append(("SLO", f"latency {total_ms:.1f} ms > SLO {slo:.1f} ms", False))
    budget = constraints.energy_budget_j
    if budget is not None and energy_j > budget:
        found.append(("energy budget", f"energy {energy_j:.4g} J > budget {budget:.4g} J", False))
    return found


def _evaluate(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    objective: object,
    weight_latency: object,
    constraints: Constraints,
) -> tuple[Objective, list[tuple[Candidate, tuple[tuple[str, bool], ...]]]]:
    """Every candidate with the (name, hard) of each constraint it breaks."""
    objective = _objective(objective)
    weight = _check_against_model(costs, clouds, constraints, weight_latency)
    n = costs.n
    local_stages, local_j = _local(costs, power)
    if objective is Objective.WEIGHTED and (local_stages.total_ms <= 0 or local_j <= 0):
        raise ValueError(
            "the weighted objective divides by the LOCAL plan's predicted latency and energy, "
            f"which are {local_stages.total_ms!r} ms and {local_j!r} J here: both must be > 0"
        )

    def score(total_ms: float, energy_j: float) -> float:
        if objective is Objective.LATENCY:
            return total_ms
        if objective is Objective.ENERGY:
            return energy_j
        return weight * total_ms / local_stages.total_ms + (1 - weight) * energy_j / local_j

    plans: list[tuple[str, int, CloudOption | None]] = [(LOCAL, n, None)]
    for cloud in clouds:
        plans.append((REMOTE, 0, cloud))
        plans.extend((SPLIT, k, cloud) for k in range(1, n))

    evaluated = []
    for kind, k, cloud in plans:
        stages, energy = (local_stages, local_j) if cloud is None else _offloaded(costs, power, k, cloud)
        memory = costs.edge_memory_bytes[k]
        broken = _violations(constraints, kind, k, stages.total_ms, energy, memory)
        candidate = Candidate(
            kind=kind,
            k=k,
            node=None if cloud is None else cloud.node,
            stages=stages,
            energy_j=energy,
            score=score(stages.total_ms, energy),
            violations=tuple(message for _, message, _ in broken),
            hard_violation=any(hard for _, _, hard in broken),
            memory_bytes=memory,
            uplink_bytes=0 if cloud is None else costs.crossings[k].wire_bytes,
        )
        evaluated.append((candidate, tuple((name, hard) for name, _, hard in broken)))
    return objective, evaluated


def evaluate(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    constraints: Constraints = Constraints(),
) -> tuple[Candidate, ...]:
    """Every candidate plan, predicted and checked: local, then per node remote, split:1..n-1."""
    _, evaluated = _evaluate(costs, clouds, power, objective, weight_latency, constraints)
    return tuple(candidate for candidate, _ in evaluated)


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_REL_TOL * max(abs(a), abs(b))


def _pick(candidates: Sequence[Candidate], pool: Sequence[int]) -> int | None:
    """Index of the lowest score in pool, or None if pool is empty.

    Among scores within TIE_REL_TOL, the plan with more segments on the device
    wins: it exposes less data and depends less on the network for the same
    predicted cost. Then the node listed first in `clouds` wins, the caller's
    own preference order (candidates are built in that order, so the index
    says it).
    """
    if not pool:
        return None
    best = min(candidates[i].score for i in pool)
    tied = [i for i in pool if _tied(candidates[i].score, best)]
    return min(tied, key=lambda i: (-candidates[i].k, i))


def _name(candidate: Candidate) -> str:
    return candidate.label if candidate.node is None else f"{candidate.label} on {candidate.node}"


def _metric(objective: Objective, candidate: Candidate) -> str:
    total, energy = candidate.stages.total_ms, candidate.energy_j
    if objective is Objective.LATENCY:
        return f"{total:.1f} ms"
    if objective is Objective.ENERGY:
        return f"{energy:.4g} J"
    return f"score {candidate.score:.4g} ({total:.1f} ms, {energy:.4g} J)"


def _tally(broken: Sequence[tuple[tuple[str, bool], ...]], *, hard_only: bool = False) -> str:
    """'SLO: 3, memory limit: 1': how many candidates each constraint rules out."""
    counts: dict[str, int] = {}
    for names in broken:
        for name, hard in names:
            if hard or not hard_only:
                counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name}: {count}" for name, count in counts.items())


def _why_winner(
    objective: Objective, candidates: Sequence[Candidate], broken: Sequence[tuple[tuple[str, bool], ...]], win: int
) -> str:
    winner = candidates[win]
    feasible = [i for i, c in enumerate(candidates) if c.feasible and i != win]
    runner = _pick(candidates, feasible)
    scale = " (local = 1)" if objective is Objective.WEIGHTED else ""
    why = f"{_name(winner)} wins on {objective.value}{scale} at {_metric(objective, winner)}"
    if runner is None:
        why += ", the only feasible plan."
    else:
        other = candidates[runner]
        if _tied(winner.score, other.score):
            rule = "more segments on the device" if winner.k > other.k else "the node listed first"
            why += f", tied with {_name(other)}: the tie goes to {rule}."
        else:
            why += f", ahead of {_name(other)} at {_metric(objective, other)}."
    ruled_out = [broken[i] for i, c in enumerate(candidates) if not c.feasible]
    if ruled_out:
        why += f" {len(ruled_out)} of {len(candidates)} plans ruled out ({_tally(ruled_out)})."
    return why


def _why_infeasible(
    candidates: Sequence[Candidate],
    broken: Sequence[tuple[tuple[str, bool], ...]],
    constraints: Constraints,
    best_effort: int | None,
) -> str:
    if best_effort is None:
        local = candidates[0]
        return (
            f"No plan is feasible: all {len(candidates)} plans break a hard constraint "
            f"({_tally(broken, hard_only=True)}). "
            f"Local breaks: {'; '.join(local.violations)}."
        )
    allowed = [i for i, c in enumerate(candidates) if not c.hard_violation]
    slo, budget = constraints.slo_ms, constraints.energy_budget_j
    binding = []
    if slo is not None and all(candidates[i].stages.total_ms > slo for i in allowed):
        fastest = candidates[min(allowed, key=lambda i: (candidates[i].stages.total_ms, -candidates[i].k, i))]
        binding.append(f"the fastest, {_name(fastest)}, needs {fastest.stages.total_ms:.1f} ms > SLO {slo:.1f} ms")
    if budget is not None and all(candidates[i].energy_j > budget for i in allowed):
        frugal = candidates[min(allowed, key=lambda i: (candidates[i].energy_j, -candidates[i].k, i))]
        binding.append(f"the most frugal, {_name(frugal)}, needs {frugal.energy_j:.4g} J > budget {budget:.4g} J")
    if not binding:  # each soft constraint alone can be met, both together cannot
        binding.append(f"none meets both the SLO ({slo:.1f} ms) and the energy budget ({budget:.4g} J)")
    chosen = candidates[best_effort]
    return (
        f"No plan is feasible: of the {_plural(len(allowed), 'plan')} the hard constraints allow, "
        f"{' and '.join(binding)}. Best effort, ignoring the soft constraints: {_name(chosen)} "
        f"({chosen.stages.total_ms:.1f} ms, {chosen.energy_j:.4g} J)."
    )


def choose(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    constraints: Constraints = Constraints(),
) -> Decision:
    """The feasible plan with the lowest score, every candidate, and why."""
    objective, evaluated = _evaluate(costs, clouds, power, objective, weight_latency, constraints)
    candidates = tuple(candidate for candidate, _ in evaluated)
    broken = [names for _, names in evaluated]
    win = _pick(candidates, [i for i, c in enumerate(candidates) if c.feasible])
    effort = _pick(candidates, [i for i, c in enumerate(candidates) if not c.hard_violation])
    if win is None:
        why = _why_infeasible(candidates, broken, constraints, effort)
    else:
        why = _why_winner(objective, candidates, broken, win)
    return Decision(
        winner=None if win is None else candidates[win],
        best_effort=None if effort is None else candidates[effort],
        candidates=candidates,
        objective=objective,
        why=why,
    )
