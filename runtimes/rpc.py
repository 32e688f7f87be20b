"""gRPC plumbing both daemons share: error mapping, server options, health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from partitioner.graph import GraphError
from protos.codec import CodecError
from runtimes.admission import Overloaded, TooLarge
from runtimes.llm import GenerationError
from runtimes.onnx_exec import InputError
from runtimes.shared_memory import NotLocal, RegionExists, RegionInUse, UnknownRegion

logger = logging.getLogger(__name__)

# A status message longer than this is cut: gRPC carries it in a header
# (8 KiB of metadata by default), and inputs echoed into it are the caller's.
MAX_STATUS_CHARS = 1000


class UnknownModel(LookupError):
    pass


class NoFeasiblePlan(RuntimeError):
    """Every plan breaks a hard constraint (privacy, memory, allowed cuts)."""


class NotProfiled(RuntimeError):
    """The model is served, but has no profile to plan with (yet)."""


class NoNodeLeft(RuntimeError):
    """Work only the cloud can do, and no node is left to do it."""


class ModelMismatch(RuntimeError):
    """The peer's copy of a model differs from ours (digest)."""


def is_onnxruntime_input_error(exc: BaseException) -> bool:
    # onnxruntime's pybind exceptions (InvalidArgument, Fail, ...) all live in
    # this module; when raised while running caller-supplied tensors they
    # mean the tensors do not fit the graph.
    return type(exc).__module__.startswith("onnxruntime")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller should see for ``exc``. An
    exception may name its own status (``status_code``, a StatusCode name),
    so modules that know no gRPC still say which one they mean."""
    own = getattr(type(exc), "status_code", None)
    if own is not None:
        return grpc.StatusCode[own], str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if isinstance(exc, (CodecError, InputError, GraphError, GenerationError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if is_onnxruntime_input_error(exc):
        return grpc.StatusCode.INVALID_ARGUMENT, f"onnxruntime refused the tensors: {exc}"
    if isinstance(exc, (UnknownModel, UnknownRegion)):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc)
    if isinstance(exc, RegionExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, NotLocal):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, (ModelMismatch, NoFeasiblePlan, NotProfiled, RegionInUse)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (Overloaded, TooLarge)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NoNodeLeft):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    logger.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with ``exc``'s status; the message is bounded (a caller's
    megabyte-long name is not echoed back), and a full server says when to
    come back (``retry-after-ms`` in the trailing metadata)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # already a status
    code, message = status_for(exc)
    if isinstance(exc, Overloaded):
        context.set_trailing_metadata((("retry-after-ms", str(round(exc.retry_after_ms))),))
    await context.abort(code, bounded(message))


def bounded(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 40]}... ({len(text):,} characters in all)"


# The stream window of a daemon serving apps on its own board. gRPC grows
# windows to the bandwidth-delay product it measures, and buffers that much of
# every call, read or not. A fixed 1 MiB bounds what a waiting call holds; its
# cost per loopback call stayed within this machine's run-to-run noise
# (-0.09 to +0.22 ms for 600 KB over 4 runs of python -m bench.memory).
APP_STREAM_WINDOW_BYTES = 1 << 20


def server_options(max_message_mb: int, *, stream_window_bytes: int | None = None) -> list[tuple[str, int]]:
    """A daemon's server: gRPC turns SO_REUSEPORT on by default, which let a
    second daemon bind a port in use and both answer on one address.
    ``stream_window_bytes`` fixes the window instead of gRPC's adaptive one."""
    options = [*channel_options(max_message_mb), ("grpc.so_reuseport", 0)]
    if stream_window_bytes is not None:
        options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", stream_window_bytes)]
    return options


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def add_health(server: grpc.aio.Server) -> health.HealthServicer:
    """Standard grpc.health.v1; callers wait for SERVING, never on time."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def set_serving(servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection, so grpcurl and other generic clients can list and call
    ``service_names`` (full names) without our .proto; health and reflection
    itself are listed too."""
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)


class MalformedRequest:
    """Stands in for a request protobuf could not parse (invalid UTF-8 in a
    string field, truncated bytes), so the caller gets INVALID_ARGUMENT with
    the reason instead of the INTERNAL grpcio answers by default."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError and friends
            return MalformedRequest(f"the request is not a valid message (invalid UTF-8 in a string field?): {exc}")

    return parse


Gate = Callable[[grpc.aio.ServicerContext], "str | None"]  # the reason to refuse a caller, or None
Message = TypeVar("Message")


class Unread(Generic[Message]):
    """A unary request still on the wire. A method registered to take one
    reads it only once it has admitted the call, so a queued call holds at
    most gRPC's flow-control window of its payload, not the whole request and
    its parsed copy, and a refused one is never read at all."""

    def __init__(self, messages: AsyncIterator[bytes], parse: Callable[[bytes], Message]) -> None:
        self._messages = messages
        self._parse = parse
        self.size = 0  # bytes on the wire, once read

    async def read(self) -> Message:
        data = await anext(self._messages, None)
        if data is None:
            raise InputError("the call ended before its request arrived")
        # Read on to the end of the call: gRPC's reader otherwise stays suspended
        # holding the message it yielded until a garbage collection finds it
        # (an agent's RSS grew 30 MiB per 27.6 MiB request, to 1.3 GB).
        if await anext(self._messages, None) is not None:
            raise InputError("a unary call carried more than one request")
        self.size = len(data)
        parsed = _lenient(self._parse)(data)
        if isinstance(parsed, MalformedRequest):
            raise InputError(parsed.error)
        return parsed


async def _admit(request, context: grpc.aio.ServicerContext, gate: Gate | None) -> None:
    """Refuse a caller the gate names a reason for, then a request that did not parse."""
    refusal = gate(context) if gate else None
    if refusal:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)


def _guarded(handler: grpc.RpcMethodHandler, gate: Gate | None, *, unread: bool = False) -> grpc.RpcMethodHandler:
    if unread:  # on the wire a unary call and a one-message stream are the same: read it as a stream, when admitted
        behavior, parse = handler.unary_unary, handler.request_deserializer

        async def when_admitted(messages: AsyncIterator[bytes], context):
            await _admit(None, context, gate)
            return await behavior(Unread(messages, parse), context)

        return grpc.stream_unary_rpc_method_handler(when_admitted, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def stream(request, context):
            await _admit(request, context, gate)
            async for item in behavior(request, context):
                yield item

        return handler._replace(unary_stream=stream, request_deserializer=_lenient(handler.request_deserializer))
    behavior = handler.unary_unary

    async def unary(request, context):
        await _admit(request, context, gate)
        return await behavior(request, context)

    return handler._replace(unary_unary=unary, request_deserializer=_lenient(handler.request_deserializer))


class _Capture:
    """Receives what a generated ``add_*Servicer_to_server`` registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
        self.name, self.handlers = name, handlers


def add_service(server: grpc.aio.Server, add_to_server, servicer, *, gate: Gate | None = None,
                read_when_admitted: tuple[str, ...] = ()) -> None:
    """Register ``servicer`` like the generated ``add_to_server`` does, with
    unparseable requests answered INVALID_ARGUMENT and callers ``gate``
    refuses (it returns the reason) answered PERMISSION_DENIED. The unary
    methods ``read_when_admitted`` names are handed an ``Unread`` request."""
    capture = _Capture()
    add_to_server(servicer, capture)
    unknown = set(read_when_admitted) - set(capture.handlers)
    if unknown:
        raise ValueError(f"{capture.name} has no method {', '.join(sorted(unknown))}")
    handlers = {method: _guarded(handler, gate, unread=method in read_when_admitted)
                for method, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)
