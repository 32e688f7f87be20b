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
from partitioner.planning import CodecSpeed, cloud_budget_s, input_scale, model_costs
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import measure


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def even_batch_model() -> onnx.ModelProto:
    """Runs only when the dynamic batch is even: our profiling guess of 1 fails."""
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
            assert [m.name for m in client.models()] == ["mobilenet"]
            with pytest.raises(sdk.NotFound):
                client.infer("even", {"x": np.zeros((2, 8), np.float32)})
            assert client.infer("mobilenet", {"input": np.zeros((1, 3, 224, 224), np.float32)}, plan="split:3").plan == "split:3"
        log = agent.log()
    assert "even" in log and "profiling it on sample inputs failed" in log
    assert "uint32" in log and "cannot carry" in log
    assert "junk.onnx" in log


def test_profile_attributes_fused_matmul_add_time_to_segments(tmp_path: Path) -> None:
    """onnxruntime fuses MatMul+Add under a new name at basic optimisation;
    the profile must still put that compute in the layers, not in overhead."""
    model = OnnxModel("mlp", save(mlp_model(), tmp_path / "mlp.onnx"))
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


def test_pinned_plans_cannot_break_the_privacy_floor(model_dir: Path, cloud: launch.Daemon) -> None:
    x = np.zeros((1, 3, 224, 224), np.float32)
    with launch.edge_agent(model_dir, [cloud.address], "--privacy-min-local", "2") as agent, sdk.EdgeClient(agent.address) as client:
        for plan in ("remote", "split:1"):
            with pytest.raises(sdk.FailedPrecondition, match="privacy"):
                client.infer("mobilenet", {"input": x}, plan=plan)
        assert client.infer("mobilenet", {"input": x}, plan="split:2").plan == "split:2"


def test_planning_scales_with_the_request_and_reserves_time_to_fall_back(tmp_path: Path, model_dir: Path) -> None:
    model = OnnxModel("resnet", model_dir / "resnet.onnx")
    profile = measure(model, runs=2)
    assert input_scale(profile, {"input": (8, 3, 224, 224)}) == 8.0
    one = model_costs(profile, encoding=pb.ENCODING_RAW, speed=CodecSpeed(1000, 1000), output_encoding=pb.ENCODING_RAW)
    eight = model_costs(profile, encoding=pb.ENCODING_RAW, speed=CodecSpeed(1000, 1000), output_encoding=pb.ENCODING_RAW, scale=8.0)
    assert [c.wire_bytes * 8 for c in one.crossings] == [c.wire_bytes for c in eight.crossings]
    assert sum(eight.edge_segment_ms) == pytest.approx(8 * sum(one.edge_segment_ms))
    # 1 s left, 100 ms to finish locally (x 1.2 margin): the cloud gets 0.88 s
    assert cloud_budget_s(timeout_s=10.0, remaining_s=1.0, local_finish_ms=100.0) == pytest.approx(0.88)
    assert cloud_budget_s(timeout_s=10.0, remaining_s=None, local_finish_ms=100.0) == 10.0
