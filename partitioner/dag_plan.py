"""DAG cuts for the planner: the device/cloud split of the node graph that no chain prefix gives.

The chain planner only cuts the prefixes of one topological order. On branchy
graphs (parallel branches, FPN necks, skips) the best split is often another
downward-closed set of nodes; DADS (Hu et al., INFOCOM'19) finds it as a
minimum s-t cut. This module prices that cut in exactly the terms of
``costmodel``'s T and J (the per-split variable parts: device compute, the
codec and uplink of what crosses, cloud compute), solves it with
``partitioner.mincut``, and turns the answer into a ``costmodel.DagCut`` the
chooser weighs against the chain cuts, LOCAL and REMOTE. The fixed parts
(round trip, queue, run overheads, the results coming back) are the same for
every split and so cannot move the cut; the chooser adds them.

Per-node times come from the profile's per-segment times, shared among a
segment's nodes by their roofline time (``partitioner.work``): the profiler
measures segments, and the work model says how a segment's time divides.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from partitioner.choice import Objective
from partitioner.costmodel import DagCut, Link, Power
from partitioner.graph import Cut, GraphError, ModelGraph
from partitioner.mincut import MinCutError, graph_problem, solve
from partitioner.planning import CodecSpeed, transfer
from partitioner.profile import TensorMeta
from partitioner.work import Machine, Work, roofline_ms
from protos.codec import CodecError


def branches(graph: ModelGraph) -> bool:
    """Whether any input-dependent tensor feeds two or more input-dependent nodes.

    Without that the graph is a chain, every downward-closed set is a prefix of
    its one order, and a min-cut can only move an element-wise follower across a
    chain cut (worth 0.1-0.3 %, bench/plans): not worth solving per figure change.
    """
    a = graph._facts()
    dynamic = set(a.dynamic)
    for tensor, readers in a.consumers.items():
        producer = a.producer.get(tensor)
        produced_here = tensor in graph.inputs or (producer is not None and producer in dynamic)
        if produced_here and sum(1 for r in readers if r in dynamic) >= 2:
            return True
    return False


def node_times(graph: ModelGraph, segment_ms: Sequence[float], works: Mapping[str, Work], machine: Machine) -> dict[str, float]:
    """Each node's share of its segment's measured time, by roofline time (equal shares when none is known)."""
    times: dict[str, float] = {}
    for names, total in zip(graph.segments, segment_ms):
        weights = [roofline_ms(works[n], machine) if n in works and works[n].known else 0.0 for n in names]
        whole = sum(weights)
        for name, weight in zip(names, weights):
            times[name] = total * (weight / whole if whole > 0 else 1.0 / len(names))
    return times


@dataclass(frozen=True)
class Terms:
    """How one ms or byte of each part of a split adds to the objective's score."""

    device_ms: float      # per ms of device compute
    cloud_ms: float       # per ms of cloud compute
    encode_ms: float      # per ms of encoding on the device
    decode_ms: float      # per ms of decoding on the node
    uplink_ms: float      # per ms the uplink is busy


def terms(objective: Objective, weight_latency: float, power: Power, link: Link, *,
          local_total_ms: float, local_energy_j: float) -> Terms:
    """The objective's weights on each term of T and J (see costmodel's docstring)."""
    radio_w = power.radio_alpha_w_per_mbps * link.uplink_mbps + power.radio_beta_w
    latency = Terms(1.0, 1.0, 1.0, 1.0, 1.0)
    energy = Terms(power.active_w / 1e3, power.idle_w / 1e3, power.active_w / 1e3, power.idle_w / 1e3, radio_w / 1e3)
    if objective is Objective.LATENCY:
        return latency
    if objective is Objective.ENERGY:
        return energy
    a, b = weight_latency / local_total_ms, (1 - weight_latency) / local_energy_j
    return Terms(*(a * t + b * j for t, j in zip(
        (latency.device_ms, latency.cloud_ms, latency.encode_ms, latency.decode_ms, latency.uplink_ms),
        (energy.device_ms, energy.cloud_ms, energy.encode_ms, energy.decode_ms, energy.uplink_ms))))


def best_cut(graph: ModelGraph, *, device_ms: Mapping[str, float], cloud_ms: Mapping[str, float],
             tensors: Mapping[str, TensorMeta], weights: Terms, link: Link, encoding: int, speed: CodecSpeed,
             privacy_min_local: int = 0) -> Cut | None:
    """The split minimising the objective over every downward-closed node set, or
    None when that is LOCAL, REMOTE, a chain cut the chain planner already prices,
    or a set no sub-model can run. Tensors of unknown size never cross."""
    def send(name: str) -> float:
        meta = tensors.get(name)
        if meta is None:
            return math.inf
        try:
            t = transfer((meta,), encoding, speed)
        except CodecError:
            return math.inf  # a type the wire format cannot carry (uint16, complex) never crosses
        uplink_ms = t.wire_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
        return weights.uplink_ms * uplink_ms + weights.encode_ms * t.encode_ms + weights.decode_ms * t.decode_ms

    pinned = [name for segment in graph.segments[:privacy_min_local] for name in segment]
    try:
        problem = graph_problem(
            graph, device_cost={n: weights.device_ms * t for n, t in device_ms.items()},
            cloud_cost={n: weights.cloud_ms * t for n, t in cloud_ms.items()},
            send_cost=send, download_cost=lambda name: 0.0, pinned=pinned,
        )
        solution = solve(problem)
        if not solution.is_split:
            return None
        cut = graph.cut_of(solution.device)
    except (MinCutError, GraphError):
        return None
    return None if cut.index else cut  # a chain cut is priced already


def price(graph: ModelGraph, cut: Cut, *, device_ms: Mapping[str, float], cloud_ms_by_node: Mapping[str, Mapping[str, float]],
          tensors: Mapping[str, TensorMeta], encoding: int, speed: CodecSpeed, input_bytes: int) -> DagCut | None:
    """``cut`` in the cost model's terms, on every node whose per-node times are given;
    None when a crossing tensor's size is unknown. Device memory: the prefix's
    weights plus the larger of the inputs and what crosses (a lower bound, as
    ``planning.edge_memory_bytes`` is for chain cuts)."""
    metas = [tensors.get(name) for name in cut.tensors]
    if any(m is None for m in metas):
        return None
    try:
        crossing = transfer(tuple(metas), encoding, speed)
    except CodecError:
        return None
    edge = set(graph.edge_nodes(cut))
    dynamic = [n for n in device_ms]
    whole = 0
    for segment in graph.segments:
        if not all(name in edge or name not in device_ms for name in segment):
            break
        whole += 1
    return DagCut(
        key=cut.key,
        edge_ms=sum(device_ms[n] for n in dynamic if n in edge),
        rest_ms=sum(device_ms[n] for n in dynamic if n not in edge),
        crossing=crossing,
        memory_bytes=graph.edge_param_bytes(cut) + max(input_bytes, sum(m.raw_bytes for m in metas)),
        whole_segments=min(whole, len(graph.segments) - 1),
        cloud_ms={node: sum(t for n, t in times.items() if n not in edge) for node, times in cloud_ms_by_node.items()},
    )
