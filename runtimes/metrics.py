"""Prometheus metrics both daemons expose on ``/metrics``.

Each daemon builds one ``Metrics``: its series live in their own
``CollectorRegistry``, not prometheus_client's global one, so several daemons
(or tests) in one process never share counters. The API takes milliseconds,
like the rest of Tandem; the series are in seconds, the Prometheus convention.
Which daemon a scrape comes from is in ``target_info{daemon=...}``, so the
series' own labels mean the same on the agent and on the node. LLM latency
follows the OpenTelemetry GenAI server conventions (``gen_ai_server_*``, with
their bucket boundaries); the process's own figures are the standard
``process_*`` series.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

logger = logging.getLogger(__name__)

# 0.5 ms (a codec pass on a small tensor) .. 30 s (a long generation), about
# three buckets per decade so quantiles stay within a factor of ~2.
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# |predicted - measured| / measured: 1 % (a well-calibrated profile) .. 10x off.
ERROR_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# The explicit bucket boundaries the OpenTelemetry GenAI semantic conventions
# give each model-server metric (docs/gen-ai/gen-ai-metrics.md, semantic-conventions v1.41.0).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
PER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "tandem_side"]
GEN_AI_PROVIDER = "tandem"  # not one of the conventions' well-known providers: a custom value, as they allow


class Metrics:
    """The series one daemon exports, and the few calls that move them."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(target_info={"daemon": daemon})
        r = self.registry
        self.requests = Counter("tandem_requests_total", "Requests handled, by RPC method, plan that ran "
                                "(local, split, remote, or empty where the daemon does not plan) and outcome "
                                "(ok, fallback, error, rejected = RESOURCE_EXHAUSTED, cancelled by the caller)",
                                ["method", "plan", "outcome"], registry=r)
        self.fallbacks = Counter("tandem_fallbacks_total", "Requests that fell back to LOCAL, by kind of reason",
                                 ["reason_kind"], registry=r)
        self.stage_seconds = Histogram("tandem_stage_seconds", "Time a request spent in each stage: edge, encode, network, "
                                       "cloud, decode, total, compute, queue", ["stage"], buckets=STAGE_BUCKETS_S, registry=r)
        self.prediction_error = Histogram("tandem_prediction_error_ratio", "Cost-model error of a request: "
                                          "|predicted - measured| / measured latency, by plan kind", ["plan_kind"],
                                          buckets=ERROR_RATIO_BUCKETS, registry=r)
        self.queue_depth = Gauge("tandem_queue_depth", "Requests waiting for a slot, by resource "
                                 "('onnx' for the admission queue, else the LLM's name)", ["resource"], registry=r)
        self.inflight = Gauge("tandem_inflight_requests", "Requests being handled now, queued or running", registry=r)
        self.uplink = Gauge("tandem_link_uplink_mbps", "Estimated uplink bandwidth to a node, Mbit/s", ["node"], registry=r)
        self.downlink = Gauge("tandem_link_downlink_mbps", "Estimated downlink bandwidth from a node, Mbit/s", ["node"], registry=r)
        self.rtt = Gauge("tandem_link_rtt_seconds", "Estimated round-trip time to a node, seconds", ["node"], registry=r)
        self.connectivity = Gauge("tandem_connectivity", "The cloud as the agent sees it: 1 for the state it is in",
                                  ["state"], registry=r)
        self.deferred_pending = Gauge("tandem_deferred_pending", "Deferred requests waiting for a node", registry=r)
        self.deferred_age = Gauge("tandem_deferred_oldest_age_seconds", "Age of the oldest deferred request waiting",
                                  registry=r)
        self.llm_tok_s = Gauge("tandem_llm_tokens_per_second", "Generation speed of the last finished generation, tokens/s, "
                               "by model and side (local, remote, node)", ["model", "side"], registry=r)
        self.llm_tokens = Counter("tandem_llm_tokens_total", "Completion tokens generated, by model", ["model"], registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token", "Time to generate the first token of a successful "
                              "generation (OpenTelemetry GenAI); tandem_side: local, remote (from the agent) or node",
                              GEN_AI_LABELS, unit="seconds", buckets=TTFT_BUCKETS_S, registry=r)
        self.per_token = Histogram("gen_ai_server_time_per_output_token", "Time per output token after the first, of a "
                                   "successful generation (OpenTelemetry GenAI)", GEN_AI_LABELS, unit="seconds",
                                   buckets=PER_TOKEN_BUCKETS_S, registry=r)
        self.generation_seconds = Histogram("gen_ai_server_request_duration", "Time to the last token of a successful "
                                            "generation (OpenTelemetry GenAI)", GEN_AI_LABELS, unit="seconds",
                                            buckets=REQUEST_BUCKETS_S, registry=r)
        self.llm_waiting = Gauge("tandem_llm_requests_waiting", "Generations waiting for a slot, by model", ["model"],
                                 registry=r)
        self.llm_running = Gauge("tandem_llm_requests_running", "Generations decoding now, by model", ["model"], registry=r)
        self.kv_cache = Gauge("tandem_llm_kv_cache_usage_ratio", "Share of the model's KV cache (slots x context) the "
                              "running generations hold, 0..1", ["model"], registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe_request(self, method: str, plan: str, outcome: str, stages_ms: dict[str, float] | None = None) -> None:
        """Count one finished request and record its stage times (ms, keyed by stage name)."""
        self.requests.labels(method, plan, outcome).inc()
        for stage, ms in (stages_ms or {}).items():
            self.stage_seconds.labels(stage).observe(ms / 1e3)

    def observe_fallback(self, reason_kind: str) -> None:
        self.fallbacks.labels(reason_kind).inc()

    def observe_prediction(self, plan_kind: str, predicted_ms: float, measured_ms: float) -> None:
        """Record how far the cost model was off; nothing when nothing was measured."""
        if measured_ms > 0:
            self.prediction_error.labels(plan_kind).observe(abs(predicted_ms - measured_ms) / measured_ms)

    def set_queue(self, resource: str, depth: int | Callable[[], float]) -> None:
        """Set a queue's depth; given a callable, it is read at each scrape instead,
        so the gauge is exact whenever Prometheus looks, not only when requests pass."""
        child = self.queue_depth.labels(resource)
        if callable(depth):
            child.set_function(depth)
        else:
            child.set(depth)

    def in_flight(self) -> contextlib.AbstractContextManager:
        """Count the enclosed block as an in-flight request."""
        return self.inflight.track_inprogress()

    def set_cloud(self, state: str) -> None:
        for name in ("online", "degraded", "offline"):
            self.connectivity.labels(name).set(1.0 if name == state else 0.0)

    def watch_deferred(self, stats: Callable[[], tuple[int, float]]) -> None:
        """The deferred queue's depth and oldest age, read at each scrape."""
        self.deferred_pending.set_function(lambda: stats()[0])
        self.deferred_age.set_function(lambda: stats()[1])

    def set_link(self, node: str, *, uplink_mbps: float, downlink_mbps: float, rtt_ms: float) -> None:
        self.uplink.labels(node).set(uplink_mbps)
        self.downlink.labels(node).set(downlink_mbps)
        self.rtt.labels(node).set(rtt_ms / 1e3)

    def observe_llm(self, model: str, side: str, *, tokens: int, tok_s: float, operation: str = "text_completion",
                    ttft_ms: float = 0.0, total_ms: float = 0.0) -> None:
        """Record one finished generation; a speed of 0 (one token, cancelled) keeps the last one.
        ``operation`` is the GenAI one: chat (messages) or text_completion."""
        self.llm_tokens.labels(model).inc(tokens)
        if tok_s > 0:
            self.llm_tok_s.labels(model, side).set(tok_s)
        labels = (operation, GEN_AI_PROVIDER, model, side)
        if ttft_ms > 0:
            self.ttft.labels(*labels).observe(ttft_ms / 1e3)
        if total_ms > 0:
            self.generation_seconds.labels(*labels).observe(total_ms / 1e3)
        if tokens > 1 and total_ms > ttft_ms > 0:
            self.per_token.labels(*labels).observe((total_ms - ttft_ms) / 1e3 / (tokens - 1))

    def watch_llms(self, engines: dict) -> None:
        """Queue, running and KV-cache gauges of each LLM engine, read at each scrape."""
        for name, engine in engines.items():
            self.set_queue(name, lambda engine=engine: engine.queued)
            self.llm_waiting.labels(name).set_function(lambda engine=engine: engine.queued)
            self.llm_running.labels(name).set_function(lambda engine=engine: engine.active)
            self.kv_cache.labels(name).set_function(lambda engine=engine: engine.kv_cache_usage())

    def render(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (port 0: any free one)."""
        if self._http is not None:
            raise RuntimeError("metrics endpoint already started")
        self._http = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http[0].server_port
        logger.debug("metrics endpoint on %s:%d", host, bound)
        return bound

    def serve(self, listen: str) -> str:
        """``start_http`` on a HOST:PORT (or [IPv6]:PORT) setting; returns the endpoint's URL."""
        host, _, port = listen.rpartition(":")
        try:
            bound = self.start_http(host.strip("[]"), int(port))
        except OSError as exc:  # the bare "[Errno 98] Address already in use" names no address
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        return f"http://{host}:{bound}/metrics"

    def stop(self) -> None:
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join()
