"""Traces across the hops: the app's span, the agent's Infer and its stages,
the node's RPC and its stages, all one trace joined by W3C traceparent; and
the same spans sent by the OTLP exporter to an OTLP/gRPC receiver."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from edge_agent import sdk
from runtimes import launch
from tests.test_llm import generate_when_seen

X = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def app_tracer():
    """The app's own tracing: the SDK sends its current span on."""
    return TracerProvider().get_tracer("app")


def spans_in(path: Path, trace_id: int) -> list[dict]:
    wanted = f"0x{trace_id:032x}"
    return [span for line in path.read_text().splitlines() if (span := json.loads(line))["context"]["trace_id"] == wanted]


def named(spans: list[dict], name: str) -> dict:
    (span,) = [s for s in spans if s["name"] == name]
    return span


def children(spans: list[dict], parent: dict) -> dict[str, dict]:
    return {s["name"]: s for s in spans if s["parent_id"] == parent["context"]["span_id"]}


def test_a_split_request_is_one_trace_from_the_app_through_the_agent_to_the_node(tmp_path: Path, model_dir: Path,
                                                                                 app_tracer) -> None:
    node_file, agent_file = tmp_path / "node.jsonl", tmp_path / "agent.jsonl"
    with launch.cloud_node(model_dir, "--trace-file", str(node_file), "--llm", "smollm2") as node, \
            launch.edge_agent(model_dir, [node.address], "--trace-file", str(agent_file)) as agent, \
            sdk.EdgeClient(agent.address) as client:
        client.infer("mobilenet", {"input": X}, plan="split:5")  # the cut's sessions exist: a warm request next
        with app_tracer.start_as_current_span("app request") as app:
            result = client.infer("mobilenet", {"input": X}, plan="split:5")
        assert result.plan == "split:5" and not result.fell_back
        with app_tracer.start_as_current_span("app generation") as generation:
            generate_when_seen(client, prompt="Hello", model="smollm2", max_tokens=4)  # no copy here: REMOTE
    trace_id, app_id = app.get_span_context().trace_id, f"0x{app.get_span_context().span_id:016x}"
    agent_spans, node_spans = spans_in(agent_file, trace_id), spans_in(node_file, trace_id)
    infer = named(agent_spans, "tandem.EdgeAgent/Infer")
    assert infer["parent_id"] == app_id and infer["kind"] == "SpanKind.SERVER"
    assert infer["attributes"]["tandem.plan"] == "split:5" and infer["attributes"]["tandem.fell_back"] is False
    assert infer["resource"]["attributes"]["service.name"] == "edge-agent"
    stages = children(agent_spans, infer)
    assert {"queue", "plan", "prefix", "encode", "network", "decode"} <= set(stages), sorted(stages)
    for stage in stages.values():  # each inside the request, in the order the agent runs them
        assert infer["start_time"] <= stage["start_time"] <= stage["end_time"] <= infer["end_time"]
    order = [stages[name]["start_time"] for name in ("plan", "prefix", "encode", "network", "decode")]
    assert order == sorted(order)
    network = stages["network"]
    assert network["kind"] == "SpanKind.CLIENT" and network["attributes"]["server.address"] == node.address
    served = named(node_spans, "tandem.CloudNode/RunPartition")
    assert served["parent_id"] == network["context"]["span_id"]
    assert served["resource"]["attributes"]["service.name"] == "cloud-node"
    assert {"queue", "decode", "cloud", "encode"} <= set(children(node_spans, served))
    # a generation streamed from the node: the same three hops
    trace_id = generation.get_span_context().trace_id
    agent_spans, node_spans = spans_in(agent_file, trace_id), spans_in(node_file, trace_id)
    streamed = named(agent_spans, "tandem.EdgeAgent/Generate")
    assert streamed["parent_id"] == f"0x{generation.get_span_context().span_id:016x}"
    assert streamed["attributes"]["tandem.plan"] == "remote" and streamed["attributes"]["gen_ai.usage.output_tokens"] == 4
    network = children(agent_spans, streamed)["network"]
    assert named(node_spans, "tandem.CloudNode/Generate")["parent_id"] == network["context"]["span_id"]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC endpoint (the collector's trace service) that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 -- the service's method name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_the_agent_exports_its_spans_over_otlp(model_dir: Path, app_tracer) -> None:
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with launch.edge_agent(model_dir, [], "--otlp-endpoint", f"http://127.0.0.1:{port}") as agent, \
                sdk.EdgeClient(agent.address) as client, app_tracer.start_as_current_span("app request") as app:
            assert client.infer("mobilenet", {"input": X}).plan == "local"
        # the agent has stopped: its last batch went out as it shut down
    finally:
        server.stop(None)
    exported = [(resource, span) for request in receiver.requests for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]
    infer = [(r, s) for r, s in exported if s.name == "tandem.EdgeAgent/Infer"]
    assert len(infer) == 1
    resource, span = infer[0]
    assert int.from_bytes(span.trace_id, "big") == app.get_span_context().trace_id
    assert int.from_bytes(span.parent_span_id, "big") == app.get_span_context().span_id
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    assert service == "edge-agent"
    assert {"queue", "plan", "edge"} <= {s.name for _, s in exported if s.parent_span_id == span.span_id}
