"""OpenTelemetry traces across the hops of a request: app -> agent -> node.

The W3C ``traceparent`` travels in gRPC metadata: the SDK sends the app's
current span, each daemon continues the trace it receives and passes it on
to the node it calls. A daemon records spans only when told where to send
them (``otlp_endpoint``: any OpenTelemetry collector; ``trace_file``: JSON
lines, for a quick look or a test); otherwise tracing is the API's no-op and
costs nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

TRACER = trace.get_tracer("tandem")


class JsonLinesExporter(SpanExporter):
    """Each finished span as one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self._out: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 -- open for the daemon's life

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._out.write(span.to_json(indent=None) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._out.close()


def configure(service: str, *, otlp_endpoint: str = "", trace_file: Path | None = None) -> TracerProvider | None:
    """Record this daemon's spans where the settings say; None when nowhere."""
    if not otlp_endpoint and trace_file is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # only when used

        # http:// is plaintext, https:// (or a bare HOST:PORT) TLS, as OTLP exporters read it
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if trace_file is not None:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    trace.set_tracer_provider(provider)
    return provider


def incoming(metadata: Sequence[tuple[str, Any]] | None) -> otel_context.Context:
    """The trace a caller's gRPC metadata continues (an empty one if none)."""
    return propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})


def outgoing() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current span to the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


@contextlib.contextmanager
def serving(name: str, metadata: Sequence[tuple[str, Any]] | None, **attributes: Any) -> Iterator[trace.Span]:
    """A server span for one RPC, continuing the caller's trace."""
    with TRACER.start_as_current_span(name, context=incoming(metadata), kind=SpanKind.SERVER,
                                      attributes=attributes) as span:
        yield span


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any):
    """A child of the current span, for a stage run on this task."""
    return TRACER.start_as_current_span(name, kind=kind, attributes=attributes)


def record(name: str, start: float, end: float | None = None, **attributes: Any) -> float:
    """A child of the current span for a stage timed elsewhere (a worker
    thread), from its ``time.perf_counter()`` start and end (default: now);
    returns the stage's time in ms, so the span and the reply's stage times agree."""
    end = time.perf_counter() if end is None else end
    wall_minus_perf_ns = time.time_ns() - time.perf_counter_ns()  # now: the wall clock may have been slewed since
    stage = TRACER.start_span(name, start_time=int(start * 1e9) + wall_minus_perf_ns, attributes=attributes)
    stage.end(end_time=int(end * 1e9) + wall_minus_perf_ns)
    return (end - start) * 1e3
