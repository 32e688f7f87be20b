"""Bad files in --models: each is skipped with its name and reason, the rest is served.

Every kind of file a models directory can hold by mistake (empty, not ONNX,
an operator or opset onnxruntime lacks, a directory, a dangling symlink, a
FIFO, a socket, a device) must neither stop nor hang a daemon, and
offload-tune turns each into exit code 2 with one line naming the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_agent import sdk
from modelzoo.build import build_chain
from offload_tune import cli
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from runtimes.model_store import ModelStore, load_failure_reason, unreadable_reason

RTOL = ATOL = 1e-5  # the raw codec carries fp32 exactly; the rest is onnxruntime's own run-to-run noise
GOOD = "mobilenet"


def one_node_model(op_type: str, *, opset: int = 17, domain: str = "") -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op_type, ["x"], ["y"], name="only", domain=domain)], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    imports = [helper.make_opsetid("", opset), *([helper.make_opsetid(domain, 1)] if domain else [])]
    return helper.make_model(graph, opset_imports=imports)


def write_bad_files(directory: Path) -> dict[str, str]:
    """Every bad file this process can make in ``directory``: file name -> words its reason must hold."""
    expected = {
        "empty.onnx": "empty file (0 bytes)",
        "garbage.onnx": "not a readable ONNX model",
        "dir.onnx": "a directory, not a regular file",
        "gone.onnx": "dangling symlink to deleted-long-ago.onnx",
        "pipe.onnx": "a FIFO (named pipe), not a regular file",
        "null.onnx": "a character device (symlink to /dev/null), not a regular file",
        "sock.onnx": "a socket, not a regular file",
        "noop.onnx": f"onnxruntime {ort.__version__} has no operator NoSuchOp at opset 17",
        "custom.onnx": "has no operator Frob in domain 'com.example'",
        "opset99.onnx": "opset 99 of ai.onnx is newer than onnxruntime",
    }
    (directory / "empty.onnx").write_bytes(b"")
    (directory / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (directory / "dir.onnx").mkdir()
    (directory / "gone.onnx").symlink_to("deleted-long-ago.onnx")
    os.mkfifo(directory / "pipe.onnx")
    (directory / "null.onnx").symlink_to("/dev/null")
    with socket.socket(socket.AF_UNIX) as listener:  # the socket file outlives the socket
        listener.bind(str(directory / "sock.onnx"))
    onnx.save(one_node_model("NoSuchOp"), directory / "noop.onnx")
    onnx.save(one_node_model("Frob", domain="com.example"), directory / "custom.onnx")
    onnx.save(one_node_model("Relu", opset=99), directory / "opset99.onnx")
    try:  # a device node of its own needs CAP_MKNOD (root here; not in every container)
        os.mknod(directory / "dev.onnx", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["dev.onnx"] = "a character device, not a regular file"
    except PermissionError:
        pass
    if os.geteuid() != 0:  # root reads any file, so "unreadable" exists only for others
        locked = directory / "locked.onnx"
        onnx.save(build_chain(0), locked)
        locked.chmod(0)
        expected["locked.onnx"] = "not readable by this process"
    return expected


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One good model beside every bad file."""
    directory = tmp_path_factory.mktemp("bad-models")
    onnx.save(build_chain(0), directory / f"{GOOD}.onnx")
    return directory, write_bad_files(directory)


@pytest.fixture(scope="module")
def only_bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("only-bad-models")
    return directory, write_bad_files(directory)


def assert_reasons(skipped: dict[str, str], expected: dict[str, str], directory: Path) -> None:
    """Each bad file is listed once, with a one-line reason that holds the expected words; the
    file is named by the listing, so the reason does not repeat its path."""
    assert set(skipped) == set(expected)
    for file, words in expected.items():
        assert words in skipped[file], (file, skipped[file])
        assert "\n" not in skipped[file] and str(directory) not in skipped[file], (file, skipped[file])


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)


def direct(path: Path, x: np.ndarray) -> np.ndarray:
    """The model run straight through onnxruntime: the reference."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


# --- the store on its own ---------------------------------------------------------


@pytest.mark.timeout(120)  # opening the FIFO would block for ever: fail instead
def test_store_serves_the_good_model_and_names_every_bad_file(bad_dir, caplog: pytest.LogCaptureFixture) -> None:
    directory, expected = bad_dir
    with caplog.at_level(logging.ERROR, logger="runtimes.model_store"):
        store = ModelStore.from_dir(directory, threads=1)
    assert list(store.models) == [GOOD]
    assert_reasons(store.skipped, expected, directory)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for file, reason in store.skipped.items():  # one ERROR line per file, with its path and reason
        assert [m for m in errors if str(directory / file) in m] == [f"skipping model file {directory / file}: {reason}"]
    assert {(s.file, s.reason) for s in store.skipped_infos()} == set(store.skipped.items())


def test_store_of_only_bad_files_serves_nothing_and_says_so(only_bad_dir, caplog: pytest.LogCaptureFixture) -> None:
    directory, expected = only_bad_dir
    with caplog.at_level(logging.WARNING, logger="runtimes.model_store"):
        store = ModelStore.from_dir(directory)
    assert store.models == {} and store.model_infos() == []
    assert_reasons(store.skipped, expected, directory)
    assert any("serves no tensor model" in r.getMessage() for r in caplog.records)


def test_reasons_for_paths_and_exceptions(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(build_chain(0), good)
    assert unreadable_reason(good) is None
    assert unreadable_reason(tmp_path / "missing.onnx") == "no such file"
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop)
    assert unreadable_reason(loop).startswith("cannot stat it:")
    # MemoryError carries no message: the reason is its type, never an empty string
    assert load_failure_reason(MemoryError(), good) == "MemoryError"
    assert load_failure_reason(OSError(5, "Input/output error"), good) == "[Errno 5] Input/output error"
    long_reason = load_failure_reason(RuntimeError("x" * 10_000), good)
    assert len(long_reason) <= 240 and long_reason.startswith("RuntimeError: x")


# --- the daemons --------------------------------------------------------------------


def node_status(address: str) -> pb.NodeStatus:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.CloudNodeStub(channel).Status(pb.StatusRequest(), timeout=10)


async def async_listing(address: str) -> tuple[list[str], dict[str, str]]:
    async with sdk.AsyncEdgeClient(address) as client:
        return [m.name for m in await client.models()], await client.skipped_models()


def test_daemons_serve_the_good_model_and_list_every_bad_file(bad_dir) -> None:
    directory, expected = bad_dir
    # wait_ready is bounded: a daemon stuck opening the FIFO fails here instead of hanging
    with launch.cloud_node(directory) as node, launch.edge_agent(directory, [node.address]) as agent:
        status = node_status(node.address)
        assert [m.name for m in status.models] == [GOOD]
        assert_reasons({s.file: s.reason for s in status.skipped}, expected, directory)
        x = image()
        reference = direct(directory / f"{GOOD}.onnx", x)
        with sdk.EdgeClient(agent.address) as client:
            assert [m.name for m in client.models()] == [GOOD]
            skipped = client.skipped_models()
            assert_reasons(skipped, expected, directory)
            for plan in ("local", "remote"):  # the agent's own copy and the node's
                result = client.infer(GOOD, {"input": x}, plan=plan)
                assert result.plan == plan and not result.fell_back, (plan, result.fallback_reason)
                np.testing.assert_allclose(result.outputs["logits"], reference, rtol=RTOL, atol=ATOL)
        assert asyncio.run(async_listing(agent.address)) == ([GOOD], skipped)
        for daemon in (node, agent):
            log = daemon.log()
            for file in ("pipe.onnx", "noop.onnx", "empty.onnx"):
                assert f"skipping model file {directory / file}: {skipped[file]}" in log


def test_daemons_with_only_bad_files_start_and_serve_nothing(only_bad_dir) -> None:
    directory, expected = only_bad_dir
    with launch.cloud_node(directory) as node, launch.edge_agent(directory, [node.address]) as agent:
        status = node_status(node.address)
        assert list(status.models) == []
        assert_reasons({s.file: s.reason for s in status.skipped}, expected, directory)
        with sdk.EdgeClient(agent.address) as client:
            assert client.models() == []
            assert_reasons(client.skipped_models(), expected, directory)
            with pytest.raises(sdk.NotFound, match=r"unknown model 'noop': noop.onnx is in the models directory but not "
                                                   r"served \(onnxruntime .* has no operator NoSuchOp"):
                client.infer("noop", {"x": np.zeros((1, 4), np.float32)})
        assert "serves no tensor model" in agent.log() and "serves no tensor model" in node.log()


# --- offload-tune ---------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("file", ["empty.onnx", "garbage.onnx", "dir.onnx", "gone.onnx", "pipe.onnx", "null.onnx",
                                  "noop.onnx", "opset99.onnx"])
def test_offload_tune_exits_2_naming_the_file(bad_dir, file: str, capsys: pytest.CaptureFixture) -> None:
    directory, expected = bad_dir
    path = directory / file
    for argv in (["profile", str(path)], ["sweep", str(path), "--device", "pi4"],
                 ["write-policy", str(directory / f"{GOOD}.onnx"), str(path), "--device", "pi4",
                  "-o", str(directory.parent / "never-written.toml")]):
        assert cli.main(argv) == 2, argv
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith(f"error: {path}: ") and expected[file] in lines[0], lines[0]
    assert not (directory.parent / "never-written.toml").exists()
