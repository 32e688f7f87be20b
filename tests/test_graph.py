"""partitioner.graph: every cut of real models, run with onnxruntime, composes to the whole model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelzoo.build import build_chain, build_dag
from partitioner.graph import (
    Cut,
    GraphError,
    ModelGraph,
    analyze,
    expose_tensors,
    prefix_model,
    suffix_model,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _run_split(
    graph: ModelGraph, cut: Cut, feeds: list[dict[str, np.ndarray]],
) -> list[dict[str, np.ndarray]]:
    """Prefix then suffix, the way the edge and the cloud run them; one result per feed."""
    prefix, suffix = prefix_model(graph, cut), suffix_model(graph, cut)
    onnx.checker.check_model(prefix, full_check=True)
    onnx.checker.check_model(suffix, full_check=True)
    assert [i.name for i in suffix.graph.input] == list(cut.tensors)
    pre, post = _session(prefix), _session(suffix)
    pre_inputs = [i.name for i in pre.get_inputs()]
    pre_outputs = [o.name for o in pre.get_outputs()]
    post_outputs = [o.name for o in post.get_outputs()]
    results = []
    for feed in feeds:
        edge = dict(zip(pre_outputs, pre.run(pre_outputs, {n: feed[n] for n in pre_inputs})))
        shipped = {t: feed[t] if t in cut.passthrough else edge[t] for t in cut.tensors}
        out = dict(zip(post_outputs, post.run(post_outputs, shipped)))
        out.update({o: edge[o] if o in edge else feed[o] for o in cut.edge_outputs})
        results.append(out)
    return results


def _assert_every_cut_matches(graph: ModelGraph, feeds: list[dict[str, np.ndarray]]) -> None:
    expected = [_run(graph.model, feed) for feed in feeds]
    for cut in graph.cuts:
        for want, got in zip(expected, _run_split(graph, cut, feeds)):
            assert set(got) == set(graph.outputs), cut
            for name in graph.outputs:
                np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=f"cut {cut}")


def _image(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, shape=(2, 3), elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


@pytest.fixture(scope="module")
def chain() -> ModelGraph:
    return analyze(build_chain(seed=0))


@pytest.fixture(scope="module")
def dag() -> ModelGraph:
    return analyze(build_dag(seed=0))


# ----------------------------------------------------------------------------- reference models


def test_chain_every_cut_reproduces_the_whole_model(chain: ModelGraph) -> None:
    assert 15 <= len(chain.cuts) <= 30
    assert all(len(c.tensors) == 1 and not c.passthrough and not c.edge_outputs for c in chain.cuts)
    _assert_every_cut_matches(chain, [{"input": _image(1, seed=1)}])


def test_dag_every_cut_reproduces_the_whole_model_at_batch_1_and_2(dag: ModelGraph) -> None:
    sizes = {len(c.tensors) for c in dag.cuts}
    assert {1, 2} <= sizes, sizes
    # A cut inside a residual block ships the skip as well as the branch.
    assert dag.find_cut(["stem_pool", "layer1_1_relu1"]).index > dag.find_cut(["stem_pool"]).index
    _assert_every_cut_matches(dag, [{"input": _image(1, seed=2)}, {"input": _image(2, seed=3)}])


def test_segments_and_cuts_are_consistent(chain: ModelGraph, dag: ModelGraph) -> None:
    for graph in (chain, dag):
        assert len(graph.segments) == len(graph.cuts) + 1 == len(graph.segment_param_bytes)
        assert [c.index for c in graph.cuts] == list(range(1, len(graph.cuts) + 1))
        names = [n.name for n in graph.model.graph.node]
        assert len(set(names)) == len(names)
        # Every node in exactly one segment, in topological order within it (constant
        # nodes sit with their first user, so the concatenation is a permutation).
        assert sorted(n for seg in graph.segments for n in seg) == sorted(names)
        assert all(list(seg) == sorted(seg, key=names.index) for seg in graph.segments)
        total = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.model.graph.initializer)
        assert sum(graph.segment_param_bytes) >= total  # shared initializers count in each segment
    # BN and ReLU6 are grouped with their conv: three nodes per chain segment until the head.
    assert chain.segments[0] == ("stem", "stem_bn", "stem_relu6")


def test_shape_subgraph_tensors_cross_and_constants_never_do(dag: ModelGraph) -> None:
    constants = {"flatten_index", "flatten_axes", "flatten_rest"}
    assert not any(constants & set(c.tensors) for c in dag.cuts)
    shape_cuts = [c for c in dag.cuts if "flatten_shape" in c.tensors or "flatten_target" in c.tensors]
    assert shape_cuts and all(c.tensors[0] == "avgpool" and len(c.tensors) == 2 for c in shape_cuts)
    cut = dag.find_cut(["avgpool", "flatten_batch"])
    suffix = suffix_model(dag, cut)
    suffix_nodes = {n.name for n in suffix.graph.node}
    assert {"flatten_axes", "flatten_rest"} <= suffix_nodes and "flatten_index" not in suffix_nodes
    assert "flatten_index" in {n.name for n in prefix_model(dag, cut).graph.node}
    # Shapes keep the symbolic batch where inference knows it; int64 shape tensors keep their type.
    inputs = {i.name: i.type.tensor_type for i in suffix.graph.input}
    assert inputs["avgpool"].shape.dim[0].dim_param == "N"
    assert inputs["flatten_batch"].elem_type == TensorProto.INT64


def test_find_cut_round_trips_and_rejects_other_sets(dag: ModelGraph) -> None:
    for cut in dag.cuts:
        assert dag.find_cut(reversed(cut.tensors)) == cut
        assert dag.cut(cut.index) == cut
    with pytest.raises(GraphError, match="is not a valid cut of resnet"):
        dag.find_cut(["stem_pool", "layer2_2_relu2"])
    with pytest.raises(GraphError, match="no tensor named 'nope'"):
        dag.find_cut(["nope"])
    with pytest.raises(GraphError, match=r"valid cuts are 1\.\.62"):
        dag.cut(0)


def test_expose_tensors_measures_real_sizes(dag: ModelGraph) -> None:
    cut = dag.find_cut(["stem_pool", "layer1_1_relu1"])
    out = _run(expose_tensors(dag, cut.tensors), {"input": _image(2, seed=4)})
    assert out["stem_pool"].shape == out["layer1_1_relu1"].shape == (2, 16, 56, 56)
    with pytest.raises(GraphError, match="no tensor named"):
        expose_tensors(dag, ["missing"])


def test_analysis_ignores_file_order_and_is_deterministic() -> None:
    model = build_chain(seed=0)
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    nodes = list(shuffled.graph.node)[::-1]
    shuffled.graph.ClearField("node")
    shuffled.graph.node.extend(nodes)
    a, b = analyze(model), analyze(shuffled)
    assert a.cuts == b.cuts and a.segments == b.segments
    assert analyze(model).cuts == a.cuts


# ----------------------------------------------------------------------------- small factories


def test_one_node_model_is_refused_with_a_reason() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")])
    with pytest.raises(GraphError, match="only one node .*Relu.* depends on the graph inputs"):
        analyze(model, name="one")


def test_followers_only_model_is_refused() -> None:
    nodes = [helper.make_node("Sin", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    with pytest.raises(GraphError, match="element-wise follower"):
        analyze(_model(nodes, [_vi("x")], [_vi("y")]))


def test_if_node_counts_outer_scope_tensors_as_inputs() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["b", "a"], ["t"])], "then", [], [_vi("t")])
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["b", "a"], ["e"])], "else", [], [_vi("e")])
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["a"], name="square"),
        helper.make_node("Sin", ["x"], ["b"], name="sin"),
        helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = analyze(_model(nodes, [_vi("x")], [_vi("y")], [zero]), name="branchy")
    assert graph.find_cut(["cond", "a", "b"]).tensors == ("a", "b", "cond")
    assert graph.find_cut(["x", "a"]).passthrough == ("x",)
    _assert_every_cut_matches(graph, [{"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5}])


def test_two_outputs_one_produced_early() -> None:
    nodes = [
        helper.make_node("Sin", ["x"], ["early"], name="sin"),
        helper.make_node("Cos", ["x"], ["c"], name="cos"),
        helper.make_node("Mul", ["c", "early"], ["d"], name="mul"),
        helper.make_node("Add", ["d", "x"], ["late"], name="add"),
    ]
    graph = analyze(_model(nodes, [_vi("x")], [_vi("early"), _vi("late")]), name="two_out")
    first = graph.cut(1)
    assert first.tensors == ("x", "early") and first.passthrough == ("x",)
    assert first.edge_outputs == ("early",)
    assert [o.name for o in suffix_model(graph, first).graph.output] == ["late"]
    _assert_every_cut_matches(graph, [{"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}])


def test_sequence_only_crossing_is_refused() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0),
        helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
    ]
    with pytest.raises(GraphError, match="non-tensor.*'seq' is a sequence"):
        analyze(_model(nodes, [_vi("x")], [_vi("y")]), name="seq")


def test_unnamed_and_duplicate_nodes_get_unique_names() -> None:
    nodes = [
        helper.make_node("Sin", ["x"], ["a"], name="op"),
        helper.make_node("Cos", ["a"], ["b"], name="op"),
        helper.make_node("Neg", ["b"], ["y"]),
    ]
    graph = analyze(_model(nodes, [_vi("x")], [_vi("y")]))
    assert [n.name for n in graph.model.graph.node] == ["op", "Cos_1", "Neg_2"]
    assert [c.tensors for c in graph.cuts] == [("a",), ("b",)]


def test_loop_body_outer_scope_and_outputs_that_are_inputs_or_constants() -> None:
    body = helper.make_graph(
        [helper.make_node("Add", ["v", "a"], ["v2"]), helper.make_node("Identity", ["cond"], ["cond2"])],
        "body", [_vi("i", (), TensorProto.INT64), _vi("cond", (), TensorProto.BOOL), _vi("v")],
        [_vi("cond2", (), TensorProto.BOOL), _vi("v2")],
    )
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.ones((2, 3), np.float32), "ones"),
    ]
    nodes = [
        helper.make_node("Sin", ["x"], ["a"], name="sin"),
        helper.make_node("Cos", ["x"], ["v0"], name="cos"),
        helper.make_node("Loop", ["trip", "true", "v0"], ["y"], name="loop", body=body),
        helper.make_node("Identity", ["ones"], ["k"], name="constant_out"),
    ]
    model = _model(nodes, [_vi("x")], [_vi("y"), _vi("x"), _vi("k")], inits)
    graph = analyze(model, name="loopy")
    assert [c.tensors for c in graph.cuts] == [("x", "a"), ("a", "v0")]
    assert all(c.edge_outputs == ("x",) for c in graph.cuts)
    _assert_every_cut_matches(graph, [{"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}])


def test_random_ops_are_computed_once_not_duplicated_as_constants() -> None:
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], name="noise", shape=[2, 3], seed=1.0),
        helper.make_node("Sin", ["x"], ["a"], name="sin"),
        helper.make_node("Add", ["a", "r"], ["y"], name="add"),
    ]
    graph = analyze(_model(nodes, [_vi("x")], [_vi("y")]))
    assert [c.tensors for c in graph.cuts] == [("x", "r"), ("r", "a")]


def test_broadcasting_or_widening_followers_keep_the_cut_before_them() -> None:
    big = numpy_helper.from_array(np.ones((4, 2, 3), np.float32), "big")
    nodes = [helper.make_node("Sin", ["x"], ["a"]), helper.make_node("Add", ["a", "big"], ["y"])]
    assert [c.tensors for c in analyze(_model(nodes, [_vi("x")], [_vi("y", (4, 2, 3))], [big])).cuts] == [("a",)]
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.UINT8),
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Sin", ["b"], ["y"]),
    ]
    assert [c.tensors for c in analyze(_model(nodes, [_vi("x")], [_vi("y")])).cuts] == [("a",), ("b",)]


def test_a_crossing_tensor_of_unknown_type_is_not_offered_as_a_cut() -> None:
    nodes = [
        helper.make_node("Sin", ["x"], ["a"]),
        helper.make_node("Foo", ["a"], ["b"], domain="custom"),
        helper.make_node("Bar", ["b"], ["y"], domain="custom"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "custom_ops", [_vi("x")], [_vi("y")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
    )
    graph = analyze(model)
    assert [c.tensors for c in graph.cuts] == [("a",)]  # 'a' has an inferred type, 'b' has none
    prefix_model(graph, graph.find_cut(["a"]))
    with pytest.raises(GraphError, match="not a valid cut"):
        graph.find_cut(["b"])


# ----------------------------------------------------------------------------- general (DAG) cuts


def _conv(name: str, x: str, out: str, channels_in: int, channels_out: int, rng: np.random.Generator):
    weight = numpy_helper.from_array(
        rng.standard_normal((channels_out, channels_in, 3, 3)).astype(np.float32) * 0.3, f"{name}_w")
    return helper.make_node("Conv", [x, weight.name], [out], name=name, pads=[1, 1, 1, 1]), weight


def _branchy_model() -> onnx.ModelProto:
    """Two conv/relu branches that rejoin (Add, then Concat with one branch), a skip from the
    input to the end, and an early second output: many downward-closed sets no prefix gives."""
    rng = np.random.default_rng(7)
    convs = [
        _conv("a1", "x", "a1", 4, 4, rng), _conv("a2", "a1r", "a2", 4, 4, rng),
        _conv("b1", "x", "b1", 4, 4, rng), _conv("d", "c", "d", 8, 4, rng),
    ]
    a1, a2, b1, d = (n for n, _ in convs)
    nodes = [
        a1, helper.make_node("Relu", ["a1"], ["a1r"], name="a1_relu"),
        a2, helper.make_node("Relu", ["a2"], ["a2r"], name="a2_relu"),
        b1, helper.make_node("Relu", ["b1"], ["b1r"], name="b1_relu"),
        helper.make_node("Sigmoid", ["b1r"], ["z"], name="early_head"),
        helper.make_node("Add", ["a2r", "b1r"], ["s"], name="join"),
        helper.make_node("Concat", ["s", "b1r"], ["c"], name="concat", axis=1),
        d, helper.make_node("Add", ["d", "x"], ["y"], name="skip"),
    ]
    shape = (1, 4, 8, 8)
    return _model(nodes, [_vi("x", shape)], [_vi("y", shape), _vi("z", shape)], [w for _, w in convs])


def _downward_closed_sets(graph: ModelGraph) -> list[list[str]]:
    """Every non-empty, proper, downward-closed set of input-dependent nodes, by enumeration."""
    nodes = graph.model.graph.node
    producer = {o: n.name for n in nodes for o in n.output}
    names = [n.name for n in nodes]
    needs = {n.name: {producer[i] for i in n.input if i in producer} for n in nodes}
    found = []
    for mask in range(1, 2 ** len(names) - 1):
        chosen = {name for k, name in enumerate(names) if mask >> k & 1}
        if all(needs[name] <= chosen for name in chosen):
            found.append([name for name in names if name in chosen])
    return found


@pytest.fixture(scope="module")
def branchy() -> ModelGraph:
    return analyze(_branchy_model(), name="branchy")


def test_every_downward_closed_set_is_a_cut_that_reproduces_the_model(branchy: ModelGraph) -> None:
    feeds = [{"x": np.random.default_rng(11).standard_normal((1, 4, 8, 8)).astype(np.float32)}]
    expected = _run(branchy.model, feeds[0])
    chain_sets = {frozenset(branchy.edge_nodes(c)): c for c in branchy.cuts}
    cuts: list[Cut] = []
    ambiguous = 0
    for edge in _downward_closed_sets(branchy):
        cut = branchy.cut_of(edge)
        cuts.append(cut)
        if frozenset(edge) in chain_sets:
            assert cut is chain_sets[frozenset(edge)]  # a general cut equal to a chain cut is that chain cut
        else:
            assert cut.index == 0 and set(cut.nodes) <= set(edge) and cut.key.startswith("g")
        assert set(branchy.edge_nodes(cut)) <= set(edge)
        assert branchy.find_cut(reversed(cut.tensors), edge_outputs=cut.edge_outputs) == cut
        # The tensors alone rebuild it, unless the early head (z) could run on either side of
        # them: then a chain cut with those tensors wins, else the cloud computes z.
        rebuilt = branchy.find_cut(cut.tensors)
        assert rebuilt.tensors == cut.tensors
        if rebuilt != cut:
            ambiguous += 1
            assert "b1r" in cut.tensors and set(rebuilt.edge_outputs) ^ set(cut.edge_outputs) == {"z"}
        (got,) = _run_split(branchy, cut, feeds)
        assert set(got) == {"y", "z"}
        for name in ("y", "z"):
            np.testing.assert_allclose(got[name], expected[name], **TOL, err_msg=f"edge {edge}")
    assert len(cuts) > 2 * len(branchy.cuts)  # the chain order misses most of them
    assert 0 < ambiguous < len(cuts) // 2
    assert len({c.key for c in cuts}) == len(set(cuts))  # one key per distinct cut
    # Cuts no prefix of the chain order gives: one branch on the edge, the other in the cloud.
    parallel = branchy.cut_of(["a1", "a1_relu", "b1", "b1_relu"])
    assert parallel.index == 0 and parallel.tensors == ("x", "a1r", "b1r") and parallel.passthrough == ("x",)
    assert branchy.cut_of(["b1", "b1_relu", "early_head"]).edge_outputs == ("z",)


def test_sets_that_are_not_cuts_are_refused_with_the_reason(branchy: ModelGraph) -> None:
    with pytest.raises(GraphError, match=r"'a2' is on the edge but reads 'a1r' from 'a1_relu'.*downward-closed"):
        branchy.cut_of(["a1", "a2"])
    with pytest.raises(GraphError, match="no node named 'nope'"):
        branchy.cut_of(["a1", "nope"])
    every = [n.name for n in branchy.model.graph.node]
    with pytest.raises(GraphError, match=r"nothing crosses \(everything on one side is LOCAL"):
        branchy.cut_of(every)
    with pytest.raises(GraphError, match="nothing crosses"):
        branchy.find_cut([])
    with pytest.raises(GraphError, match="nothing on the cloud side reads 'a2r'.*computes 'y' itself, as it needs 'x'"):
        branchy.find_cut(["a2r", "b1r"])  # the skip (x) does not cross
    with pytest.raises(GraphError, match="node 'join' must run on the edge but reads 'b1r', which 'b1_relu' computes"):
        branchy.find_cut(["x", "a1r", "s"])
    with pytest.raises(GraphError, match="nothing on the cloud side reads 'a1'"):
        branchy.find_cut(["a1", "a1r", "x"])
    with pytest.raises(GraphError, match="'a1_w' is a constant"):
        branchy.find_cut(["x", "a1_w"])
    with pytest.raises(GraphError, match="the cloud cannot compute graph output 'y': it needs 'x'"):
        branchy.find_cut(["s", "b1r"], edge_outputs=[])
    with pytest.raises(GraphError, match=r"\['q'\] are not graph outputs"):
        branchy.find_cut(["x", "a1r"], edge_outputs=["z", "q"])
    with pytest.raises(GraphError, match="does not belong"):
        prefix_model(branchy, Cut(0, ("x", "a1r"), ("x",), (), ("a1", "a1_relu", "b1")))


def test_general_cut_of_the_resnet_dag_ships_the_skip_and_the_downsample(dag: ModelGraph) -> None:
    # The downsample conv of block 2.1 on the edge, its main branch in the cloud.
    chain = dag.find_cut(["layer1_2_relu2"])
    down = [n.name for n in dag.model.graph.node if n.name.startswith("layer2_1_down")]
    cut = dag.cut_of([*dag.edge_nodes(chain), *down])
    assert cut.index == 0 and set(cut.tensors) == {"layer1_2_relu2", dag.model.graph.node[
        dag._facts().node_index[down[-1]]].output[0]}
    assert dag.find_cut(cut.tensors) == cut
    assert dag.edge_param_bytes(cut) > dag.edge_param_bytes(chain)
    _assert_split_matches(dag, cut, [{"input": _image(2, seed=5)}])


def _assert_split_matches(graph: ModelGraph, cut: Cut, feeds: list[dict[str, np.ndarray]]) -> None:
    for feed, got in zip(feeds, _run_split(graph, cut, feeds)):
        want = _run(graph.model, feed)
        for name in graph.outputs:
            np.testing.assert_allclose(got[name], want[name], **TOL)


def test_onnx_model_caches_sessions_per_cut_key(tmp_path, branchy: ModelGraph) -> None:
    from runtimes.onnx_exec import OnnxModel

    path = tmp_path / "branchy.onnx"
    onnx.save(_branchy_model(), str(path))
    model = OnnxModel("branchy", path, threads=1)
    x = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    whole = model.run({"x": x})
    left, right = model.cut_of(["a1", "a1_relu", "b1", "b1_relu"]), model.cut_of(["b1", "b1_relu"])
    chain = model.cut(1)
    for cut in (left, right, chain):
        assert not model.prefix_ready(cut)
        edge = model.run_prefix(cut, {"x": x})
        assert model.prefix_ready(cut)
        rebuilt = model.find_cut(list(cut.tensors), edge_outputs=list(cut.edge_outputs))
        out = model.run_suffix(rebuilt, {t: edge[t] for t in cut.tensors})
        out.update({o: edge[o] for o in cut.edge_outputs})
        for name, want in whole.items():
            np.testing.assert_allclose(out[name], want, **TOL)
    assert len({left.key, right.key, chain.key}) == 3
