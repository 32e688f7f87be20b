"""offload-tune's subcommands on the built models, checked against the partitioner's own answers."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from matplotlib import image as mpimg
from onnx import TensorProto, helper

from devices.profiles import DEVICES
from edge_agent import sdk
from offload_tune.cli import main
from partitioner.policy import parse
from runtimes import launch
from runtimes.llm import find_smollm2
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import load_or_measure, predicted_for


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def best_feasible(candidates: list[dict]) -> str:
    return min((c for c in candidates if c["feasible"]), key=lambda c: c["score"])["plan"]


def test_profile_reports_the_board_prediction_the_agent_would_plan_with(capsys, model_dir: Path) -> None:
    report = run_json(capsys, "profile", str(model_dir / "mobilenet.onnx"), "--device", "pi4")
    model = OnnxModel("mobilenet", model_dir / "mobilenet.onnx")
    # the board prediction of the host times the report shows (measured again here they would differ
    # on a busy machine, where profiles are not cached)
    here = replace(load_or_measure(model), segment_ms=tuple(s["ms_here"] for s in report["segments"]),
                   run_overhead_ms=report["run_overhead_ms_here"], whole_ms=report["whole_ms_here"])
    expected = predicted_for(DEVICES["pi4"], model, here)
    assert report["predicted"] and report["device"] == "pi4"
    assert [s["ms_on_device"] for s in report["segments"]] == pytest.approx(list(expected.segment_ms))
    assert report["whole_ms_on_device"] == pytest.approx(expected.whole_ms)
    cumulative = [s["cumulative_ms_on_device"] for s in report["segments"]]
    assert cumulative == sorted(cumulative) and cumulative[-1] == pytest.approx(expected.whole_ms)
    assert all(s["flops"] > 0 for s in report["segments"][:5])
    assert report["segments"][0]["output_bytes"] == 1 * 32 * 112 * 112 * 4  # the stem's output, float32


def test_a_dynamic_detector_is_profiled_at_its_declared_or_given_shape(capsys, tmp_path: Path) -> None:
    from modelzoo.build import build_all

    path = build_all(tmp_path, names=["detector"])["detector"]
    declared = run_json(capsys, "profile", str(path), "--device", "pi4")
    assert declared["input_shapes"] == {"images": [1, 3, 320, 320]}
    given = run_json(capsys, "profile", str(path), "--profile-shape", "images=1,3,256,384")
    assert given["input_shapes"] == {"images": [1, 3, 256, 384]}
    # the stem halves H and W: its output is 16 x 128 x 192 float32 at that shape
    assert given["segments"][0]["output_bytes"] == 16 * 128 * 192 * 4
    assert main(["explain", str(path), "--device", "pi4", "--bandwidth", "18.88"]) == 0
    capsys.readouterr()
    assert main(["profile", str(path), "--profile-shape", "images=1,3,64,47"]) == 2
    assert "could not be profiled at images[1,3,64,47]" in capsys.readouterr().err


def test_sweep_chooses_what_the_cost_model_scores_best_and_draws_it(capsys, model_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    bandwidths = ["0.5", "5", "50", "500"]
    report = run_json(capsys, "sweep", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--encoding", "int8",
                      "--rtt-ms", "10", "--bandwidths", *bandwidths, "--png", str(png))
    input_wire = 3 * 224 * 224  # int8: one byte per value (scale and zero point travel as message fields)
    for point in report["points"]:
        assert point["chosen"] == best_feasible(point["candidates"])
        remote = next(c for c in point["candidates"] if c["plan"] == "remote")
        # network = RTT + input up + logits (1000 float32) down, at the swept rate both ways
        mbps = point["uplink_mbps"]
        expected = 10 + input_wire * 8 / (mbps * 1e3) + 4000 * 8 / (mbps * 1e3)
        assert remote["stages_ms"]["network"] == pytest.approx(expected, rel=1e-3)
    chosen = [p["chosen"] for p in report["points"]]
    assert chosen[0] == "local"  # 0.5 Mbit/s: 150 kB would take 2.4 s
    for edge in report["break_even"]:
        below = [p for p in report["points"] if p["uplink_mbps"] < edge["mbps"]][-1]
        above = [p for p in report["points"] if p["uplink_mbps"] > edge["mbps"]][0]
        assert edge["from"] == below["chosen"] and edge["to"] != edge["from"] and below["chosen"] != above["chosen"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    height, width, _ = mpimg.imread(png).shape
    assert width > 800 and height > 300


def test_energy_and_latency_objectives_can_disagree_and_say_why(capsys, model_dir: Path) -> None:
    args = ["explain", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--bandwidth", "100", "--rtt-ms", "2",
            "--encoding", "int8"]
    fast = run_json(capsys, *args)
    frugal = run_json(capsys, *args, "--objective", "energy")
    assert fast["chosen"] == best_feasible(fast["candidates"])
    assert frugal["chosen"] == best_feasible(frugal["candidates"])
    by_energy = min(frugal["candidates"], key=lambda c: c["energy_j"])
    assert frugal["chosen"] == by_energy["plan"]
    assert fast["chosen"] in fast["why"] and "energy" in frugal["why"]


def test_link_measures_a_running_node(capsys, cloud: launch.Daemon) -> None:
    report = run_json(capsys, "link", cloud.address)
    assert report["rtt_ms"] > 0 and report["uplink_mbps"] > 0 and report["downlink_mbps"] > 0
    assert {"mobilenet", "resnet", "smollm2"} <= set(report["models"])


def test_sweep_with_a_cloud_node_plans_with_its_profile(capsys, model_dir: Path, cloud: launch.Daemon) -> None:
    report = run_json(capsys, "sweep", str(model_dir / "resnet.onnx"), "--device", "pi5", "--cloud", cloud.address,
                      "--bandwidths", "10", "100")
    assert report["assumptions"]["cloud_times"] == f"measured by cloud node {cloud.address}"
    assert report["assumptions"]["rtt_ms"] > 0  # measured, not the assumed default


def test_gguf_routing_table_follows_the_router(capsys) -> None:
    report = run_json(capsys, "sweep", str(find_smollm2()), "--device", "pi4", "--bandwidths", "20",
                      "--prompt-tokens", "16", "512", "--max-tokens", "8", "128")
    assert len(report["routes"]) == 4
    for route in report["routes"]:  # latency objective: the faster predicted route
        faster = "local" if route["local_total_ms"] <= route["remote_total_ms"] else "remote"
        assert route["chosen"] == faster
    assert report["local_tok_s"]["generation"] > 0 and report["cloud_tok_s"]["prompt"] > 0


def single_op_model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="only")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_tune.cli", *argv], capture_output=True, text=True, timeout=300)


def test_bad_input_exits_2_with_the_reason_and_writes_nothing(tmp_path: Path, model_dir: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    one = single_op_model(tmp_path / "one.onnx")
    policy = tmp_path / "policy.toml"
    cases = [
        (["sweep", str(tmp_path / "missing.onnx"), "--device", "pi4"], "no such file"),
        (["explain", str(junk), "--device", "pi4", "--bandwidth", "5"], "not a readable ONNX model"),
        (["sweep", str(one), "--device", "pi4"], "cannot be split"),
        (["sweep", str(model_dir / "mobilenet.onnx"), "--device", "pi9"], "unknown device 'pi9'"),
        (["sweep", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--bandwidths", "0"], "bandwidths must be > 0"),
        (["explain", str(junk.with_suffix(".gguf")), "--device", "pi4", "--bandwidth", "5"], "no such file"),
        (["link", "nowhere"], "is not HOST:PORT"),
        (["write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--slo-ms", "-5", "-o", str(policy)],
         "--slo-ms: must be > 0"),
        (["write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--objective", "fast", "-o", str(policy)],
         "--objective: must be one of"),
        (["write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--allowed-cuts", "3,99", "-o", str(policy)],
         "mobilenet has cuts 1..25, not [99]"),
    ]
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"ONNX? no.")
    cases.append((["sweep", str(not_gguf), "--device", "pi4"], "is not a GGUF file"))
    cases.append((["sweep", str(find_smollm2()), "--device", "pi4", "--png", str(tmp_path / "llm.png")],
                  "--png draws a tensor model's latency and energy"))  # refused, not silently ignored
    for argv, message in cases:
        result = cli(*argv)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        assert message in " ".join(result.stderr.split()), (argv, result.stderr)
    assert not policy.exists() and not list(tmp_path.glob(".policy*"))
    # a model that cannot be cut still plans LOCAL vs REMOTE when asked to
    assert cli("explain", str(one), "--device", "pi4", "--bandwidth", "5", "--whole", "--json").returncode == 0


def test_written_policy_round_trips_and_steers_a_running_agent_on_sighup(tmp_path: Path, model_dir: Path,
                                                                        cloud: launch.Daemon) -> None:
    policy = tmp_path / "policy.toml"
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    # 1. nothing leaves the device
    assert cli("write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--memory-limit-mb", "1",
               "--quiet", "-o", str(policy)).returncode == 0
    written = parse(policy.read_text())
    assert written.for_model("mobilenet").constraints.memory_limit_bytes == 2**20
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(policy.stat().st_mode) == 0o666 & ~umask  # readable as any new file is, not mkstemp's 0600
    local_only = policy.read_text().replace("allow_remote = true # hard", "allow_remote = false # hard")
    local_only = local_only.replace("memory_limit_mb = 1.0", "# memory limit lifted")
    policy.write_text(local_only)
    with launch.edge_agent(model_dir, [cloud.address], "--policy", str(policy)) as agent, \
            sdk.EdgeClient(agent.address) as client:
        first = client.infer("mobilenet", {"input": x})
        assert first.plan == "local"
        # 2. the written policy (1 MiB for the device: only REMOTE fits), loaded on SIGHUP
        policy.chmod(0o640)
        assert cli("write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--memory-limit-mb", "1",
                   "--quiet", "-o", str(policy)).returncode == 0
        assert stat.S_IMODE(policy.stat().st_mode) == 0o640  # the owner's choice of mode is kept
        agent.process.send_signal(signal.SIGHUP)
        plans = []
        for _ in range(50):  # bounded: the reload is asynchronous
            result = client.infer("mobilenet", {"input": x})
            plans.append(result.plan)
            if result.plan != "local":
                break
            time.sleep(0.05)
        assert plans[-1] == "remote", plans
        np.testing.assert_allclose(result.outputs["logits"], first.outputs["logits"], rtol=1e-5, atol=1e-5)
        # 3. an invalid policy is refused with its line; the agent keeps the last good one
        policy.write_text("[default]\nobjective = \"fastest\"\n")
        agent.process.send_signal(signal.SIGHUP)
        for _ in range(50):
            if "rejected" in agent.log():
                break
            time.sleep(0.05)
        assert "line 2: objective in [default]" in agent.log() and "keeping the previous one" in agent.log()
        assert client.infer("mobilenet", {"input": x}).plan == "remote"


def test_write_policy_json_says_what_was_written_and_warns_when_no_cut_is_left(tmp_path: Path, model_dir: Path) -> None:
    policy = tmp_path / "policy.toml"
    # At 10 Gbit/s sending the input costs nothing, so a split only adds its
    # prefix on a pi4 (slower than this host, which is the cloud here): REMOTE wins.
    result = cli("write-policy", str(model_dir / "mobilenet.onnx"), "--device", "pi4", "--bandwidths", "10000",
                 "--json", "-o", str(policy))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(policy) and report["policy"] == policy.read_text()
    assert report["models"]["mobilenet"]["allowed_cuts"] == []
    assert parse(policy.read_text()).for_model("mobilenet").constraints.allowed_cuts == frozenset()
    assert "warning: no split of mobilenet won anywhere" in " ".join(result.stderr.split())


def test_an_invalid_policy_stops_the_agent_at_start_with_the_line(tmp_path: Path, model_dir: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n[models.mobilenet]\nallowed_cuts = [0, 3]\n")
    agent = launch.edge_agent(model_dir, [], "--policy", str(policy))
    with pytest.raises(RuntimeError, match=r"exited with 2"):
        agent.wait_ready(timeout_s=120)
    assert "line 3: allowed_cuts in [models.mobilenet]: mobilenet has cuts 1..25, not [0]" in agent.log()
    agent.stop()


def test_policy_prefers_nodes_and_limits_llm_routing(tmp_path: Path, model_dir: Path, cloud: launch.Daemon) -> None:
    policy = tmp_path / "policy.toml"
    with launch.cloud_node(model_dir) as other:
        policy.write_text(f'[models.mobilenet]\npreferred_nodes = ["{other.address}"]\n[llm]\nallow_remote = false\n')
        with launch.edge_agent(model_dir, [cloud.address, other.address], "--policy", str(policy), "--llm", "smollm2") \
                as agent, sdk.EdgeClient(agent.address) as client:
            offloads = {c.node for c in client.explain("mobilenet").candidates if c.plan != "local"}
            assert offloads == {other.address}
            both = {c.node for c in client.explain("resnet").candidates if c.plan != "local"}
            assert both == {cloud.address, other.address}  # no preference for resnet
            routes = client.explain("smollm2", prompt_tokens=16, max_tokens=8).candidates
            assert all(not c.feasible for c in routes if c.plan != "local") and any(c.plan != "local" for c in routes)
            other.stop()  # the preferred node is gone: plan on the others rather than not at all
            for _ in range(100):  # bounded: the agent notices at its next refresh (2 s) or request
                offloads = {c.node for c in client.explain("mobilenet").candidates if c.plan != "local"}
                if offloads == {cloud.address}:
                    break
                time.sleep(0.1)
            assert offloads == {cloud.address}
