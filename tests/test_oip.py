"""KServe v2 / Open Inference Protocol on the agent, driven by the official
``tritonclient`` (gRPC and HTTP) against real daemons on loopback: outputs
equal onnxruntime run directly, plans are pinned and reported, errors get
Triton's statuses, and system shared memory equals a socket request."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from edge_agent import sdk
from runtimes import launch
from runtimes.shared_memory import Lease, RegionError, RegionInUse, SharedMemory
from tests.test_runtime import ATOL, RTOL, direct, image

PLANS = ["local", "remote", "split:4"]


@pytest.fixture(scope="module")
def grpc_client(agent: launch.Daemon):
    with grpcclient.InferenceServerClient(agent.address) as client:
        yield client


@pytest.fixture(scope="module")
def http_client(agent: launch.Daemon):
    with httpclient.InferenceServerClient(agent.ready["http"].removeprefix("http://"), network_timeout=120) as client:
        yield client


def infer_input(module, x: np.ndarray, **kwargs):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, **kwargs)
    return tensor


def test_server_and_model_metadata(grpc_client, http_client) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.is_server_live() and http_client.is_server_ready()
    server = grpc_client.get_server_metadata()
    assert server.name == "tandem-edge-agent" and "system_shared_memory" in server.extensions
    assert http_client.get_server_metadata()["extensions"] == list(server.extensions)
    meta = grpc_client.get_model_metadata("resnet")
    assert (meta.platform, list(meta.versions)) == ("onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 3, 224, 224])]
    assert http_client.get_model_metadata("resnet")["inputs"] == [{"name": "input", "datatype": "FP32",
                                                                   "shape": [-1, 3, 224, 224]}]
    assert grpc_client.is_model_ready("mobilenet") and http_client.is_model_ready("mobilenet", "1")
    assert not grpc_client.is_model_ready("nope") and not http_client.is_model_ready("nope")
    assert not grpc_client.is_model_ready("mobilenet", "2")


@pytest.mark.parametrize("plan", PLANS)
def test_grpc_model_infer_equals_onnxruntime_for_the_chain_and_the_dag(grpc_client, model_dir: Path, plan: str) -> None:
    for model in ("mobilenet", "resnet"):
        for batch in (1, 2):  # resnet's batch is dynamic
            if model == "mobilenet" and batch == 2:
                continue
            x = image(batch, seed=batch)
            result = grpc_client.infer(model, [infer_input(grpcclient, x)], parameters={"tandem.plan": plan},
                                       request_id="r1")
            params = result.get_response().parameters
            assert (params["tandem.plan"].string_param, params["tandem.fell_back"].bool_param) == (plan, False), \
                params["tandem.reason"].string_param
            assert (params["tandem.node"].string_param != "") == (plan != "local")
            assert params["tandem.measured_ms"].double_param > 0 and params["tandem.predicted_ms"].double_param > 0
            assert result.get_response().id == "r1"
            np.testing.assert_allclose(result.as_numpy("logits"), direct(model_dir, model, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("plan", PLANS)
def test_http_infer_equals_onnxruntime_binary_and_json(http_client, model_dir: Path, plan: str, binary: bool) -> None:
    x = image(2, seed=3)
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = http_client.infer("resnet", [infer_input(httpclient, x, binary_data=binary)], outputs=wanted,
                               parameters={"tandem.plan": plan})
    params = result.get_response()["parameters"]
    assert (params["tandem.plan"], params["tandem.fell_back"]) == (plan, False), params["tandem.reason"]
    assert ("data" in result.get_output("logits")) == (not binary)
    # JSON carries each float32 as the shortest text that reads back as that float: exact either way
    np.testing.assert_allclose(result.as_numpy("logits"), direct(model_dir, "resnet", x), rtol=RTOL, atol=ATOL)


def test_bad_tensors_get_triton_statuses_and_the_agent_keeps_serving(grpc_client, agent: launch.Daemon) -> None:
    x = image()

    def status_of(model: str, inputs, **kwargs) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.infer(model, inputs, **kwargs)
        return caught.value.status(), caught.value.message()

    wrong_type = grpcclient.InferInput("input", list(x.shape), "INT32")
    wrong_type.set_data_from_numpy(x.astype(np.int32))
    assert status_of("mobilenet", [wrong_type]) == (
        "StatusCode.INVALID_ARGUMENT", "inference input 'input' data-type is 'INT32', but model 'mobilenet' expects 'FP32'")
    code, message = status_of("mobilenet", [infer_input(grpcclient, x[:, :2])])
    assert code == "StatusCode.INVALID_ARGUMENT" and "shape" in message
    stranger = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    stranger.set_data_from_numpy(x)
    assert status_of("mobilenet", [stranger])[0] == "StatusCode.INVALID_ARGUMENT"
    assert status_of("nope", [infer_input(grpcclient, x)])[0] == "StatusCode.NOT_FOUND"
    assert status_of("mobilenet", [infer_input(grpcclient, x)], model_version="2")[0] == "StatusCode.NOT_FOUND"
    code, message = status_of("mobilenet", [infer_input(grpcclient, x)], outputs=[grpcclient.InferRequestedOutput("nope")])
    assert code == "StatusCode.INVALID_ARGUMENT" and "'nope'" in message
    code, message = status_of("mobilenet", [infer_input(grpcclient, x)], parameters={"tandem.plan": "split:999"})
    assert code == "StatusCode.INVALID_ARGUMENT"

    # what tritonclient never sends, on the raw stub: bytes that do not fit the shape, typed contents, a bad dim
    with grpc.insecure_channel(agent.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 224, 224])
        short = oip.ModelInferRequest(model_name="mobilenet", inputs=[tensor], raw_input_contents=[b"\0" * 12])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(short, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "12 bytes" in caught.value.details()
        typed = oip.ModelInferRequest(model_name="mobilenet", inputs=[oip.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=x.shape, contents=oip.InferTensorContents(fp32_contents=x.ravel()))])
        reply = stub.ModelInfer(typed, timeout=60)
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).size == 1000
        negative = oip.ModelInferRequest(model_name="mobilenet", inputs=[oip.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, -3, 224, 224])], raw_input_contents=[b""])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(negative, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_client.infer("mobilenet", [infer_input(grpcclient, x)]).as_numpy("logits").shape == (1, 1000)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_rest_bodies_get_400_with_the_reason(agent: launch.Daemon) -> None:
    url = agent.ready["http"] + "/v2/models/mobilenet/infer"

    def tensor(data, datatype="FP32", shape=(2,)) -> bytes:
        return json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}]}).encode()

    cases = [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 100 + b"1" + b"]" * 100
         + b"}]}", "not a regular array"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1], '
         b'"parameters": {"binary_data_size": 4}}]}', "binary_data_size"),
        (tensor([1.5, "a"]), "non-numbers"),
        (tensor([True, False]), "booleans"),
        (tensor([[1.0], [2.0, 3.0]]), "not a regular array"),
        (tensor([1.0, 2.0, 3.0]), "3 values"),
        (tensor([1.0, 2.0], datatype="BYTES"), "BYTES"),
        (tensor([1.0, 2.0], shape=(2, -1)), "negative"),
    ]
    for body, reason in cases:
        status, reply = post(url, body)
        assert status == 400 and reason in reply["error"], (body, reply)
    status, reply = post(url, tensor([1.0] * 10), {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"]
    status, reply = post(agent.ready["http"] + "/v2/models/nope/infer", tensor([1.0, 2.0]))
    assert status == 404 and "nope" in reply["error"]


def region_name() -> str:
    return f"tandem-test-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_shared_memory_request_equals_a_socket_request(grpc_client, http_client, model_dir: Path, protocol: str) -> None:
    client, module = (grpc_client, grpcclient) if protocol == "grpc" else (http_client, httpclient)
    x = image(2, seed=7)
    out_bytes = 2 * 1000 * 4
    names = region_name(), region_name()
    inputs = shm.create_shared_memory_region(names[0], "/" + names[0], x.nbytes)
    outputs = shm.create_shared_memory_region(names[1], "/" + names[1], out_bytes + 64)
    try:
        shm.set_shared_memory_region(inputs, [x])
        client.register_system_shared_memory(names[0], "/" + names[0], x.nbytes)
        client.register_system_shared_memory(names[1], "/" + names[1], out_bytes + 64)
        status = client.get_system_shared_memory_status()
        listed = {r.name for r in status.regions.values()} if protocol == "grpc" else {r["name"] for r in status}
        assert set(names) <= listed
        tensor = module.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory(names[0], x.nbytes)
        wanted = module.InferRequestedOutput("logits")
        wanted.set_shared_memory(names[1], out_bytes, offset=64)
        for plan in ("local", "split:4"):
            result = client.infer("resnet", [tensor], outputs=[wanted], parameters={"tandem.plan": plan})
            socket = client.infer("resnet", [infer_input(module, x)], parameters={"tandem.plan": plan})
            got = shm.get_contents_as_numpy(outputs, np.float32, [2, 1000], offset=64)
            np.testing.assert_array_equal(got, socket.as_numpy("logits"))
            np.testing.assert_allclose(got, direct(model_dir, "resnet", x), rtol=RTOL, atol=ATOL)
            assert result.get_output("logits") is not None
        too_small = module.InferRequestedOutput("logits")
        too_small.set_shared_memory(names[1], out_bytes // 2)
        with pytest.raises(InferenceServerException, match="cannot hold it"):
            client.infer("resnet", [tensor], outputs=[too_small])
        beyond = module.InferInput("input", list(x.shape), "FP32")
        beyond.set_shared_memory(names[0], x.nbytes, offset=8)
        with pytest.raises(InferenceServerException, match="do not fit region"):
            client.infer("resnet", [beyond])
        with pytest.raises(InferenceServerException, match="already registered"):
            client.register_system_shared_memory(names[0], "/" + names[0], x.nbytes)
    finally:
        client.unregister_system_shared_memory(names[0])
        client.unregister_system_shared_memory(names[1])
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
    listed = client.get_system_shared_memory_status()
    assert not set(names) & ({r.name for r in listed.regions.values()} if protocol == "grpc" else {r["name"] for r in listed})


def test_regions_are_checked_before_they_are_used(tmp_path: Path) -> None:
    """The registry refuses what a hostile app could name: paths, links,
    files smaller than the region, and reads past a file shrunk since."""
    memory = SharedMemory(root=tmp_path)
    (tmp_path / "data").write_bytes(bytes(range(64)))
    os.symlink(tmp_path / "data", tmp_path / "link")
    for key, reason in (("../etc/passwd", "not a POSIX"), ("/..", "not a POSIX"), ("a/b", "not a POSIX"),
                        ("link", "cannot open"), ("missing", "cannot open")):
        with pytest.raises(RegionError, match=reason):
            memory.register("r", key, 0, 8)
    with pytest.raises(RegionError, match="needs 72"):
        memory.register("r", "/data", 8, 64)
    memory.register("r", "/data", 16, 32)
    with memory.lease(local=True) as lease:
        lease.take("r", 0, 32, "input 'x'")
        assert bytes(lease.read("r", 4, 4, "input 'x'")) == bytes([20, 21, 22, 23])
        with pytest.raises(RegionInUse):
            memory.unregister("r")
        with pytest.raises(RegionError, match="do not fit"):
            lease.read("r", 30, 4, "input 'x'")
        lease.write("r", 0, 4, np.array([7, 7, 7, 7], np.uint8), "output 'y'")
    assert (tmp_path / "data").read_bytes()[16:20] == b"\x07" * 4
    os.truncate(tmp_path / "data", 20)
    with pytest.raises(RegionError, match="shrank"):
        Lease(memory, local=True).read("r", 0, 4, "input 'x'")
    memory.unregister("r")
    assert memory.status() == []
    memory.close()


def test_the_sdk_through_shared_memory_equals_the_socket(agent: launch.Daemon, model_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(sdk, "FIRST_OUTPUT_BYTES", 64)  # too small for the logits: the first reply brings them inline
    x = image(2, seed=11)
    with sdk.EdgeClient(agent.address) as socket, sdk.EdgeClient(agent.address, shared_memory=True) as shared:
        for model, plan in (("mobilenet", "local"), ("resnet", "local"), ("resnet", "split:4"), ("resnet", "remote")):
            batch = x[:1] if model == "mobilenet" else x
            for _ in range(2):  # the second one's logits come back in the grown output region
                result = shared.infer(model, {"input": batch}, plan=plan)
                expected = socket.infer(model, {"input": batch}, plan=plan)
                assert (result.plan, result.fell_back) == (plan, False), result.fallback_reason
                np.testing.assert_array_equal(result.outputs["logits"], expected.outputs["logits"])
                np.testing.assert_allclose(result.outputs["logits"], direct(model_dir, model, batch), rtol=RTOL, atol=ATOL)
        regions = shared._shared._idle[0]
        keys = [regions.inputs.key, regions.outputs.key]
        assert regions.outputs.byte_size >= 2 * 1000 * 4 and all(os.path.exists(f"/dev/shm/{k}") for k in keys)
        with grpcclient.InferenceServerClient(agent.address) as client:
            assert set(keys) <= set(client.get_system_shared_memory_status().regions)
    assert not any(os.path.exists(f"/dev/shm/{k}") for k in keys)  # unlinked, and unregistered:
    with grpcclient.InferenceServerClient(agent.address) as client:
        assert not set(keys) & set(client.get_system_shared_memory_status().regions)


def test_regions_of_apps_that_ended_without_unregistering_make_room(tmp_path: Path) -> None:
    memory = SharedMemory(root=tmp_path, max_regions=2)
    for key in ("a", "b", "c"):
        (tmp_path / key).write_bytes(bytes(16))
    memory.register("a", "a", 0, 16)
    memory.register("b", "b", 0, 16)
    with pytest.raises(RegionError, match="unregister one first"):
        memory.register("c", "c", 0, 16)
    (tmp_path / "a").unlink()  # its app is gone
    memory.register("c", "c", 0, 16)
    assert sorted(r.name for r in memory.status()) == ["b", "c"]
    memory.close()
