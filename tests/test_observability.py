"""Observability of a real cloud node: gRPC reflection, /metrics, JSON logs."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch


@dataclass
class Node:
    daemon: launch.Daemon
    metrics_url: str


@pytest.fixture(scope="module")
def node(model_dir: Path) -> Iterator[Node]:
    with launch.cloud_node(model_dir, "--metrics-listen", "127.0.0.1:0", "--log-format", "json") as daemon:
        # Read now: the ready file lives in the daemon's temporary directory, gone once it stops.
        yield Node(daemon, json.loads(daemon.ready_file.read_text())["metrics"])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_counted(samples: dict[tuple[str, frozenset], float], method: str, outcome: str) -> float:
    labels = frozenset({"method": method, "plan": "", "outcome": outcome}.items())
    return samples.get(("tandem_requests_total", labels), 0.0)


def test_reflection_lists_the_node_and_health_services(node: Node) -> None:
    with grpc.insecure_channel(node.daemon.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"tandem.v1.CloudNode", "grpc.health.v1.Health"} <= services


def test_metrics_count_real_requests(node: Node) -> None:
    text = scrape(node.metrics_url)
    for name in ("tandem_requests_total", "tandem_fallbacks_total", "tandem_stage_seconds", "tandem_prediction_error_ratio",
                 "tandem_queue_depth", "tandem_inflight_requests", "tandem_link_uplink_mbps", "tandem_link_downlink_mbps",
                 "tandem_link_rtt_seconds", "tandem_llm_tokens_per_second", "tandem_llm_tokens_total"):
        assert f"# HELP {name} " in text, name
    before = samples(text)
    assert before[("target_info", frozenset({"daemon": "cloud-node"}.items()))] == 1.0
    assert before[("tandem_queue_depth", frozenset({"resource": "onnx"}.items()))] == 0.0

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with grpc.insecure_channel(node.daemon.address) as channel:
        stub = pb_grpc.CloudNodeStub(channel)
        digest = {m.name: m.digest for m in stub.Status(pb.StatusRequest(), timeout=10).models}["mobilenet"]
        reply = stub.RunModel(pb.ModelRequest(model="mobilenet", model_digest=digest, inputs=[codec.encode(x, "input")]), timeout=30)
        assert reply.outputs
        with pytest.raises(grpc.RpcError) as info:
            stub.RunModel(pb.ModelRequest(model="no-such-model", inputs=[codec.encode(x, "input")]), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    after = samples(scrape(node.metrics_url))
    assert requests_counted(after, "RunModel", "ok") == requests_counted(before, "RunModel", "ok") + 1
    assert requests_counted(after, "RunModel", "error") == requests_counted(before, "RunModel", "error") + 1
    compute_count = ("tandem_stage_seconds_count", frozenset({"stage": "compute"}.items()))
    assert after[compute_count] == before.get(compute_count, 0.0) + 1
    assert after[("tandem_inflight_requests", frozenset())] == 0.0


def test_json_log_format_writes_one_object_per_line(node: Node) -> None:
    lines = [line for line in node.daemon.log().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    serving = [e for e in entries if "serving" in e["message"]]
    assert serving, node.daemon.log()
    assert set(serving[0]) >= {"ts", "level", "logger", "message"}
    assert serving[0]["level"] == "INFO" and serving[0]["ts"].endswith("+00:00")
    assert any(node.metrics_url in e["message"] for e in entries)
