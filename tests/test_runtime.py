"""End to end: real cloud-node and edge-agent processes on loopback, real onnxruntime."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from lying_node import TENSOR_LIES, LyingNode

from edge_agent import sdk
from partitioner.graph import analyze, prefix_model, suffix_model
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch

RTOL = ATOL = 1e-5


def image(batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def direct(model_dir: Path, model: str, x: np.ndarray) -> np.ndarray:
    """The unsplit model run straight through onnxruntime: the reference."""
    session = ort.InferenceSession(str(model_dir / f"{model}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def run(session_proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(session_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})))


@pytest.fixture(scope="module")
def client(agent: launch.Daemon):
    with sdk.EdgeClient(agent.address) as c:
        yield c


@pytest.fixture(scope="module")
def chain_cuts(model_dir: Path) -> int:
    return len(analyze(onnx.load(str(model_dir / "mobilenet.onnx"))).cuts)


def test_models_listed(client: sdk.EdgeClient, chain_cuts: int) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {"mobilenet", "resnet", "smollm2"}
    assert models["smollm2"].kind == "gguf" and models["mobilenet"].kind == "onnx"
    assert models["mobilenet"].num_cuts == chain_cuts
    assert list(models["resnet"].inputs[0].shape) == [-1, 3, 224, 224]


@pytest.mark.parametrize("plan", ["local", "remote"])
def test_local_and_remote_equal_direct_run(client: sdk.EdgeClient, model_dir: Path, plan: str) -> None:
    x = image()
    for model in ("mobilenet", "resnet"):
        result = client.infer(model, {"input": x}, plan=plan)
        assert (result.plan, result.fell_back) == (plan, False)
        np.testing.assert_allclose(result.outputs["logits"], direct(model_dir, model, x), rtol=RTOL, atol=ATOL)


def test_every_chain_cut_equals_direct_run(client: sdk.EdgeClient, model_dir: Path, chain_cuts: int) -> None:
    x = image(seed=1)
    expected = direct(model_dir, "mobilenet", x)
    for k in range(1, chain_cuts + 1):
        result = client.infer("mobilenet", {"input": x}, plan=f"split:{k}")
        assert (result.plan, result.fell_back) == (f"split:{k}", False), result.fallback_reason
        assert result.node
        np.testing.assert_allclose(result.outputs["logits"], expected, rtol=RTOL, atol=ATOL)


def test_dag_cuts_with_skips_and_shape_tensors_equal_direct_run(client: sdk.EdgeClient, model_dir: Path) -> None:
    graph = analyze(onnx.load(str(model_dir / "resnet.onnx")))
    two_tensor = [c.index for c in graph.cuts if len(c.tensors) == 2][:3]
    one_tensor = [c.index for c in graph.cuts if len(c.tensors) == 1][:3]
    assert two_tensor and one_tensor
    for batch in (1, 2):  # the batch dimension is dynamic
        x = image(batch, seed=batch)
        expected = direct(model_dir, "resnet", x)
        for k in [*two_tensor, *one_tensor, graph.cuts[-1].index]:
            result = client.infer("resnet", {"input": x}, plan=f"split:{k}")
            assert (result.plan, result.fell_back) == (f"split:{k}", False), result.fallback_reason
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("encoding", [pb.ENCODING_FP16, pb.ENCODING_INT8])
def test_lossy_split_equals_model_with_codec_error_at_the_cut(client: sdk.EdgeClient, model_dir: Path, encoding: int) -> None:
    """A lossy SPLIT must equal the unsplit model with exactly the codec's
    documented error applied to the cut tensor, and nothing more."""
    graph = analyze(onnx.load(str(model_dir / "mobilenet.onnx")))
    x = image(seed=3)
    name = {pb.ENCODING_FP16: "fp16", pb.ENCODING_INT8: "int8"}[encoding]
    for k in (1, len(graph.cuts) // 2, len(graph.cuts)):
        cut = graph.cut(k)
        crossing = run(prefix_model(graph, cut), {"input": x})
        received = {}
        for tensor_name in cut.tensors:
            sent = crossing[tensor_name]
            received[tensor_name] = codec.decode(codec.encode(sent, tensor_name, encoding))
            assert np.max(np.abs(received[tensor_name] - sent)) <= codec.max_abs_error(sent, encoding)
        expected = run(suffix_model(graph, cut), received)["logits"]
        result = client.infer("mobilenet", {"input": x}, plan=f"split:{k}", encoding=name)
        assert (result.plan, result.fell_back) == (f"split:{k}", False)
        np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-4, atol=1e-4)


def test_unpinned_request_runs_the_plan_explain_predicts(client: sdk.EdgeClient) -> None:
    explanation = client.explain("mobilenet")
    assert explanation.feasible
    scores = {c.plan: c.score for c in explanation.candidates if c.feasible}
    assert scores[explanation.winner] == min(scores.values())
    assert {"local", "remote"} <= set(scores)
    result = client.infer("mobilenet", {"input": image()})
    assert result.planned in scores
    # the plan ran is within the margin of the best predicted score at that moment
    assert scores[result.planned] <= min(scores.values()) * 1.5 + 1.0
    # and the request taught the agent how its profile compares with reality
    learned = client.explain("mobilenet").calibration
    assert learned["samples"] >= explanation.calibration["samples"] + 1
    assert 0.25 <= learned["edge_factor"] <= 4.0 and learned["offload_ms"] >= 0.0


def test_explain_with_link_override_plans_for_that_link(client: sdk.EdgeClient) -> None:
    slow = client.explain("mobilenet", link={"uplink_mbps": 0.13, "downlink_mbps": 0.13, "rtt_ms": 50.0})
    assert slow.link["uplink_mbps"] == pytest.approx(0.13)
    remote = slow.candidate("remote")
    # the whole input (602,112 bytes) over 0.13 Mbit/s takes ~37 s
    assert remote.predicted["network_ms"] == pytest.approx(50.0 + 602112 * 8 / 0.13e6 * 1e3 + 4000 * 8 / 0.13e6 * 1e3, rel=1e-3)
    assert slow.winner == "local"


def test_bad_requests_get_clear_errors_and_agent_keeps_serving(client: sdk.EdgeClient, agent: launch.Daemon) -> None:
    x = image()
    with pytest.raises(sdk.InvalidArgument, match="shape"):
        client.infer("mobilenet", {"input": x[:, :, :100]})
    with pytest.raises(sdk.InvalidArgument, match="float32"):
        client.infer("mobilenet", {"input": x.astype(np.float64)})
    with pytest.raises(sdk.InvalidArgument, match="missing"):
        client.infer("mobilenet", {"other": x})
    with pytest.raises(sdk.NotFound, match="unknown model"):
        client.infer("no-such-model", {"input": x})
    with pytest.raises(sdk.InvalidArgument, match="cut"):
        client.infer("mobilenet", {"input": x}, plan="split:999")
    with pytest.raises(sdk.InvalidArgument, match="plan"):
        client.infer("mobilenet", {"input": x}, plan="sideways")
    # a truncated payload, sent past the SDK's own encoder
    truncated = codec.encode(x, "input")
    truncated.payload = truncated.payload[:-10]
    with grpc.insecure_channel(agent.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.EdgeAgentStub(channel).Infer(pb.InferRequest(model="mobilenet", inputs=[truncated]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes" in info.value.details()
    assert client.infer("mobilenet", {"input": x}, plan="local").plan == "local"


def test_cloud_node_refuses_bad_partitions_and_keeps_serving(cloud: launch.Daemon, model_dir: Path) -> None:
    graph = analyze(onnx.load(str(model_dir / "mobilenet.onnx")))
    cut = graph.cut(3)
    tensor = run(prefix_model(graph, cut), {"input": image()})[cut.tensors[0]]
    with grpc.insecure_channel(cloud.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        stub = pb_grpc.CloudNodeStub(channel)
        cases = {
            "not a valid cut": pb.PartitionRequest(model="mobilenet", cut=["nonsense"], tensors=[codec.encode(tensor, "nonsense")]),
            "unknown model": pb.PartitionRequest(model="nope", cut=list(cut.tensors), tensors=[codec.encode(tensor, cut.tensors[0])]),
            "onnxruntime refused": pb.PartitionRequest(model="mobilenet", cut=list(cut.tensors), tensors=[codec.encode(tensor[:, :3], cut.tensors[0])]),
        }
        codes = {"unknown model": grpc.StatusCode.NOT_FOUND}
        for words, request in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.RunPartition(request, timeout=10)
            assert info.value.code() == codes.get(words, grpc.StatusCode.INVALID_ARGUMENT), info.value.details()
            assert words in info.value.details()
        bad_dims = codec.encode(tensor, cut.tensors[0])
        bad_dims.shape[:] = [-1, 4]
        with pytest.raises(grpc.RpcError) as info:
            stub.RunPartition(pb.PartitionRequest(model="mobilenet", cut=list(cut.tensors), tensors=[bad_dims]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "negative" in info.value.details()
        reply = stub.RunPartition(pb.PartitionRequest(model="mobilenet", cut=list(cut.tensors), tensors=[codec.encode(tensor, cut.tensors[0])]), timeout=10)
        assert [o.name for o in reply.outputs] == ["logits"]
        assert reply.load.max_concurrency >= 1


@pytest.mark.parametrize("daemon", ["cloud-node", "edge-agent"])
def test_a_full_daemon_answers_resource_exhausted_with_a_retry_hint(model_dir: Path, daemon: str) -> None:
    limits = ("--max-concurrency", "1", "--max-queue", "1")
    # batch 16 keeps each request busy (~60 ms) far longer than 16 calls take to arrive
    x = codec.encode(image(16), "input")
    if daemon == "cloud-node":
        started, stub_of = launch.cloud_node(model_dir, *limits), pb_grpc.CloudNodeStub
        request, method = pb.ModelRequest(model="resnet", inputs=[x]), "RunModel"
    else:
        started, stub_of = launch.edge_agent(model_dir, [], *limits), pb_grpc.EdgeAgentStub
        request, method = pb.InferRequest(model="resnet", inputs=[x], plan="local"), "Infer"
    with started as server, grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        call = getattr(stub_of(channel), method)
        call(request, timeout=60)  # one served: the hint is how long a request holds a slot here
        calls = [call.future(request, timeout=60) for _ in range(16)]
        codes = []
        for future in calls:
            try:
                future.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "retry in about" in exc.details()
                assert int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
        assert codes.count(grpc.StatusCode.OK) >= 2  # one running, one queued
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        if daemon == "cloud-node":
            assert pb_grpc.CloudNodeStub(channel).Status(pb.StatusRequest(), timeout=10).load.max_queue == 1


def test_the_agent_takes_in_no_more_than_its_request_memory_budget(model_dir: Path) -> None:
    # An 8 MiB budget: a batch-2 request (1.15 MiB) holds about 3.4 MiB running,
    # a waiting call 1 MiB, a batch-8 one could never run (about 14 MiB).
    small, huge = image(2), image(8)
    request = pb.InferRequest(model="resnet", inputs=[codec.encode(small, "input")], plan="local")
    expected = direct(model_dir, "resnet", small)
    with launch.edge_agent(model_dir, [], "--request-memory-mb", "8") as agent, \
            grpc.insecure_channel(agent.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        stub = pb_grpc.EdgeAgentStub(channel)
        with pytest.raises(grpc.RpcError) as too_large:
            stub.Infer(pb.InferRequest(model="resnet", inputs=[codec.encode(huge, "input")], plan="local"), timeout=60)
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than this daemon's whole 8 MiB request memory budget" in too_large.value.details()
        stub.Infer(request, timeout=60)  # one served: the hint is how long a request holds a slot here
        calls = [stub.Infer.future(request, timeout=120) for _ in range(24)]
        answered = 0
        for future in calls:
            try:
                reply = future.result()
            except grpc.RpcError as exc:  # refused unread, with when to come back
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "MiB request memory budget" in exc.details()
                assert int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
                continue
            answered += 1
            np.testing.assert_allclose(codec.decode(reply.outputs[0]), expected, rtol=RTOL, atol=ATOL)
        assert answered >= 2  # 24 calls hold 24 MiB waiting: most are refused, none is lost
        assert answered < len(calls)
        stub.Infer(request, timeout=60)  # everything held was given back


def test_a_unary_call_carrying_two_requests_is_refused(agent: launch.Daemon) -> None:
    x = pb.InferRequest(model="mobilenet", inputs=[codec.encode(image(), "input")]).SerializeToString()
    with grpc.insecure_channel(agent.address) as channel:
        call = channel.stream_unary("/tandem.v1.EdgeAgent/Infer")
        with pytest.raises(grpc.RpcError) as refused:
            call(iter([x, x]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than one request" in refused.value.details()


def test_cloud_stopped_before_requests_every_request_falls_back(model_dir: Path) -> None:
    node = launch.cloud_node(model_dir).wait_ready()
    with launch.edge_agent(model_dir, [node.address]) as agent, sdk.EdgeClient(agent.address) as client:
        node.kill()
        x = image(seed=5)
        expected = direct(model_dir, "mobilenet", x)
        for plan in ("split:5", "remote", "split:20"):
            result = client.infer("mobilenet", {"input": x}, plan=plan)
            assert result.fell_back and result.plan == "local" and result.fallback_reason
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=RTOL, atol=ATOL)
    node.stop()


def test_cloud_killed_during_a_batch_loses_no_request(model_dir: Path) -> None:
    node = launch.cloud_node(model_dir).wait_ready()
    with launch.edge_agent(model_dir, [node.address]) as agent, sdk.EdgeClient(agent.address) as client:
        inputs = [image(seed=s) for s in range(24)]
        expected = [direct(model_dir, "mobilenet", x) for x in inputs]
        plans = [("split:8", "remote", "split:16")[i % 3] for i in range(len(inputs))]

        def send(i: int) -> sdk.InferResult:
            if i == 8:
                node.kill()
            return client.infer("mobilenet", {"input": inputs[i]}, plan=plans[i])

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, range(len(inputs))))
        for i, result in enumerate(results):
            np.testing.assert_allclose(result.outputs["logits"], expected[i], rtol=RTOL, atol=ATOL)
            assert result.fell_back == (result.plan == "local")
        assert sum(r.fell_back for r in results) >= len(inputs) - 12  # everything after the kill fell back
    node.stop()


def test_a_hung_node_loses_no_request_and_leaves_planning_until_it_answers(model_dir: Path) -> None:
    """SIGSTOP keeps the node's socket open and answers nothing: 40 requests
    with a 10 s deadline, 8 at a time, all answered right on the device, and
    the node planned again once it answers."""
    node = launch.cloud_node(model_dir).wait_ready()
    try:
        with launch.edge_agent(model_dir, [node.address]) as agent, sdk.EdgeClient(agent.address, timeout=10) as client:
            inputs = [image(seed=s) for s in range(8)]
            expected = [direct(model_dir, "mobilenet", x) for x in inputs]
            assert not client.infer("mobilenet", {"input": inputs[0]}, plan="remote").fell_back
            node.process.send_signal(signal.SIGSTOP)
            try:
                def send(i: int) -> sdk.InferResult:
                    return client.infer("mobilenet", {"input": inputs[i % 8]}, plan=("remote", "split:8")[i % 2])

                with ThreadPoolExecutor(8) as pool:
                    results = list(pool.map(send, range(40)))
                for i, result in enumerate(results):
                    np.testing.assert_allclose(result.outputs["logits"], expected[i % 8], rtol=RTOL, atol=ATOL)
                    assert result.fell_back and result.plan == "local"
                assert any("hung" in r.fallback_reason for r in results)
                assert all(c.node != node.address for c in client.explain("mobilenet").candidates)  # out of planning
            finally:
                node.process.send_signal(signal.SIGCONT)
            for _ in range(60):  # bounded: the refresh loop (every 2 s) finds it answering again
                if not client.infer("mobilenet", {"input": inputs[0]}, plan="remote").fell_back:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the node answers again but was not planned again within 30 s")
    finally:
        node.stop()


def test_a_node_that_lies_never_reaches_the_app(model_dir: Path, cloud: launch.Daemon) -> None:
    """Each way a reply can be wrong: the request is answered right on the
    device, the reason names the lie, and the node leaves planning until a
    refresh finds it again (every 2 s)."""
    liar = LyingNode(cloud.address)
    try:
        with launch.edge_agent(model_dir, [liar.address]) as agent, sdk.EdgeClient(agent.address) as client:
            x = image(seed=11)
            expected = direct(model_dir, "mobilenet", x)
            assert not client.infer("mobilenet", {"input": x}, plan="remote").fell_back  # the proxy itself is sound
            for mode in TENSOR_LIES:
                for plan in ("remote", "split:8"):
                    for _ in range(60):  # bounded: until the node is planned again after the last lie
                        if any(c.node == liar.address for c in client.explain("mobilenet").candidates):
                            break
                        time.sleep(0.25)
                    liar.mode = mode
                    result = client.infer("mobilenet", {"input": x}, plan=plan)
                    np.testing.assert_allclose(result.outputs["logits"], expected, rtol=RTOL, atol=ATOL)
                    assert result.fell_back and result.plan == "local", (mode, plan)
                    assert "not mobilenet's" in result.fallback_reason, (mode, plan, result.fallback_reason)
    finally:
        liar.close()


def test_model_that_cannot_be_cut_runs_whole_and_refuses_splits(tmp_path: Path, cloud: launch.Daemon) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="only")], "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "single.onnx"))
    with launch.edge_agent(tmp_path, []) as agent, sdk.EdgeClient(agent.address) as client:
        x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
        np.testing.assert_array_equal(client.infer("single", {"x": x}).outputs["y"], np.maximum(x, 0))
        with pytest.raises(sdk.InvalidArgument, match="cannot be split"):
            client.infer("single", {"x": x}, plan="split:1")


def test_privacy_floor_keeps_early_layers_on_the_device(model_dir: Path, cloud: launch.Daemon) -> None:
    with launch.edge_agent(model_dir, [cloud.address], "--privacy-min-local", "3") as agent, sdk.EdgeClient(agent.address) as client:
        explanation = client.explain("mobilenet", link={"uplink_mbps": 1e4, "downlink_mbps": 1e4, "rtt_ms": 0.1})
        feasible = {c.plan for c in explanation.candidates if c.feasible}
        assert "remote" not in feasible and "split:1" not in feasible and "split:2" not in feasible
        assert "split:3" in feasible and "local" in feasible
        assert explanation.winner in feasible


def test_async_client(agent: launch.Daemon, model_dir: Path) -> None:
    async def scenario() -> None:
        async with sdk.AsyncEdgeClient(agent.address) as client:
            x = image(seed=9)
            results = await asyncio.gather(*(client.infer("mobilenet", {"input": x}, plan=p) for p in ("local", "split:4", "remote")))
            for result in results:
                np.testing.assert_allclose(result.outputs["logits"], direct(model_dir, "mobilenet", x), rtol=RTOL, atol=ATOL)
            assert (await client.explain("resnet")).candidates
            with pytest.raises(sdk.NotFound):
                await client.infer("missing", {"input": x})

    asyncio.run(scenario())


def test_cloud_call_missing_its_deadline_falls_back(model_dir: Path, cloud: launch.Daemon) -> None:
    # 6 ms is less than the node needs for a batch of 8 through resnet.
    with launch.edge_agent(model_dir, [cloud.address], "--cloud-timeout-s", "0.006") as agent, sdk.EdgeClient(agent.address) as client:
        x = image(8, seed=11)
        result = client.infer("resnet", {"input": x}, plan="remote")
        assert result.fell_back and result.plan == "local"
        assert "DEADLINE_EXCEEDED" in result.fallback_reason
        np.testing.assert_allclose(result.outputs["logits"], direct(model_dir, "resnet", x), rtol=RTOL, atol=ATOL)
