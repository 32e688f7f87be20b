"""partitioner.work: hand-counted FLOPs per op, per-segment sums, roofline scaling."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelzoo.build import build_chain, build_dag
from partitioner.graph import analyze
from partitioner.profile import ModelProfile, TensorMeta
from partitioner.work import (
    Machine,
    Work,
    concrete_shapes,
    floor_ms,
    node_work,
    predict_profile,
    predict_segment_ms,
    roofline_ms,
    scaled_segment_ms,
    segment_work,
    unmodelled_ops,
)

F32 = 4  # bytes per float32 element


def _single(
    op: str, inputs: dict[str, tuple[int, ...]], weights: dict[str, tuple[int, ...]], **attrs: object,
) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A one-node float32 model named `op`, and its concrete shapes."""
    inits = [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in weights.items()]
    node = helper.make_node(op, [*inputs, *weights], ["y"], name=op, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, concrete_shapes(model)


def _work(op: str, inputs: dict, weights: dict, **attrs: object) -> tuple[Work, tuple[int, ...]]:
    model, shapes = _single(op, inputs, weights, **attrs)
    return node_work(model, shapes)[op], shapes["y"]


# --------------------------------------------------------------------------- single ops, by hand


def test_grouped_strided_conv() -> None:
    # x (1, 8, 10, 10), 16 filters over 8/2 = 4 channels, 3x3, stride 2, pad 1 -> y (1, 16, 5, 5).
    work, y = _work(
        "Conv", {"x": (1, 8, 10, 10)}, {"w": (16, 4, 3, 3), "b": (16,)},
        group=2, strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3],
    )
    assert y == (1, 16, 5, 5)
    out = 16 * 5 * 5
    assert work.flops == 2 * out * 4 * 9 + out  # MACs over C/groups * k*k, plus the bias add
    assert work.bytes == F32 * (8 * 10 * 10 + 16 * 4 * 9 + 16 + out)
    assert work.known and work.fallback == 0


def test_dilated_conv_counts_the_same_macs_per_output() -> None:
    # Dilation 2 widens the 3x3 kernel to 5x5 in space: 10 -> 6 outputs, still 9 taps each.
    work, y = _work("Conv", {"x": (1, 2, 10, 10)}, {"w": (3, 2, 3, 3)}, dilations=[2, 2])
    assert y == (1, 3, 6, 6)
    assert work.flops == 2 * (3 * 6 * 6) * 2 * 9


def test_conv_transpose() -> None:
    # Each of the 1*4*5*5 input elements scatters into (6/1) * 3*3 outputs.
    work, y = _work("ConvTranspose", {"x": (1, 4, 5, 5)}, {"w": (4, 6, 3, 3)}, strides=[2, 2])
    assert y == (1, 6, 11, 11)
    assert work.flops == 2 * (4 * 5 * 5) * 6 * 9


def test_gemm() -> None:
    # (3, 20) x (20, 7)^T-stored-as-(7, 20) + bias: 3*7 dot products of length 20, plus 3*7 adds.
    work, y = _work("Gemm", {"a": (3, 20)}, {"b": (7, 20), "c": (7,)}, transB=1)
    assert y == (3, 7)
    assert work.flops == 2 * 3 * 7 * 20 + 3 * 7
    assert work.bytes == F32 * (3 * 20 + 7 * 20 + 7 + 3 * 7)


def test_gemm_transposed_a() -> None:
    work, y = _work("Gemm", {"a": (20, 3)}, {"b": (20, 7)}, transA=1)
    assert y == (3, 7)
    assert work.flops == 2 * 3 * 7 * 20


def test_batched_matmul_with_broadcast() -> None:
    # (2, 1, 4, 8) @ (3, 8, 5) broadcasts to (2, 3, 4, 5): 120 dot products of length 8.
    work, y = _work("MatMul", {"a": (2, 1, 4, 8), "b": (3, 8, 5)}, {})
    assert y == (2, 3, 4, 5)
    assert work.flops == 2 * 120 * 8
    assert work.bytes == F32 * (2 * 4 * 8 + 3 * 8 * 5 + 120)


def test_batchnorm() -> None:
    work, _ = _work(
        "BatchNormalization", {"x": (2, 6, 4, 4)},
        {"scale": (6,), "bias": (6,), "mean": (6,), "var": (6,)},
    )
    assert work.flops == 2 * (2 * 6 * 4 * 4)  # folded to one multiply-add per element
    assert work.bytes == F32 * (2 * (2 * 6 * 4 * 4) + 4 * 6)


def test_maxpool() -> None:
    # 3x3 window, stride 2, pad 1 on 1x4x9x9 -> 1x4x5x5; one compare per window element.
    work, y = _work("MaxPool", {"x": (1, 4, 9, 9)}, {}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    assert y == (1, 4, 5, 5)
    assert work.flops == 9 * (4 * 5 * 5)


def test_global_average_pool_reads_every_input_element() -> None:
    work, y = _work("GlobalAveragePool", {"x": (1, 8, 7, 7)}, {})
    assert y == (1, 8, 1, 1)
    assert work.flops == 8 * 7 * 7


def test_activations_cost_a_few_flops_per_element() -> None:
    assert _work("Relu", {"x": (2, 10)}, {})[0].flops == 20
    assert _work("Sigmoid", {"x": (2, 10)}, {})[0].flops == 4 * 20
    assert _work("Softmax", {"x": (2, 10)}, {})[0].flops == 5 * 20


def test_data_movement_is_free_but_moves_bytes() -> None:
    work, _ = _work("Transpose", {"x": (2, 3, 4)}, {}, perm=[2, 0, 1])
    assert work.flops == 0 and work.bytes == F32 * 2 * 24


def test_gather_reads_only_the_rows_it_returns() -> None:
    table, ids = (1000, 64), (2, 5)
    inits = [numpy_helper.from_array(np.zeros(table, np.float32), "emb")]
    node = helper.make_node("Gather", ["emb", "ids"], ["y"], name="g")
    graph = helper.make_graph(
        [node], "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    work = node_work(model, concrete_shapes(model))["g"]
    assert work.flops == 0
    assert work.bytes == F32 * 10 * 64 + 8 * 10 + F32 * 10 * 64  # rows read, int64 ids, output


def test_unknown_op_falls_back_and_is_reported() -> None:
    model, shapes = _single("Einsum", {"a": (3, 4), "b": (4, 5)}, {}, equation="ij,jk->ik")
    work = node_work(model, shapes)["Einsum"]
    assert work.flops == 3 * 5 and work.fallback == 1
    assert unmodelled_ops(model) == frozenset({"Einsum"})


def test_missing_shape_gives_unknown_not_a_guess() -> None:
    model, shapes = _single("Relu", {"x": (2, 10)}, {})
    del shapes["y"]
    work = node_work(model, shapes)["Relu"]
    assert work == Work(0.0, 0.0, unknown=1) and not work.known


# --------------------------------------------------------------------------- shapes


def test_concrete_shapes_checks_its_inputs() -> None:
    model = build_dag()
    with pytest.raises(ValueError, match="dim 1 is fixed at 3"):
        concrete_shapes(model, {"input": (1, 4, 224, 224)})
    with pytest.raises(ValueError, match="no graph input named 'image'"):
        concrete_shapes(model, {"image": (1, 3, 224, 224)})
    assert concrete_shapes(model, dims={"N": 3})["logits"] == (3, 1000)
    assert concrete_shapes(model)["logits"] == (1, 1000)


# --------------------------------------------------------------------------- reference models

# build_chain's layers written out: stem 3->32 3x3/2, then (depthwise 3x3/stride, pointwise
# to `out`) per block, each conv followed by BN (2 FLOPs/elem) and Clip (1 FLOP/elem).
_CHAIN_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _chain_flops_by_hand() -> int:
    def conv_bn_relu6(out_hw: int, out_c: int, macs_per_output: int) -> int:
        out = out_hw * out_hw * out_c
        return 2 * out * macs_per_output + 2 * out + out

    hw, c = 112, 32
    total = conv_bn_relu6(hw, c, 3 * 3 * 3)
    for out, stride in _CHAIN_BLOCKS:
        hw //= stride
        total += conv_bn_relu6(hw, c, 3 * 3)   # depthwise: one input channel per filter
        total += conv_bn_relu6(hw, out, c)     # pointwise: 1x1 over all c channels
        c = out
    total += hw * hw * c                       # GlobalAveragePool over 7x7x1024
    total += 2 * 1000 * c + 1000               # fc: Gemm 1024 -> 1000 plus bias
    return total


def test_chain_segments_and_total() -> None:
    graph = analyze(build_chain())
    per_node = node_work(graph.model, concrete_shapes(graph.model))
    works = segment_work(graph, per_node)
    assert len(works) == len(graph.segments)
    assert unmodelled_ops(graph.model) == frozenset()
    ops = {n.name: n.op_type for n in graph.model.graph.node}
    for names, work in zip(graph.segments, works):
        assert work.known and work.bytes > 0
        # Every segment computes something, except one made only of a Flatten (0 FLOPs by design).
        if {ops[n] for n in names} != {"Flatten"}:
            assert work.flops > 0, names
    total = sum(works, Work(0.0, 0.0))
    assert total.flops == _chain_flops_by_hand()
    assert total == sum(per_node.values(), Work(0.0, 0.0))


def test_dag_batch_two_doubles_batch_proportional_layers() -> None:
    graph = analyze(build_dag())
    one = node_work(graph.model, concrete_shapes(graph.model, {"input": (1, 3, 224, 224)}))
    two = node_work(graph.model, concrete_shapes(graph.model, {"input": (2, 3, 224, 224)}))
    assert all(w.known for w in (*one.values(), *two.values()))
    ops = {n.name: n.op_type for n in graph.model.graph.node}
    proportional = {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Gemm"}
    layers = [name for name, op in ops.items() if op in proportional]
    assert len(layers) > 50
    for name in layers:
        assert two[name].flops == 2 * one[name].flops > 0, name
    # Weights are read once per run, so bytes grow by less than 2x.
    conv = "layer4_1_conv2"
    assert one[conv].bytes < two[conv].bytes < 2 * one[conv].bytes
    total_one, total_two = (sum(segment_work(graph, w), Work(0.0, 0.0)) for w in (one, two))
    assert total_two.flops == pytest.approx(2 * total_one.flops, rel=1e-6)


# --------------------------------------------------------------------------- roofline

HOST = Machine(gflops=100.0, mem_bandwidth_gbs=20.0, name="laptop")
TARGET = Machine(gflops=10.0, mem_bandwidth_gbs=5.0, name="pi4-like")
COMPUTE_BOUND = Work(flops=1e9, bytes=1e6)    # host: max(10 ms, 0.05 ms); target: max(100 ms, 0.2 ms)
MEMORY_BOUND = Work(flops=1e6, bytes=1e9)     # host: max(0.01 ms, 50 ms); target: max(0.1 ms, 200 ms)
UNKNOWN = Work(0.0, 0.0, unknown=1)


def test_roofline_picks_the_binding_limit() -> None:
    assert roofline_ms(COMPUTE_BOUND, HOST) == pytest.approx(10.0)
    assert roofline_ms(MEMORY_BOUND, HOST) == pytest.approx(50.0)
    assert roofline_ms(COMPUTE_BOUND, TARGET) == pytest.approx(100.0)
    assert roofline_ms(MEMORY_BOUND, TARGET) == pytest.approx(200.0)


def test_segments_scale_by_the_ratio_that_binds() -> None:
    # Host times at or above the host's rooflines (10 ms, 50 ms), as a real run is.
    predicted = predict_segment_ms((30.0, 100.0, 1.0), (COMPUTE_BOUND, MEMORY_BOUND, UNKNOWN), HOST, TARGET)
    # compute-bound x (100/10) GFLOPS, memory-bound x (20/5) GB/s,
    # unknown x whole model's rooflines (100 + 200) / (10 + 50) = 5.
    assert predicted == pytest.approx((300.0, 400.0, 5.0))


def test_no_known_work_anywhere_scales_by_compute() -> None:
    assert predict_segment_ms((2.0,), (UNKNOWN,), HOST, TARGET) == pytest.approx((20.0,))


def test_a_segment_faster_than_the_host_roofline_is_held_at_the_target_roofline() -> None:
    # 3 ms on the host for 10 ms of host roofline: the host figure read low (a busy
    # machine) or the FLOPs are over-counted; scaling alone would promise 30 ms on a
    # target whose peak needs 100 ms for this work.
    compute, memory = predict_segment_ms((3.0, 2.0), (COMPUTE_BOUND, MEMORY_BOUND), HOST, TARGET)
    assert compute == pytest.approx(roofline_ms(COMPUTE_BOUND, TARGET)) == pytest.approx(100.0)
    assert memory == pytest.approx(roofline_ms(MEMORY_BOUND, TARGET)) == pytest.approx(200.0)


def test_the_floor_is_the_roofline_at_the_compute_ceiling() -> None:
    # Ratios use gflops (fp64-equivalent figures); the floor of fp32 work uses the fp32 ceiling, 2x here.
    fp32_target = Machine(gflops=10.0, mem_bandwidth_gbs=5.0, name="pi4-like", peak_gflops=20.0)
    assert floor_ms(COMPUTE_BOUND, TARGET) == roofline_ms(COMPUTE_BOUND, TARGET) == pytest.approx(100.0)
    assert floor_ms(COMPUTE_BOUND, fp32_target) == pytest.approx(50.0)
    assert floor_ms(MEMORY_BOUND, fp32_target) == pytest.approx(200.0)  # bandwidth binds either way
    scaled = scaled_segment_ms((3.0,), (COMPUTE_BOUND,), HOST, fp32_target)
    assert scaled == pytest.approx((30.0,))
    assert predict_segment_ms((3.0,), (COMPUTE_BOUND,), HOST, fp32_target) == pytest.approx((50.0,))
    assert predict_segment_ms((6.0,), (COMPUTE_BOUND,), HOST, fp32_target) == pytest.approx((60.0,))  # above it
    with pytest.raises(ValueError, match="below gflops"):
        Machine(gflops=10.0, mem_bandwidth_gbs=5.0, peak_gflops=5.0)


def _profile(segment_ms: tuple[float, ...], run_overhead_ms: float = 0.5) -> ModelProfile:
    meta = TensorMeta("x", "float32", (1, 4))
    return ModelProfile(
        model="m", digest="d", host="laptop", segment_ms=segment_ms, run_overhead_ms=run_overhead_ms,
        whole_ms=sum(segment_ms) + run_overhead_ms, crossings=((meta,),) * len(segment_ms), outputs=(meta,),
        segment_param_bytes=tuple(range(1, len(segment_ms) + 1)), runs=10,
    )


def test_predict_profile() -> None:
    profile = _profile((30.0, 100.0, 1.0))
    predicted = predict_profile(profile, (COMPUTE_BOUND, MEMORY_BOUND, UNKNOWN), HOST, TARGET)
    assert predicted.segment_ms == pytest.approx((300.0, 400.0, 5.0))
    assert predicted.run_overhead_ms == pytest.approx(5.0)   # compute ratio 10
    assert predicted.whole_ms == pytest.approx(710.0)
    assert "pi4-like" in predicted.host and "laptop" in predicted.host
    assert (predicted.crossings, predicted.digest, predicted.runs) == (profile.crossings, "d", 10)
    with pytest.raises(ValueError, match="3 segments"):
        predict_profile(profile, (COMPUTE_BOUND,), HOST, TARGET)


def test_no_prediction_beats_the_target_roofline() -> None:
    """Segments and whole runs, over seeded random works, host times and machines:
    including hosts that ran faster than their own figure says, targets faster than
    the host and targets with a separate compute ceiling, every predicted time is at
    least its floor (roofline at the ceiling) on the target."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        segments = int(rng.integers(1, 6))
        works = tuple(
            UNKNOWN if rng.random() < 0.15 else Work(float(rng.uniform(0, 2e9)), float(rng.uniform(0, 5e8)))
            for _ in range(segments)
        )
        host = Machine(float(rng.uniform(5, 500)), float(rng.uniform(1, 50)), name="host")
        gflops = float(rng.uniform(5, 500))
        peak = gflops * float(rng.uniform(1, 3)) if rng.random() < 0.5 else None
        target = Machine(gflops, float(rng.uniform(1, 50)), name="target", peak_gflops=peak)
        # From 0.1x to 10x the host's own roofline time: a host figure that read far too low or high.
        measured = tuple(max(roofline_ms(w, host), 0.5) * float(rng.uniform(0.1, 10)) for w in works)
        predicted = predict_profile(_profile(measured, float(rng.uniform(0, 2))), works, host, target)
        for ms, work in zip(predicted.segment_ms, works):
            assert ms >= floor_ms(work, target) * (1 - 1e-12)
        assert predicted.whole_ms >= floor_ms(sum(works, Work(0.0, 0.0)), target) * (1 - 1e-12)
        assert predicted.whole_ms == pytest.approx(sum(predicted.segment_ms) + predicted.run_overhead_ms)


def test_machine_rejects_non_positive_figures() -> None:
    with pytest.raises(ValueError, match="positive"):
        Machine(gflops=0.0, mem_bandwidth_gbs=5.0)
