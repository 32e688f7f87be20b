"""A request's plan in whole-array work: the decision ``costmodel.choose`` makes, without its objects.

``costmodel.choose`` is the cost model as written in its docstring: one
Candidate per (node, cut, codec), each priced, checked and explained. That is
what ``offload-tune`` sweeps, and at real-model size (300 cuts, 16 nodes) it
costs tens of milliseconds per request, more than the inference it plans.
Most of it does not change between requests: the device's prefix times, what
crosses each cut, each node's suffix times, memory, privacy and allowed cuts.
:class:`PlanTable` keeps those as arrays, built once per profile, codec and
policy. :meth:`PlanTable.choose` combines them with what a request changes
(links, queues, calibration, objective) in numpy over (node x cut): a score
and a byte of broken-constraint bits per candidate. The winner, the runner-up
its reason names and the best effort come from one pass over those two
arrays; a :class:`QuickDecision` builds Candidates (priced by
``costmodel._offloaded`` itself) only for the plans a caller asks about
(``plans``, ``matching``), or all of them for ``explain``.

It decides what ``choose`` decides on the same inputs
(``tests/test_plan_table.py`` compares the two over random profiles, links
and constraints): the same terms, the same tie rule, the same words.
Calibration scales sums here rather than each segment, and terms that do not
depend on the cut are added first, so scores may differ from ``choose``'s in
the last bits. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from partitioner import choice
from partitioner.choice import TIE_REL_TOL, Objective
from partitioner.costmodel import (
    _CHOOSER,
    DAG_MIN_GAIN,
    LOCAL,
    REMOTE,
    SPLIT,
    Candidate,
    CodecOption,
    Constraints,
    DagCut,
    Decision,
    Link,
    ModelCosts,
    Power,
    StagePrediction,
    Transfer,
    _check_against_model,
    _local_at,
    _offloaded,
    _prefix_sums,
    _suffix_sums,
    _violations,
    _why_infeasible,
)
from partitioner.hysteresis import switch_gain

# One bit per constraint a candidate breaks, in the order costmodel._violations
# lists them, and one for "no candidate here" (a slot a node does not offer).
CONSTRAINTS = ("memory limit", "privacy floor", "remote not allowed", "allowed cuts", "SLO", "energy budget")
MEMORY, PRIVACY, REMOTE_FORBIDDEN, NOT_ALLOWED, SLO, ENERGY, ABSENT = (1 << i for i in range(7))
HARD_BITS = MEMORY | PRIVACY | REMOTE_FORBIDDEN | NOT_ALLOWED
HARD = (True, True, True, True, False, False)


@dataclass(frozen=True)
class NodeSegments:
    """What a node's published profile says of this model: fixed between requests."""

    node: str
    segment_ms: tuple[float, ...]  # n segment times on the node, ms
    overhead_ms: float             # its cost of one run, ms
    # The chain cuts (0: the whole model) the node can run; None: every one, and
    # any codec and DAG cut. A node with a set (an engine hosting the suffixes
    # offload-tune exported) runs only those, its tensors raw.
    cuts: frozenset[int] | None = None


@dataclass(frozen=True)
class NodeNow:
    """What a request sees of one node: its link and queue now."""

    node: str
    link: Link
    queue_ms: float


@dataclass(frozen=True)
class Calibrated:
    """The agent's corrections for this request (see partitioner.calibration)."""

    edge_factor: float = 1.0
    offload_ms: float = 0.0
    request_ms: float = 0.0


class _RunCosts(NamedTuple):   # costmodel.RunCosts, calibrated
    output: Transfer
    edge_overhead_ms: float
    request_ms: float


class _NodeCosts(NamedTuple):  # costmodel.NodeCosts
    link: Link
    queue_ms: float
    overhead_ms: float


@dataclass
class _Slot:
    """A column after the chain's n, on every node: one codec's best plan, the
    held plan under a codec, or a DAG cut. Absent where ``bits`` say ABSENT."""

    codec: int                 # index into PlanTable.codecs + 1; 0: none (a DAG cut)
    dag: DagCut | None
    ks: np.ndarray             # (nodes,) segments on the device
    score: np.ndarray          # (nodes,)
    bits: np.ndarray           # (nodes,) uint8
    # a DAG cut's least distance (its score units) from the dag_min_gain threshold
    # that decides whether it is offered: how far scores may move before it flips
    threshold_gap: float = math.inf


class PlanTable:
    """The parts of planning that only a new profile, codec or policy changes.

    ``costs`` and ``codecs`` are as measured (uncalibrated: the calibration
    comes with each request); ``nodes`` are every node whose profile is known,
    in any order: a request names the ones it plans over, in its own order.
    """

    def __init__(self, costs: ModelCosts, nodes: Sequence[NodeSegments], constraints: Constraints,
                 codecs: Sequence[CodecOption] = ()) -> None:
        n = costs.n
        self.costs, self.constraints, self.codecs, self.n = costs, constraints, tuple(codecs), n
        self._segments = tuple(nodes)
        self._index = {segments.node: i for i, segments in enumerate(nodes)}
        if len(self._index) != len(nodes):
            raise ValueError("PlanTable: a node is listed twice")
        for segments in nodes:
            if len(segments.segment_ms) != n:
                raise ValueError(f"PlanTable: node {segments.node} has {len(segments.segment_ms)} segments, "
                                 f"the model has n = {n}")
        _check_against_model(costs, (), constraints, 0.5, self.codecs)
        self.edge_prefix = np.array(_prefix_sums(costs.edge_segment_ms))                  # n + 1
        self.cloud_suffix = np.array([_suffix_sums(s.segment_ms)[:n] for s in nodes]).reshape(len(nodes), n)
        self.cloud_overhead = np.array([s.overhead_ms for s in nodes])
        # chain plans a node does not offer, and nodes that take no lossy codec nor DAG cut
        self.node_absent = np.array([[s.cuts is not None and k not in s.cuts for k in range(n)] for s in nodes],
                                    dtype=bool).reshape(len(nodes), n)
        self.node_raw_only = np.array([s.cuts is not None for s in nodes], dtype=bool)
        self.memory = np.array(costs.edge_memory_bytes, dtype=np.int64)                  # n + 1
        # the hard constraints of chain plans, per k: no request figure moves them
        limit, cuts, ks = constraints.memory_limit_bytes, constraints.allowed_cuts, np.arange(n)
        self.chain_bits = np.zeros(n, dtype=np.uint8)
        if limit is not None:
            self.chain_bits |= np.where(self.memory[:n] > limit, MEMORY, 0).astype(np.uint8)
        self.chain_bits |= np.where(ks < constraints.privacy_min_local, PRIVACY, 0).astype(np.uint8)
        if not constraints.allow_remote:
            self.chain_bits |= REMOTE_FORBIDDEN
        if cuts is not None:
            self.chain_bits[1:] |= np.where(np.isin(ks[1:], list(cuts)), 0, NOT_ALLOWED).astype(np.uint8)
        # per codec (0: the base): bytes, encode and decode ms at each k, and where it may be used
        self.crossings = [self._arrays(costs.crossings)] + [self._arrays(c.crossings) for c in self.codecs]
        self.usable = [np.ones(n, dtype=bool)]
        for codec in self.codecs:
            self.usable.append(np.isin(ks, [k for k in codec.usable if 0 <= k < n]))

    @staticmethod
    def _arrays(crossings: Sequence[Transfer]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([c.wire_bytes for c in crossings], dtype=np.float64),
                np.array([c.encode_ms for c in crossings]), np.array([c.decode_ms for c in crossings]))

    def edge_ms(self, k: int) -> float:
        """Device compute of the first k segments, as profiled."""
        return float(self.edge_prefix[k])

    def cloud_ms(self, node: str) -> float:
        """The node's compute of the whole model."""
        return float(self.cloud_suffix[self._index[node], 0]) if self.n else 0.0

    def segments(self, node: str) -> NodeSegments:
        return self._segments[self._index[node]]

    # -------------------------------------------------------------- choose --

    def choose(self, calibrated: Calibrated, nodes: Sequence[NodeNow], power: Power, *,
               objective: Objective = Objective.LATENCY, weight_latency: float = 0.5,
               dag_cuts: Sequence[DagCut] = (), dag_min_gain: float = DAG_MIN_GAIN,
               keep: frozenset[str] = frozenset()) -> QuickDecision:
        """``costmodel.choose`` on these costs calibrated, these nodes in this
        order (their links and queues now), and the table's codecs and policy."""
        request = _Request(self, calibrated, nodes, power, choice.objective(objective), choice.weight(weight_latency))
        if dag_cuts:
            _check_against_model(self.costs, (), self.constraints, request.weight, (), dag_cuts)
        chain_score, chain_bits = request.chain(0)
        slots = self._codec_slots(request, keep)
        if dag_cuts:
            slots += self._dag_slots(request, chain_score, chain_bits, slots, dag_cuts, dag_min_gain, keep)
        return QuickDecision(request, chain_score, chain_bits, slots, keep)

    def _codec_slots(self, request: _Request, keep: frozenset[str]) -> list[_Slot]:
        """Each codec's one plan per node (costmodel._best_priced: the lowest
        (score, -k) meeting every constraint, else the hard ones, else any), and
        the held plan where it is under that codec and not its best."""
        slots = []
        held_codec, held_k = _held_codec_plan(keep)
        rows = np.arange(request.m)
        for c, codec in enumerate(self.codecs, start=1):
            usable = self.usable[c]
            if not usable.any():
                continue
            score, bits = request.chain(c)
            picked = np.full(request.m, -1)
            present = usable & (bits & ABSENT == 0)
            for allowed in (usable & (bits == 0), present & (bits & HARD_BITS == 0), present):
                best = self.n - 1 - np.argmin(np.where(allowed, score, math.inf)[:, ::-1], axis=1)  # highest k of equals
                picked = np.where((picked < 0) & allowed.any(axis=1), best, picked)
            offered = picked >= 0  # a node that offers no plan under this codec has no slot
            picked = np.where(offered, picked, 0)
            slots.append(_Slot(c, None, picked, score[rows, picked], bits[rows, picked] | np.where(offered, 0, ABSENT)))
            if held_codec == codec.name and 0 <= held_k < self.n and usable[held_k]:
                ks = np.full(request.m, held_k)
                slots.append(_Slot(c, None, ks, score[:, held_k], bits[:, held_k] | np.where(picked == held_k, ABSENT, 0)))
        return slots

    def _dag_slots(self, request: _Request, chain_score: np.ndarray, chain_bits: np.ndarray, slots: list[_Slot],
                   dag_cuts: Sequence[DagCut], dag_min_gain: float, keep: frozenset[str]) -> list[_Slot]:
        """Each DAG cut on the nodes that run its cloud side, where it beats the
        node's best chain split the policy allows by ``dag_min_gain`` (or is pinned or held)."""
        legal = chain_bits[:, 1:] & (HARD_BITS | ABSENT) == 0
        chain_best = np.where(legal, chain_score[:, 1:], math.inf).min(axis=1, initial=math.inf)
        for slot in slots:
            split = (slot.ks > 0) & (slot.bits & (HARD_BITS | ABSENT) == 0)
            chain_best = np.minimum(chain_best, np.where(split, slot.score, math.inf))
        found = []
        for dag in dag_cuts:
            cloud = np.array([dag.cloud_ms.get(node, math.nan) for node in request.names])
            score, bits = request.dag(dag, np.nan_to_num(cloud))
            absent = np.isnan(cloud) | request.raw_only
            gap = math.inf
            if not dag.pinned and f"{SPLIT}:{dag.key}" not in keep:
                # within noise of a chain cut: not worth a new cut's cold sessions on both sides
                threshold = chain_best * (1 - dag_min_gain)
                gap = float(np.abs(score - threshold)[~absent].min(initial=math.inf)) / (2 - dag_min_gain)
                absent |= score >= threshold
            found.append(_Slot(0, dag, np.full(request.m, dag.whole_segments), score, bits | np.where(absent, ABSENT, 0),
                               threshold_gap=gap))
        return found


class _Pricing:
    """A request's inputs against a table, and any one plan priced at them in
    plain floats (what a QuickDecision's candidates are built with)."""

    def __init__(self, table: PlanTable, calibrated: Calibrated, nodes: Sequence[NodeNow], power: Power,
                 goal: Objective, weight: float) -> None:
        self.table, self.calibrated, self.power, self.goal, self.weight = table, calibrated, power, goal, weight
        self.nodes, self.names, self.m = nodes, [now.node for now in nodes], len(nodes)
        try:
            self.rows = [table._index[name] for name in self.names]  # each node's row in the table
        except KeyError as exc:
            raise ValueError(f"PlanTable: no profile of node {exc.args[0]} in this table") from None
        self.factor = calibrated.edge_factor
        self.run = _RunCosts(table.costs.output, table.costs.edge_overhead_ms * self.factor, calibrated.request_ms)
        self.local_stages, self.local_j = _local_at(float(table.edge_prefix[table.n] * self.factor), self.run, power)
        self.local_ms = self.local_stages.total_ms
        if goal is Objective.WEIGHTED and (self.local_ms <= 0 or self.local_j <= 0):
            raise ValueError(
                "the weighted objective divides by the LOCAL plan's predicted latency and energy, "
                f"which are {self.local_ms!r} ms and {self.local_j!r} J here: both must be > 0"
            )
        self.local_score = choice.score(goal, weight, self.local_ms, self.local_j, self.local_ms, self.local_j)

    def priced(self, j: int, k: int, c: int, dag: DagCut | None) -> tuple[StagePrediction, float, float]:
        """Stages, energy and score of one plan, by costmodel._offloaded itself."""
        now, row, table = self.nodes[j], self.rows[j], self.table
        node = _NodeCosts(now.link, now.queue_ms, float(table.cloud_overhead[row]))
        if dag is not None:
            stages, energy = _offloaded(self.run, self.power, node, edge_compute_ms=dag.edge_ms, cut=dag.crossing,
                                        cloud_compute_ms=dag.cloud_ms[now.node])
        else:
            wire, encode, decode = table.crossings[c]
            cut = Transfer(int(wire[k]), float(encode[k]) + self.calibrated.offload_ms, float(decode[k]))
            edge = float(table.edge_prefix[k] * self.factor) if k else None
            stages, energy = _offloaded(self.run, self.power, node, edge_compute_ms=edge, cut=cut,
                                        cloud_compute_ms=float(table.cloud_suffix[row, k]))
        return stages, energy, choice.score(self.goal, self.weight, stages.total_ms, energy, self.local_ms, self.local_j)

    def rest_ms(self, k: int) -> float:
        """What the device would still run after k segments (a chain plan's fallback)."""
        prefix = self.table.edge_prefix
        return float(prefix[self.table.n] * self.factor - prefix[k] * self.factor + self.run.edge_overhead_ms)


class _Request(_Pricing):
    """One request's figures against a table: costmodel's module docstring, in arrays over (node x cut)."""

    def __init__(self, table: PlanTable, calibrated: Calibrated, nodes: Sequence[NodeNow], power: Power,
                 goal: Objective, weight: float) -> None:
        super().__init__(table, calibrated, nodes, power, goal, weight)
        self.index = np.array(self.rows, dtype=np.int64)
        costs, n = table.costs, table.n
        self.prefix = table.edge_prefix * self.factor
        # k = 0 (REMOTE) runs nothing on the device, k > 0 one run of the first k segments
        self.edge = np.concatenate(([0.0], self.prefix[1:n] + self.run.edge_overhead_ms))
        out = costs.output
        up = np.array([now.link.uplink_mbps for now in nodes])[:, None]
        down = np.array([now.link.downlink_mbps for now in nodes])[:, None]
        rtt = np.array([now.link.rtt_ms for now in nodes])[:, None]
        queue = np.array([now.queue_ms for now in nodes])[:, None]
        self.cloud_overhead = table.cloud_overhead[self.index][:, None]
        self.ms_per_byte = 8 / (up * 1e6) * 1e3
        downlink = out.wire_bytes * 8 / (down * 1e6) * 1e3
        # the terms no cut changes, per node: what the device waits for, and the results' codec
        self.waiting = rtt + downlink + queue + self.cloud_overhead + out.encode_ms
        self.fixed_ms = self.waiting + out.decode_ms + calibrated.request_ms
        self.radio = power.radio_alpha_w_per_mbps * up + power.radio_beta_w
        self.suffix = table.cloud_suffix[self.index]
        self.absent = np.where(table.node_absent[self.index], ABSENT, 0).astype(np.uint8)
        self.raw_only = table.node_raw_only[self.index]
        self.needs_energy = goal is not Objective.LATENCY or table.constraints.energy_budget_j is not None

    def chain(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Score and constraint bits (nodes x n) of every chain plan under codec c (0: the base)."""
        wire, encode, decode = self.table.crossings[c]
        encode = encode + self.calibrated.offload_ms
        uplink = wire * self.ms_per_byte
        total = uplink + self.suffix
        total += self.edge + encode + decode
        total += self.fixed_ms
        energy = None
        if self.needs_energy:
            p = self.power
            energy = uplink * self.radio
            energy += p.idle_w * (self.waiting + self.suffix + decode)
            energy += p.active_w * (self.edge + encode + self.run.output.decode_ms + self.calibrated.request_ms)
            energy /= 1e3
        bits = self._bits(total, energy, self.table.chain_bits) | self.absent
        if c:
            bits |= np.where(self.raw_only, ABSENT, 0).astype(np.uint8)[:, None]
        return self._score(total, energy), bits

    def dag(self, dag: DagCut, cloud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score and constraint bits (nodes,) of one DAG cut on every node."""
        crossing, p = dag.crossing, self.power
        edge = dag.edge_ms + self.run.edge_overhead_ms
        uplink = crossing.wire_bytes * self.ms_per_byte[:, 0]
        remote = self.waiting[:, 0] + cloud + crossing.decode_ms
        total = edge + crossing.encode_ms + uplink + remote + self.run.output.decode_ms + self.calibrated.request_ms
        energy = None
        if self.needs_energy:
            energy = (p.active_w * (edge + crossing.encode_ms + self.run.output.decode_ms + self.calibrated.request_ms)
                      + self.radio[:, 0] * uplink + p.idle_w * remote) / 1e3
        constraints = self.table.constraints
        limit = constraints.memory_limit_bytes
        hard = ((MEMORY if limit is not None and dag.memory_bytes > limit else 0)
                | (PRIVACY if dag.whole_segments < constraints.privacy_min_local else 0)
                | (REMOTE_FORBIDDEN if not constraints.allow_remote else 0)
                | (NOT_ALLOWED if constraints.allowed_cuts is not None else 0))
        return self._score(total, energy), self._bits(total, energy, np.uint8(hard))

    def _score(self, total: np.ndarray, energy: np.ndarray | None) -> np.ndarray:
        if self.goal is Objective.LATENCY:
            return total
        if self.goal is Objective.ENERGY:
            return energy
        return self.weight * total / self.local_ms + (1 - self.weight) * energy / self.local_j

    def _bits(self, total: np.ndarray, energy: np.ndarray | None, hard) -> np.ndarray:
        slo, budget = self.table.constraints.slo_ms, self.table.constraints.energy_budget_j
        bits = np.broadcast_to(hard, total.shape).astype(np.uint8)
        if slo is not None:
            bits |= np.where(total > slo, SLO, 0).astype(np.uint8)
        if budget is not None:
            bits |= np.where(energy > budget, ENERGY, 0).astype(np.uint8)
        return bits

    def local_candidate_bits(self) -> int:
        constraints = self.table.constraints
        limit, slo, budget = constraints.memory_limit_bytes, constraints.slo_ms, constraints.energy_budget_j
        return ((MEMORY if limit is not None and self.table.costs.edge_memory_bytes[self.table.n] > limit else 0)
                | (SLO if slo is not None and self.local_ms > slo else 0)
                | (ENERGY if budget is not None and self.local_j > budget else 0))


def _label_parts(label: str) -> tuple[str, int | None, str, str]:
    """A Candidate.label ("local", "remote+int8", "split:5+fp16", "split:g<key>") as
    (kind, k of a chain plan or None, DAG cut key or "", codec or "")."""
    base, _, codec = label.partition("+")
    kind, _, index = base.partition(":")
    if kind == SPLIT and index.startswith("g"):
        return kind, None, index, codec
    k = 0 if kind == REMOTE and not index else int(index) if kind == SPLIT and index.isdigit() else None
    return kind, k, "", codec


def _held_codec_plan(keep: frozenset[str]) -> tuple[str, int]:
    """The codec and k of a kept "split:5+int8" / "remote+int8" label ("", -1: none)."""
    for label in keep:
        _, k, key, codec = _label_parts(label)
        if codec and k is not None and not key:
            return codec, k
    return "", -1


class _Sensitivities(NamedTuple):
    """Per candidate position: its total (ms) and what moves it by how much."""

    score: np.ndarray       # its total, ms (LATENCY)
    device_ms: np.ndarray   # device time the calibration factor scales
    offloads: np.ndarray    # 1 where the calibration's offload_ms is in it
    node: np.ndarray        # its node's index in the request (-1: LOCAL)
    wire_bytes: np.ndarray  # bytes it sends up


class _ReuseWeights(NamedTuple):
    """A decision stands while f|dF| + o|d offload_ms| + r|d request_ms|
    + sum over nodes of u_j U_j + w_j W_j <= 1, where U_j is how far node j's
    RTT, queue and reply time moved (ms) and W_j its uplink ms per byte."""

    f: float
    o: float
    r: float
    u: tuple[float, ...]
    w: tuple[float, ...]


# A weight no real change passes (and 0 change times it is 0, where inf would give nan).
MUST_NOT_MOVE = 1e300


class _Weights:
    """Builds _ReuseWeights: the most each input may weigh in any one
    condition, each condition scaled to its own room (a sum of maxima, so at
    worst a few times stricter than the conditions one by one)."""

    def __init__(self, sensitivities: _Sensitivities, m: int) -> None:
        self.s, self.m = sensitivities, m
        self.f = self.o = self.r = 0.0
        self.u, self.w = np.zeros(m + 1), np.zeros(m + 1)  # the last one: LOCAL's (no node)
        self.room_left = True

    def pairs(self, behind: np.ndarray, ahead: int, spread: float, either_side: bool = False) -> None:
        """Each of ``behind`` stays behind ``ahead`` by ``spread``: T_b > spread * T_a
        (``either_side``: T_b - spread * T_a keeps its sign). Those tied with
        ``ahead`` now (choice.tied), which the tie rule put behind it, stay tied."""
        s, behind = self.s, np.asarray(behind, dtype=np.int64)
        if not len(behind):
            return
        room = s.score[behind] - spread * s.score[ahead]
        if either_side:
            room = np.abs(room) - TIE_REL_TOL * (s.score[behind] + s.score[ahead])  # a last bit must not flip it
            if room.min() <= 0:
                self.room_left = False
                return
        elif (room <= 0).any():
            self._tied(behind[room <= 0], ahead)
            behind, room = behind[room > 0], room[room > 0]
            if not len(behind):
                return
        same = (s.node[behind] == s.node[ahead]) & (s.node[ahead] >= 0)
        self.f = max(self.f, float((np.abs(s.device_ms[behind] - spread * s.device_ms[ahead]) / room).max()))
        self.o = max(self.o, float((np.abs(s.offloads[behind] - spread * s.offloads[ahead]) / room).max()))
        self.r = max(self.r, float(((spread - 1) / room).max()))
        # one node's change moves both sides of a pair on it: what differs is what counts
        u = np.where(same, spread - 1, 1.0) / room
        w = np.where(same, np.abs(s.wire_bytes[behind] - spread * s.wire_bytes[ahead]), s.wire_bytes[behind]) / room
        np.maximum.at(self.u, s.node[behind], u)
        np.maximum.at(self.w, s.node[behind], w)
        if s.node[ahead] >= 0 and not same.all():
            apart = room[~same]
            self.u[s.node[ahead]] = max(self.u[s.node[ahead]], float((spread / apart).max()))
            self.w[s.node[ahead]] = max(self.w[s.node[ahead]], float((spread * s.wire_bytes[ahead] / apart).max()))

    def _tied(self, behind: np.ndarray, ahead: int) -> None:
        """A tie holds while nothing that moves one side more than the other moves
        at all: plans alike in every input term (a node as fast as the device,
        segments that take no time) stay tied whatever the rest does."""
        s = self.s
        if (s.device_ms[behind] != s.device_ms[ahead]).any():
            self.f = MUST_NOT_MOVE
        if (s.offloads[behind] != s.offloads[ahead]).any():
            self.o = MUST_NOT_MOVE
        same = (s.node[behind] == s.node[ahead]) & (s.node[ahead] >= 0)
        self.w[s.node[behind][same & (s.wire_bytes[behind] != s.wire_bytes[ahead])]] = MUST_NOT_MOVE
        apart = s.node[behind][~same]
        self.u[apart] = self.w[apart] = MUST_NOT_MOVE  # index -1: LOCAL's, which no input moves
        if s.node[ahead] >= 0 and not same.all():
            self.u[s.node[ahead]] = self.w[s.node[ahead]] = MUST_NOT_MOVE

    def alone(self, positions: np.ndarray, room: np.ndarray) -> None:
        """Each of ``positions`` moves by less than its ``room``."""
        if not len(positions):
            return
        if room.min() <= 0:
            self.room_left = False
            return
        s = self.s
        self.f = max(self.f, float((s.device_ms[positions] / room).max()))
        self.o = max(self.o, float((s.offloads[positions] / room).max()))
        self.r = max(self.r, float((1 / room).max()))
        np.maximum.at(self.u, s.node[positions], 1 / room)
        np.maximum.at(self.w, s.node[positions], s.wire_bytes[positions] / room)

    def anywhere(self, room: float) -> None:
        """No candidate moves by ``room`` or more (room: inf: no condition)."""
        if room == math.inf:
            return
        if room <= 0:
            self.room_left = False
            return
        s = self.s
        self.f, self.o, self.r = max(self.f, float(s.device_ms.max()) / room), max(self.o, 1 / room), max(self.r, 1 / room)
        self.u = np.maximum(self.u, 1 / room)
        self.w = np.maximum(self.w, float(s.wire_bytes.max()) / room)

    def result(self) -> _ReuseWeights | None:
        if not self.room_left:
            return None
        return _ReuseWeights(self.f, self.o, self.r, tuple(self.u[:self.m].tolist()), tuple(self.w[:self.m].tolist()))


class QuickDecision:
    """``costmodel.Decision``'s answers, with Candidates built only when asked for.

    The candidates are laid out as ``choose`` lists them: LOCAL at position 0,
    then per node (in the request's order) its n chain plans and one column per
    slot, so node j's column c is at ``1 + j * width + c``. A slot a node does
    not offer is no candidate (its ABSENT bit)."""

    def __init__(self, request: _Request, chain_score: np.ndarray, chain_bits: np.ndarray, slots: list[_Slot],
                 keep: frozenset[str] = frozenset()) -> None:
        self.request, self.slots, self.objective, self.keep = request, slots, request.goal, keep
        self.pricing: _Pricing = request  # what candidates are priced at (see refreshed)
        self.constraints, n, m = request.table.constraints, request.table.n, request.m
        self.width = n + len(slots)
        self.score = np.empty(1 + m * self.width)
        self.bits = np.empty(1 + m * self.width, dtype=np.uint8)
        self.score[0] = request.local_score
        self.bits[0] = request.local_candidate_bits()
        score, bits = self.score[1:].reshape(m, self.width), self.bits[1:].reshape(m, self.width)
        score[:, :n], bits[:, :n] = chain_score, chain_bits
        for s, slot in enumerate(slots, start=n):
            score[:, s], bits[:, s] = slot.score, slot.bits
        self._built: dict[int, Candidate] = {}
        self._reuse: dict[float, _ReuseWeights | None] = {}
        self._last_at: tuple[tuple, QuickDecision | None] | None = None  # see at
        feasible = np.where(self.bits == 0, self.score, math.inf)
        win = self._win = self._pick(feasible)
        self._runner = None
        effort = self._effort = self._pick(np.where(self.bits & (HARD_BITS | ABSENT) == 0, self.score, math.inf))
        self.winner = None if win is None else self.candidate(win)
        self.best_effort = None if effort is None else self.candidate(effort)
        present = self.bits & ABSENT == 0
        if win is None:
            listed = np.flatnonzero(present)
            position = None if effort is None else int(np.searchsorted(listed, effort))
            self.why = _why_infeasible(self.candidates, self.broken_names, self.constraints, position)
            return
        feasible[win] = math.inf
        self._runner = self._pick(feasible)
        ruled_out = present & (self.bits != 0)
        self._counted = (int(present.sum()), int(ruled_out.sum()), self._tally(ruled_out))
        self.why = self._why_won()

    def _why_won(self) -> str:
        count, ruled_out, tallied = self._counted
        runner = None if self._runner is None else self.candidate(self._runner)
        # the LOCAL plan is the reference only the weighted objective's words name
        reference = self.candidate(0) if self.objective is Objective.WEIGHTED else self.winner
        return _CHOOSER.why_won(self.objective, self.winner, runner, reference=reference, count=count,
                                ruled_out=ruled_out, tallied=tallied)

    @property
    def feasible(self) -> bool:
        return self.winner is not None

    # --------------------------------------------------------------- reuse --

    def stands(self, calibrated: Calibrated, nodes: Sequence[NodeNow], *, hysteresis_margin: float = 0.0) -> bool:
        """Whether this decision is the one ``choose`` would make at these
        inputs (the same table, objective, power, DAG cuts and held plan), and
        what hysteresis then runs is the same: O(nodes), in plain floats.
        ``refreshed`` then gives its figures at these inputs."""
        if hysteresis_margin not in self._reuse:
            self._reuse[hysteresis_margin] = self._reuse_weights(hysteresis_margin)
        weights = self._reuse[hysteresis_margin]
        request = self.request
        if weights is None or len(nodes) != request.m:
            return False
        before = request.calibrated
        moved = (weights.f * abs(calibrated.edge_factor - before.edge_factor)
                 + weights.o * abs(calibrated.offload_ms - before.offload_ms)
                 + weights.r * abs(calibrated.request_ms - before.request_ms))
        reply_bits_ms = request.table.costs.output.wire_bytes * 8e-3
        for now, then, u, w in zip(nodes, request.nodes, weights.u, weights.w):
            if now.node != then.node:
                return False
            a, b = now.link, then.link
            moved += (u * abs(a.rtt_ms - b.rtt_ms + now.queue_ms - then.queue_ms
                              + reply_bits_ms * (1 / a.downlink_mbps - 1 / b.downlink_mbps))
                      + w * 8e-3 * abs(1 / a.uplink_mbps - 1 / b.uplink_mbps))
        return moved <= 1.0

    def at(self, calibrated: Calibrated, nodes: Sequence[NodeNow], *, hysteresis_margin: float = 0.0
           ) -> QuickDecision | None:
        """This decision ``refreshed`` at these inputs where it ``stands``,
        else None. The answer for the last inputs asked about is kept: the
        agent asks ahead, once a run has moved its calibration, so the next
        request with those inputs costs one comparison."""
        inputs = (calibrated, tuple(nodes), hysteresis_margin)
        last = self._last_at
        if last is not None and last[0] == inputs:
            return last[1]
        if calibrated == self.request.calibrated and inputs[1] == tuple(self.request.nodes):
            return self  # what it was decided at (choose is deterministic)
        stood = self.stands(calibrated, nodes, hysteresis_margin=hysteresis_margin)
        answer = self.refreshed(calibrated, nodes) if stood else None
        self._last_at = (inputs, answer)
        return answer

    def refreshed(self, calibrated: Calibrated, nodes: Sequence[NodeNow]) -> QuickDecision:
        """This decision, which ``stands`` at these inputs, with its candidates
        priced at them: the winner, runner-up, reason and figures a fresh pass
        gives, at the cost of the few candidates asked for."""
        fresh = object.__new__(QuickDecision)
        fresh.__dict__.update(self.__dict__)
        fresh.__dict__.pop("candidates", None)
        fresh.pricing = _Pricing(self.request.table, calibrated, nodes, self.request.power, self.objective,
                                 self.request.weight)
        fresh._built, fresh._last_at = {}, None
        fresh.winner = fresh.candidate(self._win)
        fresh.best_effort = fresh.candidate(self._effort)
        fresh.why = fresh._why_won()
        return fresh

    def _reuse_weights(self, hysteresis_margin: float) -> _ReuseWeights | None:
        """How much each input may move before a fresh pass could decide
        differently; None: always decide afresh.

        Every order the outcome rests on is a pair of candidates: the winner
        alone ahead of each feasible plan, the runner-up its reason names ahead
        of the rest, and under hysteresis the held plan against the winner. A
        change moves both sides of a pair alike in part (the calibration scales
        the device time of both, a node's RTT delays both of its plans), so each
        pair may move by what differs between its two sides only. Besides the
        pairs: no candidate crosses the SLO and no DAG cut its offer threshold.

        Bounded for the common case only: the LATENCY objective (a score is a
        total, in ms) with no energy budget, no per-plan codec, and a plan run
        that is LOCAL or on the only node (load sharing and retries, which
        compare other nodes' figures, then have nothing else to compare)."""
        request = self.request
        if (request.goal is not Objective.LATENCY or self.constraints.energy_budget_j is not None
                or self.winner is None or any(slot.codec for slot in self.slots)
                or (self.winner.node is not None and request.m > 1)):
            return None
        weights = _Weights(self._sensitivities(), request.m)
        spread = 1 / (1 - TIE_REL_TOL)  # choice.tied: ahead by more than the tie tolerance
        win, runner = self._win, self._runner
        pool = np.flatnonzero(self.bits == 0)
        weights.pairs(pool[pool != win], win, spread)
        if runner is not None:
            weights.pairs(pool[(pool != win) & (pool != runner)], runner, spread)
        current = next(iter(self.keep), None)
        if current is not None and current != self.winner.label and hysteresis_margin > 0:
            same = [i for i in self._plan_positions(current) if self.bits[i] == 0]
            if same:
                held = min(same, key=lambda i: self.score[i])  # hold_or_switch's held plan: its best feasible
                weights.pairs(np.array([i for i in same if i != held]), held, spread)
                # the winner is more than the margin better than the held plan, or not (either side)
                weights.pairs(np.array([held]), win, 1 / (1 - hysteresis_margin), either_side=True)
                if switch_gain(self.score[held], self.score[win]) <= hysteresis_margin and held != 0 and request.m > 1:
                    return None  # it holds a plan on a node, and shares it among the others
        slo = self.constraints.slo_ms
        if slo is not None:
            present = np.flatnonzero(self.bits & ABSENT == 0)
            weights.alone(present, np.abs(self.score[present] - slo))
        for slot in self.slots:
            weights.anywhere(slot.threshold_gap)
        return weights.result()

    def _sensitivities(self) -> _Sensitivities:
        """Per candidate position, what an input change moves its total by."""
        table, n, m = self.request.table, self.request.table.n, self.request.m
        overhead = table.costs.edge_overhead_ms
        device = np.zeros((m, self.width))
        offloads = np.zeros((m, self.width))
        wire = np.zeros((m, self.width))
        device[:, 1:n] = table.edge_prefix[1:n] + overhead
        offloads[:, :n] = 1.0  # a chain crossing carries offload_ms; a DAG cut's has it built in
        wire[:, :n] = table.crossings[0][0]
        for s, slot in enumerate(self.slots, start=n):
            device[:, s] = overhead  # a DAG cut's device time was calibrated when it was priced
            wire[:, s] = slot.dag.crossing.wire_bytes  # reuse is bounded only where every slot is a DAG cut
        node = np.repeat(np.arange(m), self.width)
        return _Sensitivities(
            score=self.score,
            device_ms=np.concatenate(([table.edge_prefix[n] + overhead], device.ravel())),
            offloads=np.concatenate(([0.0], offloads.ravel())),
            node=np.concatenate(([-1], node)),
            wire_bytes=np.concatenate(([0.0], wire.ravel())))

    def _k(self, positions: np.ndarray) -> np.ndarray:
        """Segments on the device of the candidates at these positions."""
        n = self.request.table.n
        ks = np.full(len(positions), n)
        offloaded = positions > 0
        rows, columns = np.divmod(positions[offloaded] - 1, self.width)
        at = columns.copy()
        for s, slot in enumerate(self.slots, start=n):
            at = np.where(columns == s, slot.ks[rows], at)
        ks[offloaded] = at
        return ks

    def _pick(self, scores: np.ndarray) -> int | None:
        """choice.Chooser.pick over the candidates whose ``scores`` are finite (the
        others are outside the pool, at infinity): the lowest score, and among
        scores tied with it the most segments on the device, then the first."""
        first = int(scores.argmin())
        best = float(scores[first])
        if best == math.inf:
            return None
        # choice.tied(s, best) for s >= best >= 0 (every score is a time, an energy or
        # a weighted sum of their ratios): s - best <= TIE_REL_TOL * s
        tied = scores <= best / (1 - TIE_REL_TOL)
        if np.count_nonzero(tied) == 1:
            return first
        indices = np.flatnonzero(tied)
        return int(indices[np.lexsort((indices, -self._k(indices)))[0]])

    def _tally(self, rows: np.ndarray) -> str:
        """choice.tally of the constraints broken in ``rows``, in the order it names them."""
        bits = self.bits[rows]
        if not len(bits):
            return ""
        broken = [(bits & (1 << c)) != 0 for c in range(len(CONSTRAINTS))]
        counts = [int(b.sum()) for b in broken]
        order = sorted((c for c in range(len(CONSTRAINTS)) if counts[c]), key=lambda c: (int(broken[c].argmax()), c))
        return ", ".join(f"{CONSTRAINTS[c]}: {counts[c]}" for c in order)

    # ----------------------------------------------------------- candidates --

    def candidate(self, i: int) -> Candidate:
        if i not in self._built:
            self._built[i] = self._build(i)
        return self._built[i]

    def _build(self, i: int) -> Candidate:
        request, n = self.pricing, self.request.table.n
        if i == 0:
            total, energy = request.local_stages.total_ms, request.local_j
            memory = int(request.table.memory[n])
            broken = _violations(self.constraints, LOCAL, n, total, energy, memory)
            return Candidate(kind=LOCAL, k=n, node=None, stages=request.local_stages, energy_j=energy,
                             score=request.local_score, violations=tuple(message for _, message, _ in broken),
                             hard_violation=any(hard for _, _, hard in broken), memory_bytes=memory, uplink_bytes=0)
        j, column = divmod(i - 1, self.width)
        slot = self.slots[column - n] if column >= n else None
        k = int(slot.ks[j]) if slot else column
        c = slot.codec if slot else 0
        dag = slot.dag if slot else None
        stages, energy, score = request.priced(j, k, c, dag)
        kind = SPLIT if k or dag else REMOTE
        memory = dag.memory_bytes if dag else int(request.table.memory[k])
        broken = _violations(self.constraints, kind, k, stages.total_ms, energy, memory, chain=dag is None)
        codec = request.table.codecs[c - 1] if c else None
        return Candidate(
            kind=kind, k=k, node=request.names[j], stages=stages, energy_j=energy, score=score,
            violations=tuple(message for _, message, _ in broken), hard_violation=any(hard for _, _, hard in broken),
            memory_bytes=memory,
            uplink_bytes=dag.crossing.wire_bytes if dag else int(request.table.crossings[c][0][k]),
            rest_ms=dag.rest_ms + request.run.edge_overhead_ms if dag else request.rest_ms(k),
            codec=codec.name if codec else "", encoding=codec.encoding if codec else 0,
            output_error=codec.output_error[k] if codec else 0.0, cut_key=dag.key if dag else "",
        )

    @cached_property
    def candidates(self) -> tuple[Candidate, ...]:
        """Every candidate, in costmodel.choose's order (for explain: O(nodes x cuts) objects)."""
        return tuple(self.candidate(int(i)) for i in np.flatnonzero(self.bits & ABSENT == 0))

    @property
    def broken_names(self) -> list[choice.Broken]:
        return [tuple((CONSTRAINTS[c], HARD[c]) for c in range(len(CONSTRAINTS)) if bits & (1 << c))
                for bits in self.bits[self.bits & ABSENT == 0]]

    def plans(self, label: str) -> list[Candidate]:
        """The candidates labelled ``label`` ("split:5+int8"), one per node offering it."""
        return self._at(self._plan_positions(label))

    def _plan_positions(self, label: str) -> list[int]:
        kind, k, key, codec = _label_parts(label)
        if kind == LOCAL:
            return [0] if label == LOCAL else []
        if key:
            return [] if codec else self._in_slots(lambda slot: slot.dag is not None and slot.dag.key == key)
        if k is None or not 0 <= k < self.request.table.n:
            return []
        if not codec:
            return self._in_chain(k)
        return self._in_slots(lambda slot: slot.codec and self._codec_name(slot) == codec, k)

    def matching(self, kind: str, k: int | str | None, node: str) -> list[Candidate]:
        """The candidates ``server.find_pinned`` looks among: of this kind, at
        this k (a chain cut under any codec) or DAG cut key, on ``node`` ("": any)."""
        if kind == LOCAL:
            positions = [0]
        elif isinstance(k, str):
            positions = self._in_slots(lambda slot: slot.dag is not None and slot.dag.key == k)
        else:
            k = 0 if kind == REMOTE else k
            if k is None or not 0 <= k < self.request.table.n:
                return []
            positions = self._in_chain(k) + self._in_slots(lambda slot: slot.codec > 0, k)
        return [c for c in self._at(positions) if c.kind == kind and (not node or c.node == node)]

    def _codec_name(self, slot: _Slot) -> str:
        return self.request.table.codecs[slot.codec - 1].name

    def _in_chain(self, k: int) -> list[int]:
        positions = [1 + j * self.width + k for j in range(self.request.m)]
        return [i for i in positions if self.bits[i] & ABSENT == 0]

    def _in_slots(self, wanted: Callable[[_Slot], bool], k: int | None = None) -> list[int]:
        positions = []
        for s, slot in enumerate(self.slots, start=self.request.table.n):
            if wanted(slot):
                on = slot.bits & ABSENT == 0
                if k is not None:
                    on &= slot.ks == k
                positions += [1 + int(j) * self.width + s for j in np.flatnonzero(on)]
        return positions

    def _at(self, positions: list[int]) -> list[Candidate]:
        """The candidates at these positions, in choose's order."""
        return [self.candidate(i) for i in sorted(positions)]


# What the agent's helpers (hysteresis, load sharing, retries, pinning) read a decision through.
Decisions = Decision | QuickDecision
