"""partitioner.mincut: the s-t minimum cut finds the best downward-closed device set, checked by enumeration."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelzoo.build import build_branchy, build_dag
from partitioner.graph import ModelGraph, analyze, prefix_model, suffix_model
from partitioner.mincut import (
    CutProblem,
    CutSolution,
    MinCutError,
    Tensor,
    cut_for,
    graph_problem,
    solve,
    split_cost,
)


def _problem(edges: dict[str, tuple[str, ...]], device: dict[str, float], cloud: dict[str, float], *,
             send: dict[str, float], download: dict[str, float] | None = None,
             pinned: tuple[str, ...] = ()) -> CutProblem:
    """Node `v` produces tensor `v` read by `edges[v]`; the graph input `x` feeds `edges['x']`."""
    nodes = tuple(device)
    tensors = [Tensor("x", None, edges.get("x", ()), send.get("x", 0.0))]
    tensors += [Tensor(v, v, edges.get(v, ()), send.get(v, 0.0), (download or {}).get(v, 0.0)) for v in nodes]
    return CutProblem(nodes, device, cloud, tuple(tensors), frozenset(pinned))


def _closed_sets(problem: CutProblem) -> list[frozenset[str]]:
    """Every device set that split_cost accepts: downward-closed, pinned nodes included."""
    found = []
    for bits in itertools.product((False, True), repeat=len(problem.nodes)):
        device = frozenset(v for v, on in zip(problem.nodes, bits) if on)
        try:
            split_cost(problem, device)
        except MinCutError:
            continue
        found.append(device)
    return found


def _assert_optimal(problem: CutProblem) -> CutSolution:
    """The solver's answer costs the enumerated optimum and is the largest optimal device set."""
    costs = {device: split_cost(problem, device).cost for device in _closed_sets(problem)}
    best = min(costs.values())
    solution = solve(problem)
    assert solution.cost == pytest.approx(best, rel=1e-9, abs=0)
    optimal = [d for d, c in costs.items() if c <= best * (1 + 1e-9)]
    assert solution.device == max(optimal, key=len)
    assert all(d <= solution.device for d in optimal)  # the optimal sets form a lattice; this is its top
    assert solution == split_cost(problem, solution.device)
    return solution


# ----------------------------------------------------------------------------- small graphs, optimum by enumeration


def test_diamond_splits_after_the_fork_when_the_branches_are_cheap_to_ship() -> None:
    # x -> a -> (b, c) -> d: a shrinks the data, b and c are heavy on the device.
    problem = _problem(
        {"x": ("a",), "a": ("b", "c"), "b": ("d",), "c": ("d",)},
        device={"a": 1, "b": 10, "c": 10, "d": 1}, cloud={"a": 1, "b": 1, "c": 1, "d": 1},
        send={"x": 50, "a": 2, "b": 30, "c": 30, "d": 30}, download={"d": 1},
    )
    solution = _assert_optimal(problem)
    assert solution.device == {"a"} and solution.sent == ("a",) and solution.downloaded == ("d",)
    assert solution.cost == 1 + 2 + 1 + 1 + 1 + 1


def test_parallel_branches_one_on_each_side_which_no_chain_prefix_gives() -> None:
    # Two branches from x rejoin in j. p1 shrinks branch p's data, q1 shrinks branch q's; p2/q2 are heavy.
    # In the topological order p1 p2 q1 q2 j, the best set {p1, q1} is not a prefix.
    edges = {"x": ("p1", "q1"), "p1": ("p2",), "p2": ("j",), "q1": ("q2",), "q2": ("j",)}
    problem = _problem(
        edges, device={"p1": 1, "p2": 20, "q1": 1, "q2": 20, "j": 1}, cloud={v: 1 for v in ("p1", "p2", "q1", "q2", "j")},
        send={"x": 100, "p1": 3, "p2": 40, "q1": 3, "q2": 40, "j": 40}, download={"j": 2},
    )
    solution = _assert_optimal(problem)
    assert solution.device == {"p1", "q1"} and solution.sent == ("p1", "q1")
    order = problem.nodes
    prefixes = [frozenset(order[:k]) for k in range(len(order) + 1)]
    assert solution.cost < min(split_cost(problem, p).cost for p in prefixes)


def test_skip_connection_ships_both_the_branch_and_the_skip() -> None:
    # x -> a -> b -> c, plus a -> c (a skip): cutting after b ships b and a.
    problem = _problem(
        {"x": ("a",), "a": ("b", "c"), "b": ("c",)},
        device={"a": 1, "b": 1, "c": 30}, cloud={"a": 5, "b": 5, "c": 1},
        send={"x": 100, "a": 4, "b": 4, "c": 100}, download={"c": 1},
    )
    solution = _assert_optimal(problem)
    assert solution.device == {"a", "b"} and solution.sent == ("a", "b")


def test_a_tensor_read_by_several_cloud_nodes_is_shipped_once() -> None:
    # a (pinned) feeds three consumers that are cheap in the cloud; shipping a once (6) beats running
    # them on the device (3 x 3 = 9), though paying it per consumer (18) would not.
    problem = _problem(
        {"x": ("a",), "a": ("u", "v", "w")},
        device={"a": 0, "u": 3, "v": 3, "w": 3}, cloud={"a": 0, "u": 0, "v": 0, "w": 0},
        send={"a": 6}, pinned=("a",),
    )
    solution = _assert_optimal(problem)
    assert solution.device == {"a"} and solution.cost == 6 and solution.sent == ("a",)


def test_pinned_nodes_stay_on_the_device_and_pull_their_producers() -> None:
    problem = _problem(
        {"x": ("a",), "a": ("b",), "b": ("c",)},
        device={"a": 10, "b": 10, "c": 10}, cloud={"a": 0, "b": 0, "c": 0}, send={"x": 1, "a": 1, "b": 1, "c": 1},
        pinned=("b",),
    )
    solution = _assert_optimal(problem)
    assert solution.device == {"a", "b"}  # b is pinned, so a (its producer) must be there too


def test_results_computed_on_the_device_cost_nothing_to_bring_back() -> None:
    # Everything equal except the output's download: running the last node locally wins.
    problem = _problem(
        {"x": ("a",), "a": ("b",)}, device={"a": 1, "b": 1}, cloud={"a": 1, "b": 1},
        send={"x": 1, "a": 1}, download={"b": 5},
    )
    assert _assert_optimal(problem).device == {"a", "b"}


def test_infinite_costs_forbid_a_side_without_breaking_the_solve() -> None:
    # c cannot run in the cloud, and a's tensor cannot cross (say, no sub-model can declare it).
    problem = _problem(
        {"x": ("a",), "a": ("b",), "b": ("c",)},
        device={"a": 1, "b": 9, "c": 1}, cloud={"a": 0, "b": 0, "c": math.inf},
        send={"x": 0, "a": math.inf, "b": 0},
    )
    solution = solve(problem)
    assert solution.device == {"a", "b", "c"} and solution.cost == 11
    assert solution == split_cost(problem, solution.device)


def test_seeded_random_dags_match_enumeration() -> None:
    rng = random.Random(20260)
    for _ in range(120):
        n = rng.randint(1, 8)
        nodes = [f"n{i}" for i in range(n)]
        edges = {"x": tuple(v for v in nodes if v == "n0" or rng.random() < 0.25)}
        for i, v in enumerate(nodes):
            edges[v] = tuple(w for j, w in enumerate(nodes) if j > i and (j == i + 1 or rng.random() < 0.3))
        last = {v for v in nodes if not edges[v]}
        problem = _problem(
            edges, device={v: rng.randint(0, 12) for v in nodes}, cloud={v: rng.randint(0, 6) for v in nodes},
            send={v: rng.randint(0, 15) for v in ("x", *nodes)}, download={v: rng.randint(0, 4) for v in last},
            pinned=tuple(rng.sample(nodes, rng.randint(0, 1))),
        )
        _assert_optimal(problem)


def test_fractional_costs_match_enumeration() -> None:
    rng = np.random.default_rng(5)
    edges = {"x": ("a", "b"), "a": ("c",), "b": ("c", "d"), "c": ("e",), "d": ("e",)}
    for _ in range(30):
        nodes = ("a", "b", "c", "d", "e")
        problem = _problem(
            edges, device=dict(zip(nodes, rng.uniform(0, 5, 5))), cloud=dict(zip(nodes, rng.uniform(0, 2, 5))),
            send=dict(zip(("x", *nodes), rng.uniform(0, 8, 6))), download={"e": float(rng.uniform(0, 1))},
        )
        _assert_optimal(problem)


def test_ties_go_to_the_larger_device_side_every_time() -> None:
    edges = {"x": ("a",), "a": ("b",), "b": ("c",)}
    free = _problem(edges, device={"a": 0, "b": 0, "c": 0}, cloud={"a": 0, "b": 0, "c": 0}, send={})
    assert solve(free).device == {"a", "b", "c"}
    # Cutting after a or after b costs the same (5); after b is the larger device side.
    tied = _problem(edges, device={"a": 1, "b": 0, "c": 9}, cloud={"a": 1, "b": 0, "c": 0},
                    send={"x": 9, "a": 4, "b": 4})
    assert split_cost(tied, {"a"}).cost == split_cost(tied, {"a", "b"}).cost == 5
    answers = {solve(tied).device for _ in range(5)}
    assert answers == {frozenset({"a", "b"})}
    # Listing the nodes in another order changes nothing.
    shuffled = CutProblem(tied.nodes[::-1], tied.device_cost, tied.cloud_cost, tied.tensors[::-1])
    assert solve(shuffled).device == {"a", "b"}


def test_malformed_problems_are_refused_with_the_reason() -> None:
    edges = {"x": ("a",)}
    with pytest.raises(MinCutError, match="no cloud cost for nodes"):
        _problem(edges, device={"a": 1}, cloud={}, send={})
    with pytest.raises(MinCutError, match="device cost of node 'a' is -1: costs must be >= 0"):
        _problem(edges, device={"a": -1}, cloud={"a": 1}, send={})
    with pytest.raises(MinCutError, match="device cost of node 'a' is inf: device costs must be finite"):
        _problem(edges, device={"a": math.inf}, cloud={"a": 1}, send={})
    with pytest.raises(MinCutError, match="unknown nodes"):
        CutProblem(("a",), {"a": 1}, {"a": 1}, (Tensor("t", "a", ("b",)),))
    with pytest.raises(MinCutError, match="pinned nodes"):
        CutProblem(("a",), {"a": 1}, {"a": 1}, (), frozenset({"b"}))
    problem = _problem({"x": ("a",), "a": ("b",)}, device={"a": 1, "b": 1}, cloud={"a": 1, "b": 1}, send={})
    with pytest.raises(MinCutError, match="'b' runs on the device but reads 'a' from the cloud"):
        split_cost(problem, {"b"})


def test_a_thousand_node_dag_solves_exactly() -> None:
    # Correctness at size (the timing is a benchmark figure, not asserted): a long chain with
    # seeded skips and a costly tail; the answer is a minimum among all its chain prefixes too.
    rng = random.Random(3)
    n = 1000
    nodes = [f"n{i}" for i in range(n)]
    edges = {"x": ("n0",)}
    for i, v in enumerate(nodes[:-1]):
        skips = {nodes[min(n - 1, i + rng.randint(2, 6))]} if rng.random() < 0.2 else set()
        edges[v] = tuple(sorted({nodes[i + 1], *skips}))
    problem = _problem(
        edges, device={v: rng.uniform(0.5, 1.5) * (1 + 3 * (i > 600)) for i, v in enumerate(nodes)},
        cloud={v: 0.2 for v in nodes}, send={v: rng.uniform(5, 50) for v in ("x", *nodes)}, download={nodes[-1]: 1.0},
    )
    solution = solve(problem)
    assert solution == split_cost(problem, solution.device)
    prefixes = [split_cost(problem, nodes[:k]).cost for k in range(n + 1)]
    assert solution.cost <= min(prefixes) + 1e-6


# ----------------------------------------------------------------------------- from a real ModelGraph


def _run_cut(graph: ModelGraph, cut, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pre = ort.InferenceSession(prefix_model(graph, cut).SerializeToString(), providers=["CPUExecutionProvider"])
    post = ort.InferenceSession(suffix_model(graph, cut).SerializeToString(), providers=["CPUExecutionProvider"])
    edge = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, {i.name: feed[i.name] for i in pre.get_inputs()})))
    edge.update({t: feed[t] for t in cut.passthrough})
    out = dict(zip([o.name for o in post.get_outputs()], post.run(None, {t: edge[t] for t in cut.tensors})))
    out.update({o: edge[o] for o in cut.edge_outputs})
    return out


def test_graph_problem_finds_a_dag_cut_that_beats_every_chain_cut() -> None:
    graph = analyze(build_dag(seed=0))
    names = [n.name for n in graph.model.graph.node]
    # The device is 4x slower than the cloud; tensors before the first downsampling are 10x dearer
    # to ship. Layer 2's first block has two branches from one big tensor: the best split runs the
    # first conv of each branch on the device, which no prefix of the chain order does.
    device = {n: 2.0 for n in names}
    cloud = {n: 0.5 for n in names}
    pinned = [n for segment in graph.segments[:8] for n in segment]
    problem = graph_problem(graph, device_cost=device, cloud_cost=cloud,
                            send_cost=lambda t: 30.0 if t.startswith(("input", "stem", "layer1")) else 3.0,
                            download_cost=lambda t: 0.5, pinned=pinned)
    assert set(pinned) & set(problem.nodes) <= problem.pinned
    solution = solve(problem)
    cut = cut_for(graph, solution)
    assert cut is not None and cut.index == 0 and cut.tensors == ("layer2_1_conv1", "layer2_1_down")
    assert set(graph.edge_nodes(cut)) == solution.device
    assert set(cut.tensors) == set(solution.sent)
    chain_costs = [split_cost(problem, graph.edge_nodes(c)).cost for c in graph.cuts
                   if problem.pinned <= set(graph.edge_nodes(c))]
    assert chain_costs and solution.cost < min(chain_costs)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = ort.InferenceSession(graph.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(_run_cut(graph, cut, {"input": x})["logits"], want[0], rtol=1e-5, atol=1e-5)


def test_graph_problem_local_and_remote_give_no_cut() -> None:
    graph = analyze(build_branchy(seed=0))
    names = [n.name for n in graph.model.graph.node]
    everything_local = solve(graph_problem(graph, device_cost={n: 0.0 for n in names}, cloud_cost={n: 1.0 for n in names},
                                           send_cost=lambda t: 1.0, download_cost=lambda t: 1.0))
    assert not everything_local.is_split and cut_for(graph, everything_local) is None
    remote = solve(graph_problem(graph, device_cost={n: 5.0 for n in names}, cloud_cost={n: 0.0 for n in names},
                                 send_cost=lambda t: 0.0, download_cost=lambda t: 0.0))
    assert not remote.device and cut_for(graph, remote) is None
    with pytest.raises(MinCutError, match="no device cost for nodes"):
        graph_problem(graph, device_cost={}, cloud_cost={}, send_cost=lambda t: 0.0, download_cost=lambda t: 0.0)
    with pytest.raises(MinCutError, match="pinned nodes .*'nope'"):
        graph_problem(graph, device_cost={n: 0.0 for n in names}, cloud_cost={n: 0.0 for n in names},
                      send_cost=lambda t: 0.0, download_cost=lambda t: 0.0, pinned=["nope"])


def test_tensors_no_sub_model_can_declare_never_cross() -> None:
    # b comes out of a custom-domain op, so shape inference cannot type it: the split must not ship it,
    # however cheap that would be.
    def vi(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2, 3])

    nodes = [
        onnx.helper.make_node("Sin", ["x"], ["a"], name="sin"),
        onnx.helper.make_node("Foo", ["a"], ["b"], name="foo", domain="custom"),
        onnx.helper.make_node("Bar", ["b"], ["y"], name="bar", domain="custom"),
    ]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "custom_ops", [vi("x")], [vi("y")]),
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("custom", 1)],
    )
    graph = analyze(model)
    assert graph.crossable("a") and not graph.crossable("b")
    problem = graph_problem(graph, device_cost={"sin": 1.0, "foo": 1.0, "bar": 50.0},
                            cloud_cost={"sin": 0.0, "foo": 0.0, "bar": 0.0},
                            send_cost=lambda t: {"x": 100.0, "a": 10.0, "b": 0.0}[t], download_cost=lambda t: 0.0)
    solution = solve(problem)
    assert solution.device == {"sin"} and solution.sent == ("a",) and solution.cost == 11.0
    assert cut_for(graph, solution) == graph.find_cut(["a"])


def test_degenerate_scales_solve() -> None:
    edges = {"x": ("a",), "a": ("b",)}
    tiny = _problem(edges, device={"a": 1e-300, "b": 3e-300}, cloud={"a": 2e-300, "b": 1e-300},
                    send={"x": 5e-300, "a": 1e-300})
    assert _assert_optimal(tiny).device == {"a"}
    huge = _problem(edges, device={"a": 1e300, "b": 3e300}, cloud={"a": 2e300, "b": 1e300},
                    send={"x": 5e300, "a": 1e300})
    assert _assert_optimal(huge).device == {"a"}
    empty = CutProblem((), {}, {}, (Tensor("x", None, ()),))
    assert solve(empty) == CutSolution(frozenset(), frozenset(), 0.0)
