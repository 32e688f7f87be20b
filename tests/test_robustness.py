"""User models and requests that must be refused or survived, with the true reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import sdk
from partitioner.planning import CodecSpeed, at_shape, cloud_budget_s, model_costs
from partitioner.work import Machine, concrete_shapes, node_work, roofline_ms, segment_work
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import measure, tensor_metas_at


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def even_batch_model() -> onnx.ModelProto:
    """Runs only when the dynamic batch is even: profiling at batch 1 fails."""
    shape = numpy_helper.from_array(np.array([-1, 2, 8], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Reshape", ["h", "shape"], ["y"], name="reshape")],
        "even", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 2, 8])], [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def uint32_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")], "u32",
        [helper.make_tensor_value_info("x", TensorProto.UINT32, [4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT32, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_model(layers: int = 6, width: int = 512) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / width**0.5, f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [64, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_daemons_skip_models_they_cannot_serve_and_serve_the_rest(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "mobilenet.onnx", tmp_path / "mobilenet.onnx")
    save(even_batch_model(), tmp_path / "even.onnx")
    save(uint32_model(), tmp_path / "u32.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with launch.cloud_node(tmp_path) as node, launch.edge_agent(tmp_path, [node.address]) as agent:
        with sdk.EdgeClient(agent.address) as client:
            models = {m.name: m for m in client.models()}
            assert sorted(models) == ["even", "mobilenet"]
            # served LOCAL although no shape it was tried at runs, and the reason names the shape
            assert "x[1,8]" in models["even"].plans_unavailable and not models["mobilenet"].plans_unavailable
            x = np.arange(16, dtype=np.float32).reshape(2, 8) - 8
            reply = client.infer("even", {"x": x})
            assert reply.plan == "local" and "profiling" in reply.reason
            np.testing.assert_array_equal(reply.outputs["y"], np.maximum(x, 0).reshape(1, 2, 8))
            assert client.infer("mobilenet", {"input": np.zeros((1, 3, 224, 224), np.float32)}, plan="split:3").plan == "split:3"
            assert set(client.skipped_models()) == {"junk.onnx", "u32.onnx"}
        log = agent.log()
    assert "even" in log and "x[1,8]" in log
    assert "uint32" in log and "cannot carry" in log
    assert "junk.onnx" in log


def test_profile_attributes_fused_matmul_add_time_to_segments(tmp_path: Path) -> None:
    """onnxruntime fuses MatMul+Add under a new name at basic optimisation;
    the profile must still put that compute in the layers, not in overhead.
    Layers wide enough (~0.5 ms each here) that the per-run overhead, which
    grows when other processes keep the cores busy, cannot outweigh them."""
    model = OnnxModel("mlp", save(mlp_model(width=1536), tmp_path / "mlp.onnx"))
    profile = measure(model, runs=5)
    assert profile.num_segments == 6
    assert all(t > 0 for t in profile.segment_ms)
    assert sum(profile.segment_ms) > profile.run_overhead_ms


def test_request_rules_the_agent_enforces(agent: launch.Daemon, model_dir: Path, cloud: launch.Daemon) -> None:
    x = np.zeros((1, 3, 224, 224), np.float32)
    with sdk.EdgeClient(agent.address) as client:
        with pytest.raises(sdk.InvalidArgument, match="link override"):
            client.explain("mobilenet", link={"uplink_mbps": 0.0, "downlink_mbps": 1.0, "rtt_ms": 1.0})
    with grpc.insecure_channel(agent.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        stub = pb_grpc.EdgeAgentStub(channel)
        twice = [codec.encode(x, "input"), codec.encode(x, "input")]
        with pytest.raises(grpc.RpcError, match="more than once"):
            stub.Infer(pb.InferRequest(model="mobilenet", inputs=twice), timeout=10)
        with pytest.raises(grpc.RpcError, match="unknown objective"):
            stub.Infer(pb.InferRequest(model="mobilenet", inputs=twice[:1], objective=42), timeout=10)


def test_hostile_plans_and_names_get_a_bounded_clean_status(agent: launch.Daemon) -> None:
    """Inputs that once raised INTERNAL with a traceback, or were echoed into
    the status until gRPC's header limit answered instead."""
    x = codec.encode(np.zeros((1, 3, 224, 224), np.float32), "input")
    cases = {
        "split:" + "9" * 5000: grpc.StatusCode.INVALID_ARGUMENT,      # past int()'s 4,300-digit limit
        "split:\u00b2": grpc.StatusCode.INVALID_ARGUMENT,           # "²".isdigit() is True
        "split:" + "9" * 200: grpc.StatusCode.INVALID_ARGUMENT,       # a cut far out of range
        "remote@" + "h" * (1 << 20): grpc.StatusCode.INVALID_ARGUMENT,
    }
    with grpc.insecure_channel(agent.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        stub = pb_grpc.EdgeAgentStub(channel)
        for plan, code in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.Infer(pb.InferRequest(model="mobilenet", inputs=[x], plan=plan), timeout=10)
            assert caught.value.code() == code, (plan[:20], caught.value.details())
            assert len(caught.value.details()) <= 1000
        for call in (lambda: stub.Infer(pb.InferRequest(model="m" * (1 << 20), inputs=[x]), timeout=10),
                     lambda: list(stub.Generate(pb.GenerateRequest(model="smollm2", prompt="hi", max_tokens=4, plan="x" * (1 << 20)),
                                                timeout=10))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), caught.value
            assert "characters in all" in caught.value.details() and len(caught.value.details()) <= 1000


def test_pinned_plans_cannot_break_the_privacy_floor(model_dir: Path, cloud: launch.Daemon) -> None:
    x = np.zeros((1, 3, 224, 224), np.float32)
    with launch.edge_agent(model_dir, [cloud.address], "--privacy-min-local", "2") as agent, sdk.EdgeClient(agent.address) as client:
        for plan in ("remote", "split:1"):
            with pytest.raises(sdk.FailedPrecondition, match="privacy"):
                client.infer("mobilenet", {"input": x}, plan=plan)
        assert client.infer("mobilenet", {"input": x}, plan="split:2").plan == "split:2"


def test_planning_scales_with_the_request_and_reserves_time_to_fall_back(tmp_path: Path, model_dir: Path) -> None:
    model = OnnxModel("resnet", model_dir / "resnet.onnx")
    profile = measure(model, {"input": (1, 3, 224, 224)}, runs=2)
    machine = Machine(11.8, 2.7, name="pi4")

    def works(batch: int):
        return segment_work(model.graph, node_work(model.graph.model, concrete_shapes(model.graph.model, {"input": (batch, 3, 224, 224)})))

    tensors = tensor_metas_at(model, {"input": (8, 3, 224, 224)})
    view = at_shape(profile, {"input": (8, 3, 224, 224)}, machine=machine, works_profiled=works(1),
                    works_requested=works(8), tensors=tensors)
    assert view.method == "work model" and view.bytes_scale == 1.0
    one = model_costs(profile, encoding=pb.ENCODING_RAW, speed=CodecSpeed(1000, 1000), output_encoding=pb.ENCODING_RAW)
    eight = model_costs(view.profile, encoding=pb.ENCODING_RAW, speed=CodecSpeed(1000, 1000), output_encoding=pb.ENCODING_RAW)
    # tensors crossing are their size at batch 8 (8x for activations; the flatten's
    # int64 shape tensor stays 4 values); each segment's time follows its roofline
    # time (weights are read once per run, so a batch of 8 costs less than 8 runs of 1)
    assert [c.wire_bytes for c in eight.crossings] == [sum(m.raw_bytes for m in group) for group in tensors[0]]
    float_only = [k for k, group in enumerate(tensors[0]) if all(m.dtype == "float32" for m in group)]
    assert len(float_only) > 50
    assert all(eight.crossings[k].wire_bytes == 8 * one.crossings[k].wire_bytes for k in float_only)
    for before, after, w1, w8 in zip(profile.segment_ms, view.profile.segment_ms, works(1), works(8)):
        assert after == pytest.approx(before * roofline_ms(w8, machine) / roofline_ms(w1, machine))
    assert sum(one.edge_segment_ms) < sum(eight.edge_segment_ms) <= 8 * sum(one.edge_segment_ms) * (1 + 1e-9)
    # 1 s left, 100 ms to finish locally (x 1.2 margin): the cloud gets 0.88 s
    assert cloud_budget_s(timeout_s=10.0, remaining_s=1.0, local_finish_ms=100.0) == pytest.approx(0.88)
    assert cloud_budget_s(timeout_s=10.0, remaining_s=None, local_finish_ms=100.0) == 10.0
