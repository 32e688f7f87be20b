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

Every plan also pays ``request_ms``, the device's time per request outside
these stages (decoding the request, encoding the reply), learned from
completed requests: it moves no decision, but makes T what the app sees.

The device is charged idle power while it receives the results: they are
small next to what goes up, and Huang et al.'s downlink term would need a
second radio model for a few kilobytes.

Objectives: LATENCY minimises T, ENERGY minimises J, WEIGHTED minimises
``w * T(k) / T(n) + (1 - w) * J(k) / J(n)``. Dividing by LOCAL's own
prediction cancels the units (ms and J cannot be added), so ``w`` is a plain
share and LOCAL always scores 1: a score below 1 reads "better than staying
on the device". LOCAL is the reference even when a constraint rules it out,
because it is only a unit there, never a candidate.

Two kinds of candidate extend the chain:

- a codec chosen per request (``CodecOption``): the same plans under fp16 or
  int8, only at the k where that codec's measured output error fits the
  budget, labelled "split:5+int8";
- a DAG cut (``DagCut``, see ``partitioner.dag_plan``): a device side that is
  no prefix of the chain, priced by the same T(k) and J(k) with its own edge,
  cloud and crossing figures, labelled "split:<key>", and offered only where
  it beats the node's best chain split by ``dag_min_gain``.

Constraints: hard ones (memory limit, privacy floor, allowed cuts, remote
allowed) and soft ones (SLO, energy budget) all make a candidate infeasible;
``Decision.best_effort`` ignores the soft ones, so a caller whose SLO cannot
be met still has the best plan it may legally run.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from partitioner import choice
from partitioner.choice import TIE_REL_TOL as TIE_REL_TOL  # re-exported: this module's public name
from partitioner.choice import Objective, count, non_negative, positive, set_field

# A DAG cut is offered only when it beats the best chain split on its node by
# more than this share: a new cut costs a session build on both sides, and a
# gain smaller than the link estimate's wobble is not one.
DAG_MIN_GAIN = 0.05

LOCAL = "local"
SPLIT = "split"
REMOTE = "remote"

# --- input validation helpers -------------------------------------------------


def _times(where: str, values: Iterable[object]) -> tuple[float, ...]:
    return tuple(non_negative(f"{where}[{i}]", v, "ms") for i, v in enumerate(values))


_NO_BANDWIDTH = (
    ": zero bandwidth is not allowed, since a link that carries nothing cannot serve SPLIT or REMOTE; "
    "leave the node out of `clouds` (or set Constraints(allow_remote=False)) instead"
)


def _bandwidth(where: str, value: object) -> float:
    return positive(where, value, "Mbit/s", _NO_BANDWIDTH)


# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A measured link from the edge device to one cloud node."""

    uplink_mbps: float  # edge -> cloud throughput, Mbit/s (1e6 bit/s); > 0
    downlink_mbps: float  # cloud -> edge throughput, Mbit/s; > 0
    rtt_ms: float  # round-trip time, ms

    def __post_init__(self) -> None:
        set_field(self, "uplink_mbps", _bandwidth("Link.uplink_mbps", self.uplink_mbps))
        set_field(self, "downlink_mbps", _bandwidth("Link.downlink_mbps", self.downlink_mbps))
        set_field(self, "rtt_ms", non_negative("Link.rtt_ms", self.rtt_ms, "ms"))

    def __str__(self) -> str:  # how logs show it
        return f"up {self.uplink_mbps:.4g} Mbit/s, down {self.downlink_mbps:.4g} Mbit/s, RTT {self.rtt_ms:.3g} ms"


@dataclass(frozen=True)
class Power:
    """The edge device's power model."""

    active_w: float  # board power while computing, W
    idle_w: float  # board power while waiting for the cloud, W
    radio_alpha_w_per_mbps: float  # uplink radio P_tx = alpha * uplink_mbps + beta
    radio_beta_w: float  # (Huang et al., MobiSys'12), W per Mbit/s and W

    def __post_init__(self) -> None:
        set_field(self, "active_w", non_negative("Power.active_w", self.active_w, "W"))
        set_field(self, "idle_w", non_negative("Power.idle_w", self.idle_w, "W"))
        set_field(
            self,
            "radio_alpha_w_per_mbps",
            non_negative("Power.radio_alpha_w_per_mbps", self.radio_alpha_w_per_mbps, "W per Mbit/s"),
        )
        set_field(self, "radio_beta_w", non_negative("Power.radio_beta_w", self.radio_beta_w, "W"))


@dataclass(frozen=True)
class Transfer:
    """The tensors crossing the wire at one point, after the codec."""

    wire_bytes: int  # bytes on the wire
    encode_ms: float  # codec time on the sender, ms
    decode_ms: float  # codec time on the receiver, ms

    def __post_init__(self) -> None:
        set_field(self, "wire_bytes", count("Transfer.wire_bytes", self.wire_bytes, "bytes"))
        set_field(self, "encode_ms", non_negative("Transfer.encode_ms", self.encode_ms, "ms"))
        set_field(self, "decode_ms", non_negative("Transfer.decode_ms", self.decode_ms, "ms"))


@dataclass(frozen=True)
class ModelCosts:
    """What the planner knows of one model on the edge device (n segments)."""

    edge_segment_ms: tuple[float, ...]  # n measured or predicted edge times, ms
    edge_overhead_ms: float  # fixed cost of one onnxruntime run on the edge (added once when k > 0), ms
    crossings: tuple[Transfer, ...]  # n: [0] = model inputs (REMOTE), [k] = the cut after k segments
    output: Transfer  # results coming back from the cloud
    edge_memory_bytes: tuple[int, ...]  # n + 1: device memory to run k segments locally, k = 0..n
    request_ms: float = 0.0  # device time per request outside every stage (request decode, reply encode): every plan pays it

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
            count(f"ModelCosts.edge_memory_bytes[{k}]", m, "bytes") for k, m in enumerate(self.edge_memory_bytes)
        )
        if len(memory) != n + 1:
            raise ValueError(
                f"ModelCosts.edge_memory_bytes must have n + 1 = {n + 1} entries (k = 0..{n} segments "
                f"on the device), got {len(memory)}"
            )
        set_field(self, "edge_segment_ms", segments)
        set_field(self, "edge_overhead_ms", non_negative("ModelCosts.edge_overhead_ms", self.edge_overhead_ms, "ms"))
        set_field(self, "request_ms", non_negative("ModelCosts.request_ms", self.request_ms, "ms"))
        set_field(self, "crossings", crossings)
        set_field(self, "edge_memory_bytes", memory)

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
        set_field(self, "queue_ms", non_negative(f"CloudOption({self.node}).queue_ms", self.queue_ms, "ms"))
        set_field(self, "segment_ms", _times(f"CloudOption({self.node}).segment_ms", self.segment_ms))
        set_field(self, "overhead_ms", non_negative(f"CloudOption({self.node}).overhead_ms", self.overhead_ms, "ms"))


@dataclass(frozen=True)
class CodecOption:
    """A lossy codec the planner may choose per request, where its measured error fits the budget."""

    name: str                          # "fp16", "int8": appended to plan labels ("split:5+int8")
    encoding: int                      # its wire value (protos Encoding)
    crossings: tuple[Transfer, ...]    # n, as ModelCosts.crossings, under this codec
    output_error: tuple[float, ...]    # n: measured output error at each k (k = 0: the inputs, REMOTE)
    usable: frozenset[int]             # k where the error fits the budget (0 = REMOTE, 1..n-1 = SPLIT)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("CodecOption.name must not be empty")
        if len(self.crossings) != len(self.output_error):
            raise ValueError(f"CodecOption({self.name}): {len(self.crossings)} crossings, {len(self.output_error)} errors")


@dataclass(frozen=True)
class DagCut:
    """A SPLIT whose device side is not a prefix of the chain: a minimum s-t cut of the node DAG."""

    key: str                           # its identity (partitioner.graph.Cut.key); labels read "split:<key>"
    edge_ms: float                     # device compute of the device side, without the run overhead, ms
    rest_ms: float                     # device compute of the cloud side: what a local fallback still runs, ms
    crossing: Transfer                 # what crosses, under the decision's codec
    memory_bytes: int                  # device memory for the device side, bytes
    whole_segments: int                # leading chain segments wholly on the device (the privacy floor counts these)
    cloud_ms: Mapping[str, float]      # node -> compute of the cloud side on it, ms; nodes absent are not offered
    pinned: bool = False               # the caller asked for this cut: offered whatever its gain over the chain

    def __post_init__(self) -> None:
        set_field(self, "edge_ms", non_negative(f"DagCut({self.key}).edge_ms", self.edge_ms, "ms"))
        set_field(self, "rest_ms", non_negative(f"DagCut({self.key}).rest_ms", self.rest_ms, "ms"))
        set_field(self, "memory_bytes", count(f"DagCut({self.key}).memory_bytes", self.memory_bytes, "bytes"))


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
            set_field(self, "slo_ms", positive("Constraints.slo_ms", self.slo_ms, "ms"))
        if self.energy_budget_j is not None:
            set_field(self, "energy_budget_j", positive("Constraints.energy_budget_j", self.energy_budget_j, "J"))
        if self.memory_limit_bytes is not None:
            set_field(
                self,
                "memory_limit_bytes",
                count("Constraints.memory_limit_bytes", self.memory_limit_bytes, "bytes"),
            )
        set_field(
            self,
            "privacy_min_local",
            count("Constraints.privacy_min_local", self.privacy_min_local, "segments"),
        )
        if self.allowed_cuts is not None:
            cuts = frozenset(count("Constraints.allowed_cuts", k, "segments") for k in self.allowed_cuts)
            set_field(self, "allowed_cuts", cuts)
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
    rest_ms: float = 0.0  # device time to finish locally if the cloud fails (0 for local)
    codec: str = ""  # a codec chosen per request ("fp16", "int8"); "" = the decision's own
    encoding: int = 0  # that codec's wire value (0: the decision's own)
    output_error: float = 0.0  # measured output error the codec adds here (relative to each output's range)
    cut_key: str = ""  # a DAG cut's key; "" for chain cuts (k says which)

    @property
    def label(self) -> str:
        base = f"{SPLIT}:{self.cut_key or self.k}" if self.kind == SPLIT else self.kind
        return f"{base}+{self.codec}" if self.codec else base

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

    def plans(self, label: str) -> list[Candidate]:
        """The candidates labelled ``label`` ("split:5+int8"), one per node offering it."""
        return [c for c in self.candidates if c.label == label]

    def matching(self, kind: str, k: int | str | None, node: str) -> list[Candidate]:
        """The candidates of this kind at this k (a chain cut under any codec; None:
        any) or DAG cut key (a str), on ``node`` ("": any): what a pinned plan names."""
        def fits(c: Candidate) -> bool:
            if isinstance(k, str):
                return c.cut_key == k
            return k is None or (c.k == k and not c.cut_key)

        return [c for c in self.candidates if c.kind == kind and fits(c) and (not node or c.node == node)]


# --- the model ----------------------------------------------------------------


def _check_against_model(
    costs: ModelCosts, clouds: Sequence[CloudOption], constraints: Constraints, weight_latency: object,
    codecs: Sequence[CodecOption] = (), dag_cuts: Sequence[DagCut] = (),
) -> float:
    """Cross-checks that need n; returns the validated weight."""
    weight = choice.weight(weight_latency)
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
    for codec in codecs:
        if len(codec.crossings) != n:
            raise ValueError(f"CodecOption({codec.name}) has {len(codec.crossings)} crossings, the model has n = {n}")
    for dag in dag_cuts:
        if not 0 <= dag.whole_segments < n:
            raise ValueError(f"DagCut({dag.key}).whole_segments = {dag.whole_segments} is not within 0..{n - 1}")
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


class RunCosts(Protocol):
    """What pricing one offloaded plan reads of the model (ModelCosts has it)."""

    output: Transfer
    edge_overhead_ms: float
    request_ms: float


class NodeCosts(Protocol):
    """What pricing one offloaded plan reads of a node (CloudOption has it)."""

    link: Link
    queue_ms: float
    overhead_ms: float


def _local(costs: ModelCosts, power: Power) -> tuple[StagePrediction, float]:
    return _local_at(sum(costs.edge_segment_ms), costs, power)


def _local_at(compute_ms: float, costs: RunCosts, power: Power) -> tuple[StagePrediction, float]:
    """T(n) and J(n) of ``compute_ms`` of device compute in one run."""
    edge = compute_ms + costs.edge_overhead_ms
    total = edge + costs.request_ms
    stages = StagePrediction(edge_ms=edge, encode_ms=0.0, network_ms=0.0, cloud_ms=0.0, decode_ms=0.0, total_ms=total)
    return stages, power.active_w * total / 1e3


def _offloaded(costs: RunCosts, power: Power, cloud: NodeCosts, *, edge_compute_ms: float | None, cut: Transfer,
               cloud_compute_ms: float) -> tuple[StagePrediction, float]:
    """T and J of a plan that runs ``edge_compute_ms`` on the device (None:
    REMOTE), ships ``cut`` and runs ``cloud_compute_ms`` on one node, term by
    term as in the module docstring (there edge_compute_ms = sum(t_E[:k]) and
    cloud_compute_ms = sum(t_C[k:]))."""
    out, link = costs.output, cloud.link
    edge = 0.0 if edge_compute_ms is None else edge_compute_ms + costs.edge_overhead_ms
    uplink = cut.wire_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
    downlink = out.wire_bytes * 8 / (link.downlink_mbps * 1e6) * 1e3
    network = link.rtt_ms + uplink + downlink
    remote = cloud.queue_ms + cloud_compute_ms + cloud.overhead_ms + cut.decode_ms + out.encode_ms
    total = edge + cut.encode_ms + network + remote + out.decode_ms + costs.request_ms
    radio_w = power.radio_alpha_w_per_mbps * link.uplink_mbps + power.radio_beta_w
    energy = (
        power.active_w * (edge + cut.encode_ms + out.decode_ms + costs.request_ms)
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


def _violations(
    constraints: Constraints, kind: str, k: int, total_ms: float, energy_j: float, memory_bytes: int, *, chain: bool = True
) -> list[choice.Violation]:
    """Each constraint the plan breaks, hard ones first."""
    found: list[choice.Violation] = []
    limit = constraints.memory_limit_bytes
    if limit is not None and memory_bytes > limit:
        found.append(("memory limit", f"memory {memory_bytes} B > limit {limit} B", True))
    floor = constraints.privacy_min_local
    if k < floor:
        found.append(("privacy floor", f"privacy: {choice.plural(k, 'segment')} on the device < floor {floor}", True))
    if kind != LOCAL and not constraints.allow_remote:
        found.append(("remote not allowed", "remote execution not allowed", True))
    cuts = constraints.allowed_cuts
    if kind == SPLIT and cuts is not None and (not chain or k not in cuts):
        what = f"cut {k}" if chain else "a DAG cut"
        found.append(("allowed cuts", f"{what} not in allowed cuts {sorted(cuts)}", True))
    found += choice.SLO.breach(total_ms, constraints.slo_ms)
    found += choice.ENERGY_BUDGET.breach(energy_j, constraints.energy_budget_j)
    return found


def _evaluate(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    objective: object,
    weight_latency: object,
    constraints: Constraints,
    codecs: Sequence[CodecOption] = (),
    dag_cuts: Sequence[DagCut] = (),
    dag_min_gain: float = DAG_MIN_GAIN,
    keep: frozenset[str] = frozenset(),
) -> tuple[Objective, list[tuple[Candidate, choice.Broken]]]:
    """Every candidate with the (name, hard) of each constraint it breaks."""
    objective = choice.objective(objective)
    weight = _check_against_model(costs, clouds, constraints, weight_latency, codecs, dag_cuts)
    n = costs.n
    local_stages, local_j = _local(costs, power)
    if objective is Objective.WEIGHTED and (local_stages.total_ms <= 0 or local_j <= 0):
        raise ValueError(
            "the weighted objective divides by the LOCAL plan's predicted latency and energy, "
            f"which are {local_stages.total_ms!r} ms and {local_j!r} J here: both must be > 0"
        )

    evaluated = []

    def add(kind: str, k: int, cloud: CloudOption | None, stages: StagePrediction, energy: float, *,
            memory: int, uplink: int, rest_ms: float, codec: CodecOption | None = None, cut_key: str = "") -> None:
        broken = _violations(constraints, kind, k, stages.total_ms, energy, memory, chain=not cut_key)
        candidate = Candidate(
            kind=kind, k=k, node=None if cloud is None else cloud.node, stages=stages, energy_j=energy,
            score=choice.score(objective, weight, stages.total_ms, energy, local_stages.total_ms, local_j),
            violations=tuple(message for _, message, _ in broken), hard_violation=any(hard for _, _, hard in broken),
            memory_bytes=memory, uplink_bytes=uplink, rest_ms=rest_ms,
            codec=codec.name if codec else "", encoding=codec.encoding if codec else 0,
            output_error=codec.output_error[k] if codec and not cut_key else 0.0, cut_key=cut_key,
        )
        evaluated.append((candidate, tuple((name, hard) for name, _, hard in broken)))

    add(LOCAL, n, None, local_stages, local_j, memory=costs.edge_memory_bytes[n], uplink=0, rest_ms=0.0)
    edge_prefix = _prefix_sums(costs.edge_segment_ms)
    for cloud in clouds:
        cloud_suffix = _suffix_sums(cloud.segment_ms)
        for codec in (None, *codecs):
            crossings = costs.crossings if codec is None else codec.crossings
            priced = []
            for k in range(n):
                if codec is not None and k not in codec.usable:
                    continue
                stages, energy = _offloaded(costs, power, cloud, edge_compute_ms=edge_prefix[k] if k else None,
                                            cut=crossings[k], cloud_compute_ms=cloud_suffix[k])
                priced.append((k, stages, energy))
            if codec is not None:
                # Of a codec's plans only its best on this node is a candidate: the others
                # could never win (the raw plans at the same cuts stay listed), and listing
                # every cut under every codec tripled the planner's cost per request.
                best = _best_priced(priced, costs, constraints, objective, weight, local_stages.total_ms, local_j)
                # the plan requests run now stays priced, so hysteresis can weigh it against the best
                held = [item for item in priced if item not in best and _codec_label(item[0], codec) in keep]
                priced = best + held
            for k, stages, energy in priced:
                add(SPLIT if k else REMOTE, k, cloud, stages, energy, memory=costs.edge_memory_bytes[k],
                    uplink=crossings[k].wire_bytes, rest_ms=edge_prefix[n] - edge_prefix[k] + costs.edge_overhead_ms,
                    codec=codec)
        # against the best chain split the policy allows: a DAG cut matters most where
        # the cheap chain splits break a hard rule (a privacy floor, memory)
        chain_best = min((c.score for c, _ in evaluated if c.node == cloud.node and c.kind == SPLIT
                          and not c.hard_violation), default=math.inf)
        for dag in dag_cuts:
            if cloud.node not in dag.cloud_ms:
                continue
            stages, energy = _offloaded(costs, power, cloud, edge_compute_ms=dag.edge_ms, cut=dag.crossing,
                                        cloud_compute_ms=dag.cloud_ms[cloud.node])
            score = choice.score(objective, weight, stages.total_ms, energy, local_stages.total_ms, local_j)
            if not dag.pinned and f"{SPLIT}:{dag.key}" not in keep and score >= chain_best * (1 - dag_min_gain):
                continue  # within noise of a chain cut: not worth a new cut's cold sessions on both sides
            add(SPLIT, dag.whole_segments, cloud, stages, energy, memory=dag.memory_bytes,
                uplink=dag.crossing.wire_bytes, rest_ms=dag.rest_ms + costs.edge_overhead_ms, cut_key=dag.key)
    return objective, evaluated


def _codec_label(k: int, codec: CodecOption) -> str:
    return f"{SPLIT}:{k}+{codec.name}" if k else f"{REMOTE}+{codec.name}"


def _best_priced(priced: list[tuple[int, StagePrediction, float]], costs: ModelCosts, constraints: Constraints,
                 objective: Objective, weight: float, local_ms: float, local_j: float) -> list[tuple[int, StagePrediction, float]]:
    """The one (k, stages, energy) the chooser would take among these: the lowest
    score (more segments on the device on a tie) that meets every constraint,
    else the lowest that meets the hard ones, else the lowest. Scores first and
    constraints only in that order, since the best one usually meets them."""
    ordered = sorted(priced, key=lambda item: (
        choice.score(objective, weight, item[1].total_ms, item[2], local_ms, local_j), -item[0]))
    fallback = None
    for k, stages, energy in ordered:
        broken = _violations(constraints, SPLIT if k else REMOTE, k, stages.total_ms, energy, costs.edge_memory_bytes[k])
        if not broken:
            return [(k, stages, energy)]
        if fallback is None and not any(hard for _, _, hard in broken):
            fallback = (k, stages, energy)
    return [fallback or ordered[0]] if ordered else []


def _prefix_sums(values: Sequence[float]) -> list[float]:
    """[0, v0, v0+v1, ...]: sum(values[:k]) for k = 0..n in one pass."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return sums


def _suffix_sums(values: Sequence[float]) -> list[float]:
    """sum(values[k:]) for k = 0..n."""
    sums = [0.0]
    for v in reversed(values):
        sums.append(sums[-1] + v)
    return sums[::-1]


def evaluate(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    constraints: Constraints = Constraints(),
    codecs: Sequence[CodecOption] = (),
    dag_cuts: Sequence[DagCut] = (),
    dag_min_gain: float = DAG_MIN_GAIN,
    keep: frozenset[str] = frozenset(),
) -> tuple[Candidate, ...]:
    """Every candidate plan, predicted and checked: local, then per node remote,
    split:1..n-1, the same under each extra codec where usable, then the DAG cuts."""
    _, evaluated = _evaluate(costs, clouds, power, objective, weight_latency, constraints, codecs, dag_cuts, dag_min_gain,
                             keep)
    return tuple(candidate for candidate, _ in evaluated)


# Among scores within TIE_REL_TOL, the plan with more segments on the device
# wins: it exposes less data and depends less on the network for the same
# predicted cost. Then the node listed first in `clouds` wins.
_CHOOSER: choice.Chooser[Candidate] = choice.Chooser(
    noun="plan",
    counted="plan",
    prefer=lambda c: -c.k,
    tie_rule="more segments on the device",
    total_ms=lambda c: c.stages.total_ms,
)


def _why_infeasible(
    candidates: Sequence[Candidate],
    broken: Sequence[choice.Broken],
    constraints: Constraints,
    best_effort: int | None,
) -> str:
    if best_effort is None:
        return (
            f"No plan is feasible: all {len(candidates)} plans break a hard constraint "
            f"({choice.tally(broken, hard_only=True)}). "
            f"Local breaks: {'; '.join(candidates[0].violations)}."
        )
    slo, budget = constraints.slo_ms, constraints.energy_budget_j
    limits = (
        (choice.SLO, slo, lambda c: c.stages.total_ms),
        (choice.ENERGY_BUDGET, budget, lambda c: c.energy_j),
    )
    # Reached only when each soft constraint alone can be met, so both are set.
    return _CHOOSER.why_best_effort(
        candidates,
        best_effort,
        limits,
        lambda: f"none meets both the SLO ({slo:.1f} ms) and the energy budget ({budget:.4g} J)",
    )


def choose(
    costs: ModelCosts,
    clouds: Sequence[CloudOption],
    power: Power,
    *,
    objective: Objective = Objective.LATENCY,
    weight_latency: float = 0.5,
    constraints: Constraints = Constraints(),
    codecs: Sequence[CodecOption] = (),
    dag_cuts: Sequence[DagCut] = (),
    dag_min_gain: float = DAG_MIN_GAIN,
    keep: frozenset[str] = frozenset(),
) -> Decision:
    """The feasible plan with the lowest score, every candidate, and why.

    ``codecs``: lossy codecs the plan may use instead of the one ``costs`` was
    built for, each only where its measured error fits (CodecOption.usable);
    ``dag_cuts``: splits off the chain (minimum s-t cuts), priced alongside and
    offered where they beat the node's best chain split by more than ``dag_min_gain``;
    ``keep``: labels listed whatever those rules say (the plan requests run now,
    which hysteresis weighs against the winner).
    """
    objective, evaluated = _evaluate(costs, clouds, power, objective, weight_latency, constraints, codecs, dag_cuts,
                                     dag_min_gain, keep)
    verdict = _CHOOSER.decide(
        objective, evaluated, lambda candidates, broken, effort: _why_infeasible(candidates, broken, constraints, effort)
    )
    return Decision(objective=objective, **verdict._asdict())
