"""Running the daemons as services: health, reflection, metrics, signals, floods."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge_agent import sdk
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from tests.test_fleet import wait_for


def image(seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one series on a /metrics page (0 when absent)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in want):
                total += float(line.rsplit(" ", 1)[1])
    return total


def services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        return {s.name for reply in replies for s in reply.list_services_response.service}


def test_agent_health_reflection_and_metrics_that_move(model_dir: Path, cloud: launch.Daemon) -> None:
    # --llm-stall-s 30: a loaded machine's first remote token may take over 5 s, and the
    # generation would then move to the device, leaving the remote series empty
    agent = launch.edge_agent(model_dir, [cloud.address], "--llm-stall-s", "30", "--metrics-listen", "127.0.0.1:0", "--refresh-s", "0.3",
                              "--llm", "smollm2").wait_ready()
    try:
        url = json.loads(agent.ready_file.read_text())["metrics"]
        with grpc.insecure_channel(agent.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert {"tandem.v1.EdgeAgent", "grpc.health.v1.Health"} <= services(agent.address)
        before = metric(url, "tandem_requests_total", method="Infer", plan="remote", outcome="ok")
        with sdk.EdgeClient(agent.address) as client:
            for _ in range(3):
                client.infer("mobilenet", {"input": image()}, plan="remote")
        assert metric(url, "tandem_requests_total", method="Infer", plan="remote", outcome="ok") == before + 3
        assert metric(url, "tandem_stage_seconds_count", stage="network") >= 3
        assert metric(url, "tandem_prediction_error_ratio_count", plan_kind="remote") >= 3
        wait_for(lambda: metric(url, "tandem_link_rtt_seconds", node=cloud.address) > 0, "a link estimate series")
        assert metric(url, "tandem_inflight_requests") == 0
        # LLM latency under the OpenTelemetry GenAI names, and the engine's gauges
        with sdk.EdgeClient(agent.address) as client:
            client.generate_text(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, plan="remote")
            genai = {"gen_ai_request_model": "smollm2", "gen_ai_operation_name": "chat", "tandem_side": "remote",
                     "gen_ai_provider_name": "tandem"}
            for name in ("gen_ai_server_time_to_first_token_seconds_count", "gen_ai_server_request_duration_seconds_count",
                         "gen_ai_server_time_per_output_token_seconds_count"):
                assert metric(url, name, **genai) == 1, name
            with ThreadPoolExecutor(1) as pool:
                long = pool.submit(client.generate_text, "Once upon a time", max_tokens=200, plan="local")
                wait_for(lambda: metric(url, "tandem_llm_requests_running", model="smollm2") == 1, "a running generation")
                kv = wait_for(lambda: metric(url, "tandem_llm_kv_cache_usage_ratio", model="smollm2"), "the KV cache in use")
                assert 0 < kv <= 1
                long.result()
        assert metric(url, "tandem_llm_requests_running", model="smollm2") == 0
        assert metric(url, "tandem_llm_requests_waiting", model="smollm2") == 0
        assert metric(url, "process_resident_memory_bytes") > 0 and metric(url, "process_cpu_seconds_total") > 0
    finally:
        agent.stop()


def test_sigterm_during_a_burst_answers_every_accepted_request(model_dir: Path, cloud: launch.Daemon) -> None:
    agent = launch.edge_agent(model_dir, [cloud.address], "--max-concurrency", "1", "--grace-s", "60",
                              "--metrics-listen", "127.0.0.1:0").wait_ready()
    url = json.loads(agent.ready_file.read_text())["metrics"]
    batch = image(3, batch=48)  # ~0.1 s of compute per request here: they overlap
    # The agent profiles a new shape bucket in the background after its first request:
    # let that finish first, so the burst competes with nothing but itself.
    with sdk.EdgeClient(agent.address, timeout=120) as client:
        client.infer("resnet", {"input": batch}, plan="local")
        launch.wait_profiled(client, "resnet", [48, 3, 224, 224], timeout_s=120)

    def one(_: int) -> str:
        try:
            with sdk.EdgeClient(agent.address, timeout=120) as client:
                result = client.infer("resnet", {"input": batch}, plan="local")
        except sdk.TandemError as exc:
            return exc.code.name
        assert result.outputs["logits"].shape == (48, 1000)
        return "ok"

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        # stop while several are accepted (one computing, the others waiting for the single slot)
        def snapshot() -> tuple[int, float] | None:
            # finished first: a request that ends between the two reads is then counted in neither
            done = sum(f.done() for f in futures)
            inflight = metric(url, "tandem_inflight_requests")
            return (done, inflight) if inflight >= 2 else None

        finished, accepted = wait_for(snapshot, "accepted requests", tries=1500, pause_s=0.01)
        agent.process.send_signal(signal.SIGTERM)
        outcomes = [f.result() for f in futures]
    assert agent.process.wait(60) == 0
    # everything accepted by the moment of SIGTERM was answered; the rest was refused, never half-served
    assert outcomes.count("ok") >= finished + accepted, (finished, accepted, outcomes)
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert "draining" in agent.log()
    agent.stop()


def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path: Path, model_dir: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('deny = ["pi-old"]\nlog_level = "info"\n')
    with launch.cloud_node(model_dir, "--config", str(config)) as node:
        config.write_text('deny = ["pi-old"\n')  # a TOML syntax error
        node.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config rejected on SIGHUP" in node.log(), "the rejection in the log")
        config.write_text('deny = ["pi-old", "pi-lost"]\nlog_level = "info"\nmax_queue = 3\n')
        node.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in node.log(), "the reload in the log")
        assert "deny list 2 entries" in node.log() and "needing a restart: max_queue" in node.log()
        with grpc.insecure_channel(node.address) as channel:
            assert pb_grpc.CloudNodeStub(channel).Status(pb.StatusRequest(), timeout=5).node_id


def test_a_flood_is_refused_beyond_the_limits_memory_stays_bounded_and_service_resumes(model_dir: Path) -> None:
    with launch.cloud_node(model_dir, "--max-concurrency", "1", "--max-queue", "2") as node:
        process = psutil.Process(node.process.pid)
        request = pb.ModelRequest(model="mobilenet", inputs=[codec.encode(image(), "input")])
        with grpc.insecure_channel(node.address, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
            stub = pb_grpc.CloudNodeStub(channel)
            stub.RunModel(request, timeout=30)  # warm: sessions and arenas exist before we measure
            baseline = process.memory_info().rss
            codes: dict[str, int] = {}
            for _ in range(3):  # 3 waves of 100 concurrent requests
                calls = [stub.RunModel.future(request, timeout=60) for _ in range(100)]
                for call in calls:
                    try:
                        call.result()
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            assert "retry" in exc.details()
            grown_mb = (process.memory_info().rss - baseline) / 2**20
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
            assert codes.get("RESOURCE_EXHAUSTED", 0) > 100 and codes.get("OK", 0) >= 3, codes
            assert grown_mb < 200, f"the node grew by {grown_mb:.0f} MiB under the flood"
            reply = stub.RunModel(request, timeout=30)  # normal service resumes
            assert reply.outputs


def run_to_exit(module: str, *args: str) -> tuple[int, str]:
    """A daemon that must refuse to start: its exit code and what it said."""
    done = subprocess.run([sys.executable, "-m", module, *args, "--plaintext", "true"], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_a_second_daemon_on_a_port_in_use_is_refused_naming_the_address(model_dir: Path, cloud: launch.Daemon) -> None:
    """gRPC's default SO_REUSEPORT let both bind and both answer on one address."""
    code, said = run_to_exit("cloud_node.main", "--listen", cloud.address, "--models", str(model_dir),
                             "--advertise", "false")
    assert code == 1 and f"cannot listen on {cloud.address}" in said, said
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        code, said = run_to_exit("cloud_node.main", "--listen", "127.0.0.1:0", "--models", str(model_dir),
                                 "--advertise", "false", "--metrics-listen", metrics)
    assert code == 1 and f"cannot serve metrics on {metrics}" in said, said


def test_configuration_errors_exit_2_so_systemd_stops_restarting(tmp_path: Path) -> None:
    """The units set RestartPreventExitStatus=2: what the operator must fix is not retried for ever."""
    for module in ("cloud_node.main", "edge_agent.main"):
        code, said = run_to_exit(module, "--listen", "127.0.0.1:0", "--models", str(tmp_path / "missing"))
        assert code == 2 and "does not exist" in said, (module, said)


def test_the_unix_socket_lets_the_agents_group_connect_and_a_bad_mode_exits_2(tmp_path: Path, model_dir: Path) -> None:
    """Created under the umask, the socket was closed to the unit's group (connecting needs write permission)."""
    path = tmp_path / "agent.sock"
    with launch.edge_agent(model_dir, [], "--listen", f"unix:{path}") as agent, sdk.EdgeClient(agent.address) as client:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert client.infer("mobilenet", {"input": image()}).plan == "local"
    with launch.edge_agent(model_dir, [], "--listen", f"unix:{path}", "--socket-mode", "0600"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, said = run_to_exit("edge_agent.main", "--listen", f"unix:{path}", "--models", str(model_dir),
                             "--socket-mode", "rw-rw----")
    assert code == 2 and "socket_mode must be an octal mode" in said, said


def test_the_start_log_says_the_policy_and_links_in_words(agent: launch.Daemon) -> None:
    log = agent.log()
    assert "policy (flags only): objective latency" in log
    assert "Link(" not in log and "Mbit/s" in log  # the node's link, as a person reads it
