"""DAG cuts and per-request codecs in the planner: priced exactly as the cost model prices chain cuts."""

from __future__ import annotations

import pytest

from modelzoo.build import build_dag
from partitioner.choice import Objective
from partitioner.costmodel import (
    DAG_MIN_GAIN,
    CloudOption,
    CodecOption,
    Constraints,
    DagCut,
    Link,
    ModelCosts,
    Power,
    Transfer,
    choose,
)
from partitioner.dag_plan import best_cut, node_times, price, terms
from partitioner.graph import analyze
from partitioner.planning import CodecErrors, CodecSpeed, codec_limits, transfer
from partitioner.profile import TensorMeta
from partitioner.work import Machine, concrete_shapes, node_work

SPEED = CodecSpeed(encode_mb_s=1000.0, decode_mb_s=1000.0)
POWER = Power(active_w=5.0, idle_w=1.6, radio_alpha_w_per_mbps=0.283, radio_beta_w=0.133)
SHAPES = {"input": (1, 3, 224, 224)}


@pytest.fixture(scope="module")
def resnet():
    """The resnet DAG with every tensor before the first downsampling ten times dearer to
    ship (as if its batch were 10): then layer 2's fork, one big tensor read by two strided
    convs, is best cut after both convs, which no prefix of the chain order does."""
    graph = analyze(build_dag(seed=0))
    known = concrete_shapes(graph.model, SHAPES)
    types = graph._facts().types

    def meta(name: str) -> TensorMeta:
        shape = known[name]
        if name.startswith(("input", "stem", "layer1")) and shape:
            shape = (shape[0] * 10, *shape[1:])
        return TensorMeta(name, "float32" if types[name].tensor_type.elem_type == 1 else "int64", shape)

    tensors = {n: meta(n) for n in known if n in types and types[n].WhichOneof("value") == "tensor_type"}
    return graph, tensors


def synthetic(graph, *, device_per_node: float, cloud_per_node: float, tensors, link: Link):
    """Every node costs the same on each side: the figures a profile would give, per node and per segment."""
    device = {n: device_per_node for seg in graph.segments for n in seg}
    cloud = {n: cloud_per_node for n in device}
    seg_device = tuple(sum(device[n] for n in seg) for seg in graph.segments)
    seg_cloud = tuple(sum(cloud[n] for n in seg) for seg in graph.segments)
    inputs = tuple(tensors[n] for n in graph.inputs)
    crossings = (transfer(inputs, 1, SPEED),) + tuple(transfer(tuple(tensors[t] for t in c.tensors), 1, SPEED) for c in graph.cuts)
    costs = ModelCosts(edge_segment_ms=seg_device, edge_overhead_ms=1.0, crossings=crossings,
                       output=transfer((tensors["logits"],), 1, SPEED),
                       edge_memory_bytes=tuple(0 for _ in range(len(graph.segments) + 1)))
    option = CloudOption(node="n", link=link, queue_ms=2.0, segment_ms=seg_cloud, overhead_ms=0.5)
    return device, cloud, costs, option


def test_node_times_share_each_segment_by_roofline_and_keep_its_total(resnet) -> None:
    graph, _ = resnet
    works = node_work(graph.model, concrete_shapes(graph.model, SHAPES))
    segment_ms = tuple(float(i + 1) for i in range(len(graph.segments)))
    times = node_times(graph, segment_ms, works, Machine(11.8, 2.7))
    for seg, total in zip(graph.segments, segment_ms):
        assert sum(times[n] for n in seg) == pytest.approx(total)
    no_work = node_times(graph, segment_ms, {}, Machine(11.8, 2.7))  # equal shares when nothing is known
    assert no_work[graph.segments[0][0]] == pytest.approx(segment_ms[0] / len(graph.segments[0]))


@pytest.mark.parametrize("objective", list(Objective))
def test_a_dag_cut_is_planned_and_priced_as_the_cost_model_prices_any_split(resnet, objective) -> None:
    graph, tensors = resnet
    link = Link(uplink_mbps=400.0, downlink_mbps=400.0, rtt_ms=10.0)
    device, cloud, costs, option = synthetic(graph, device_per_node=2.0, cloud_per_node=0.5, tensors=tensors, link=link)
    local_ms = sum(costs.edge_segment_ms) + costs.edge_overhead_ms
    weights = terms(objective, 0.5, POWER, link, local_total_ms=local_ms, local_energy_j=POWER.active_w * local_ms / 1e3)
    cut = best_cut(graph, device_ms=device, cloud_ms=cloud, tensors=tensors, weights=weights, link=link, encoding=1,
                   speed=SPEED, privacy_min_local=8)
    if cut is None:  # the optimum is a chain cut for this objective: the chain planner has it already
        return
    assert cut.index == 0 and cut.key.startswith("g")
    dag = price(graph, cut, device_ms=device, cloud_ms_by_node={"n": cloud}, tensors=tensors, encoding=1, speed=SPEED,
                input_bytes=tensors["input"].raw_bytes)
    edge = set(graph.edge_nodes(cut))
    assert dag.edge_ms == pytest.approx(sum(device[n] for n in edge))
    assert dag.rest_ms + dag.edge_ms == pytest.approx(sum(device.values()))
    assert dag.cloud_ms["n"] == pytest.approx(sum(t for n, t in cloud.items() if n not in edge))
    assert dag.whole_segments >= 8  # the privacy floor's segments stay on the device
    decision = choose(costs, [option], POWER, objective=objective, dag_cuts=[dag], dag_min_gain=0.0)
    offered = [c for c in decision.candidates if c.cut_key == cut.key]
    if not offered:  # the min-cut ties a chain cut for this objective: nothing to add
        return
    (candidate,) = offered
    up = dag.crossing.wire_bytes * 8 / (link.uplink_mbps * 1e6) * 1e3
    down = costs.output.wire_bytes * 8 / (link.downlink_mbps * 1e6) * 1e3
    expected_ms = (dag.edge_ms + costs.edge_overhead_ms + dag.crossing.encode_ms + link.rtt_ms + up + down + option.queue_ms
                   + dag.cloud_ms["n"] + option.overhead_ms + dag.crossing.decode_ms + costs.output.encode_ms
                   + costs.output.decode_ms)
    assert candidate.stages.total_ms == pytest.approx(expected_ms)
    assert candidate.label == f"split:{cut.key}" and candidate.rest_ms == pytest.approx(dag.rest_ms + 1.0)
    # the min-cut minimises the objective's variable part: no chain split that keeps the
    # privacy floor scores better
    chain = [c for c in decision.candidates if c.kind == "split" and not c.cut_key and c.k >= 8]
    assert candidate.score <= min(c.score for c in chain) + 1e-9


def test_the_resnet_fork_gives_a_dag_cut_that_wins(resnet) -> None:
    """Device 4x slower, 400 Mbit/s, the first 8 segments kept on the device: the best
    split runs both strided convs of layer 2's first block on the device and ships their
    outputs (6.5 % below the best chain split, above the 5 % bar), and the decision takes it."""
    graph, tensors = resnet
    link = Link(uplink_mbps=400.0, downlink_mbps=400.0, rtt_ms=10.0)
    device, cloud, costs, option = synthetic(graph, device_per_node=2.0, cloud_per_node=0.5, tensors=tensors, link=link)
    weights = terms(Objective.LATENCY, 0.5, POWER, link, local_total_ms=1.0, local_energy_j=1.0)
    cut = best_cut(graph, device_ms=device, cloud_ms=cloud, tensors=tensors, weights=weights, link=link, encoding=1,
                   speed=SPEED, privacy_min_local=8)
    assert cut is not None and set(cut.tensors) == {"layer2_1_conv1", "layer2_1_down"}
    dag = price(graph, cut, device_ms=device, cloud_ms_by_node={"n": cloud}, tensors=tensors, encoding=1, speed=SPEED,
                input_bytes=tensors["input"].raw_bytes)
    decision = choose(costs, [option], POWER, dag_cuts=[dag], constraints=Constraints(privacy_min_local=8))
    assert decision.winner is not None and decision.winner.cut_key == cut.key, decision.why
    best_chain = min(c.stages.total_ms for c in decision.candidates if c.kind == "split" and not c.cut_key and c.k >= 8)
    assert decision.winner.stages.total_ms < (1 - DAG_MIN_GAIN) * best_chain


def test_a_dag_cut_is_weighed_against_the_chain_splits_the_policy_allows() -> None:
    """Under a privacy floor of 2 the cheap split:1 is illegal: a DAG cut that keeps both
    floor segments and beats LOCAL must not be hidden by the illegal split's score."""
    costs = ModelCosts(edge_segment_ms=(1.0, 19.0, 10.0, 10.0), edge_overhead_ms=0.0,
                       crossings=tuple(Transfer(b, 0.0, 0.0) for b in (100_000, 1_000, 500_000, 500_000)),
                       output=Transfer(100, 0.0, 0.0), edge_memory_bytes=(0,) * 5)
    cloud = CloudOption(node="n", link=Link(10.0, 10.0, 2.0), queue_ms=0.0, segment_ms=(0.1,) * 4, overhead_ms=0.0)
    dag = DagCut(key="gfloor", edge_ms=25.0, rest_ms=15.0, crossing=Transfer(2_000, 0.0, 0.0), memory_bytes=0,
                 whole_segments=2, cloud_ms={"n": 1.0})
    decision = choose(costs, [cloud], POWER, dag_cuts=[dag], constraints=Constraints(privacy_min_local=2))
    split1 = next(c for c in decision.candidates if c.label == "split:1")
    assert split1.hard_violation and split1.stages.total_ms < 20.0  # cheap, but breaks the floor
    assert decision.winner.cut_key == "gfloor", decision.why


def test_a_dag_cut_within_the_bar_of_a_chain_cut_is_not_offered(resnet) -> None:
    graph, tensors = resnet
    link = Link(uplink_mbps=400.0, downlink_mbps=400.0, rtt_ms=10.0)
    _, _, costs, option = synthetic(graph, device_per_node=2.0, cloud_per_node=0.5, tensors=tensors, link=link)
    chain = choose(costs, [option], POWER)
    best = min((c for c in chain.candidates if c.kind == "split"), key=lambda c: c.stages.total_ms)
    # a DAG cut priced exactly as the best chain split, less 1 %: not worth its cold sessions
    same = DagCut(key="gsame", edge_ms=best.stages.edge_ms - costs.edge_overhead_ms - 0.01 * best.stages.total_ms,
                  rest_ms=0.0, crossing=costs.crossings[best.k], memory_bytes=0, whole_segments=best.k,
                  cloud_ms={"n": sum(option.segment_ms[best.k:])})
    assert not [c for c in choose(costs, [option], POWER, dag_cuts=[same]).candidates if c.cut_key]
    assert [c for c in choose(costs, [option], POWER, dag_cuts=[same], dag_min_gain=0.0).candidates if c.cut_key]


def test_a_dag_cut_is_refused_where_the_policy_lists_allowed_cuts(resnet) -> None:
    graph, tensors = resnet
    link = Link(100.0, 100.0, 10.0)
    _, _, costs, option = synthetic(graph, device_per_node=2.0, cloud_per_node=0.1, tensors=tensors, link=link)
    dag = DagCut(key="gabc", edge_ms=1.0, rest_ms=1.0, crossing=Transfer(10, 0.0, 0.0), memory_bytes=0,
                 whole_segments=1, cloud_ms={"n": 0.1})
    decision = choose(costs, [option], POWER, dag_cuts=[dag], constraints=Constraints(allowed_cuts=frozenset({3})),
                      dag_min_gain=-1.0)
    (candidate,) = [c for c in decision.candidates if c.cut_key == "gabc"]
    assert candidate.hard_violation and "a DAG cut not in allowed cuts" in candidate.violations[0]


# --------------------------------------------------------------------------- codecs


def chain3(raw_bytes: int = 100_000, segments=(2.0, 20.0, 20.0)) -> ModelCosts:
    raw = Transfer(raw_bytes, 0.1, 0.1)
    return ModelCosts(edge_segment_ms=segments, edge_overhead_ms=0.0, crossings=(raw, raw, raw),
                      output=Transfer(100, 0.0, 0.0), edge_memory_bytes=(0, 0, 0, 0))


def test_a_codec_is_used_only_where_its_measured_error_fits_the_budget() -> None:
    errors = CodecErrors({2: (0.0005, 0.0004, 0.0003), 3: (0.03, 0.004, 0.02)}, "x[1,8]")
    assert codec_limits(errors, 3, 0.01, 3) == (frozenset({1}), False)
    assert codec_limits(errors, 2, 0.01, 3) == (frozenset({1, 2}), True)
    assert codec_limits(errors, 1, 0.01, 3) == (frozenset({1, 2}), True)       # raw: lossless everywhere
    assert codec_limits(None, 3, 0.01, 3) is None                               # not measured: never chosen
    int8 = CodecOption("int8", 3, crossings=tuple(Transfer(25_000, 0.2, 0.2) for _ in range(3)),
                       output_error=errors.by_encoding[3], usable=frozenset({1}))
    fp16 = CodecOption("fp16", 2, crossings=tuple(Transfer(50_000, 0.1, 0.1) for _ in range(3)),
                       output_error=errors.by_encoding[2], usable=frozenset({0, 1, 2}))
    slow = CloudOption(node="n", link=Link(10.0, 50.0, 5.0), queue_ms=0.0, segment_ms=(0.5, 0.5, 0.5), overhead_ms=0.0)
    decision = choose(chain3(), [slow], POWER, codecs=[fp16, int8])
    lossy = [c for c in decision.candidates if c.codec]
    # each codec's best plan on the node is a candidate, and int8 only where it fits the budget
    assert sorted(c.codec for c in lossy) == ["fp16", "int8"]
    assert {c.label for c in lossy if c.codec == "int8"} == {"split:1+int8"}
    # on a 10 Mbit/s uplink the smallest tensor wins (int8 split:1: 2 + 0.2 + 5 + 20 + 1 + 0.2 ms
    # against 42 ms LOCAL and 47 ms for fp16 there): int8, at the one cut where it fits
    assert decision.winner.label == "split:1+int8" and decision.winner.output_error == 0.004
    assert decision.winner.encoding == 3 and decision.winner.uplink_bytes == 25_000


def test_equal_predictions_keep_the_lossless_codec() -> None:
    same = CodecOption("fp16", 2, crossings=chain3().crossings, output_error=(0.001,) * 3, usable=frozenset({0, 1, 2}))
    fast = CloudOption(node="n", link=Link(1000.0, 1000.0, 1.0), queue_ms=0.0, segment_ms=(0.1, 0.1, 0.1), overhead_ms=0.0)
    decision = choose(chain3(), [fast], POWER, codecs=[same])
    assert decision.winner.codec == "" and decision.winner.output_error == 0.0


def test_the_plan_requests_run_now_stays_priced_for_hysteresis() -> None:
    """Only each codec's best plan is listed, but the current one (kept) is too, so
    hysteresis can weigh it against the winner instead of switching without a margin."""
    fp16 = CodecOption("fp16", 2, crossings=tuple(Transfer(50_000, 0.1, 0.1) for _ in range(3)),
                       output_error=(0.001,) * 3, usable=frozenset({0, 1, 2}))
    slow = CloudOption(node="n", link=Link(10.0, 50.0, 5.0), queue_ms=0.0, segment_ms=(0.5, 0.5, 0.5), overhead_ms=0.0)
    plain = choose(chain3(), [slow], POWER, codecs=[fp16])
    (best,) = [c.label for c in plain.candidates if c.codec]
    other = next(label for label in ("split:2+fp16", "split:1+fp16") if label != best)
    kept = choose(chain3(), [slow], POWER, codecs=[fp16], keep=frozenset({other}))
    assert {c.label for c in kept.candidates if c.codec} == {best, other}
    assert kept.winner.label == plain.winner.label
