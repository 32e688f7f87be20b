"""Python SDK for apps: ``EdgeClient`` (blocking) and ``AsyncEdgeClient`` (asyncio).

    with EdgeClient("127.0.0.1:50051") as client:
        result = client.infer("mobilenet", {"input": x})
        result.outputs["logits"], result.plan, result.measured["total_ms"]

Server errors arrive as typed exceptions (``InvalidArgument``, ``NotFound``,
...) carrying the server's message. ``EdgeClient(..., shared_memory=True)``
passes tensors through POSIX shared memory instead of the socket, for apps
on the agent's own board.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.experimental  # ChannelOptions.SingleThreadedUnaryStream
import numpy as np

from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.shared_memory import OwnedRegion
from runtimes.tracing import outgoing  # the app's current span as W3C traceparent metadata

logger = logging.getLogger(__name__)

OBJECTIVES = {None: pb.OBJECTIVE_UNSPECIFIED, "latency": pb.OBJECTIVE_LATENCY, "energy": pb.OBJECTIVE_ENERGY, "weighted": pb.OBJECTIVE_WEIGHTED}
ENCODINGS = {None: pb.ENCODING_UNSPECIFIED, **codec.ENCODING_BY_NAME}
STAGES = ("edge_ms", "encode_ms", "network_ms", "cloud_ms", "decode_ms", "total_ms")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class TandemError(Exception):
    """A call to the agent failed; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(TandemError): ...
class NotFound(TandemError): ...
class ResourceExhausted(TandemError): ...
class Unavailable(TandemError): ...
class DeadlineExceeded(TandemError): ...
class FailedPrecondition(TandemError): ...


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def _typed(exc: grpc.RpcError) -> TandemError:
    code = exc.code()
    return _ERRORS.get(code, TandemError)(code, exc.details() or "")


@contextlib.contextmanager
def _agent_errors() -> Iterator[None]:
    """gRPC failures as the SDK's typed errors (sync and async calls alike)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _typed(exc) from None


def _skipped(reply: pb.ModelList) -> dict[str, str]:
    return {entry.file: entry.reason for entry in reply.skipped}


def _encoding_name(encoding: int) -> str:
    return pb.Encoding.Name(encoding).removeprefix("ENCODING_").lower().replace("unspecified", "raw")


def _stages(message: pb.StageTimes) -> dict[str, float]:
    return {name: getattr(message, name) for name in STAGES}


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    plan: str                      # what ran: "local", "remote", "split:<k>"
    planned: str                   # what the agent chose before running
    predicted: dict[str, float]    # stage -> ms, as the partitioner predicted for `planned`
    measured: dict[str, float]     # stage -> ms, as it happened; also "plan_ms", the agent choosing the plan
    predicted_energy_j: float
    fell_back: bool
    fallback_reason: str
    node: str
    constraints_met: bool
    reason: str
    encodings: dict[str, str] = field(default_factory=dict)  # tensor sent to the node -> codec applied ("raw", "fp16", "int8")
    output_error: float = 0.0      # measured output error of the plan's codec at its cut (relative to each output's range)
    cut: tuple[str, ...] = ()      # SPLIT: the tensors that crossed

    @classmethod
    def from_reply(cls, reply: pb.InferReply, read_shared: Callable[[pb.Tensor], np.ndarray] | None = None
                   ) -> "InferResult":
        return cls(
            outputs={t.name: codec.decode(t, read_shared(t) if read_shared and t.HasField("shared") else None)
                     for t in reply.outputs},
            plan=reply.plan.label, planned=reply.planned.label,
            predicted=_stages(reply.predicted), measured=_stages(reply.measured) | {"plan_ms": reply.measured.plan_ms},
            predicted_energy_j=reply.predicted_energy_j, fell_back=reply.fell_back,
            fallback_reason=reply.fallback_reason, node=reply.node,
            constraints_met=reply.constraints_met, reason=reply.reason,
            encodings={e.tensor: _encoding_name(e.encoding) for e in reply.plan.tensor_encodings},
            output_error=reply.plan.output_error, cut=tuple(reply.plan.cut),
        )


@dataclass(frozen=True)
class CandidateView:
    plan: str
    node: str
    predicted: dict[str, float]
    energy_j: float
    score: float
    feasible: bool
    violations: tuple[str, ...]
    uplink_bytes: float
    ttft_ms: float          # LLMs: predicted time to first token
    output_error: float = 0.0  # measured output error its codec adds (0: lossless)
    draft_tokens: int = 0      # LLMs, plan speculative: tokens the device drafts a round


@dataclass(frozen=True)
class NodeView:
    address: str
    kind: str               # tandem (a cloud-node) or oip (Triton, KServe, MLServer)
    planned: bool           # its plans are among the candidates
    note: str               # why not, or where its compute, queue and link figures came from
    cuts: tuple[int, ...]   # the chain cuts it runs (0: the whole model); empty: any


@dataclass(frozen=True)
class Explanation:
    model: str
    winner: str
    winner_node: str
    feasible: bool
    why: str
    candidates: tuple[CandidateView, ...]
    link: dict[str, float]
    device: str
    current: str = ""            # the plan requests run now
    hysteresis_margin: float = 0.0
    would_switch: bool = False
    calibration: dict[str, float] = field(default_factory=dict)  # edge_factor, offload_ms, samples, request_ms
    power: dict[str, float | str] = field(default_factory=dict)  # idle_w, active_w, source
    plans_unavailable: str = ""  # why only LOCAL can run (the model could not be profiled yet)
    profile_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input shapes planned for
    profile_source: str = ""     # "measured at this shape", or how the figures were rescaled and from what
    nodes: tuple[NodeView, ...] = ()  # every node in the agent's table, for this model
    connectivity: str = ""       # online, degraded or offline: the cloud as the agent sees it
    connectivity_reason: str = ""
    deferred_pending: int = 0    # deferred requests waiting for a node
    deferred_oldest_age_s: float = 0.0
    tier: str = ""               # asked by tier: "device", "cloud" or "auto"
    threshold: float = 0.0       # tier auto: the calibrated probability below which the cloud model answers
    confidence_tokens: int = 0   # ... judged on the device's first this many tokens

    @classmethod
    def from_message(cls, m: pb.Explanation) -> "Explanation":
        return cls(
            model=m.model, winner=m.winner.label, winner_node=m.winner.node, feasible=m.feasible, why=m.why,
            candidates=tuple(
                CandidateView(c.plan.label, c.plan.node, _stages(c.predicted), c.energy_j, c.score, c.feasible,
                              tuple(c.violations), c.uplink_bytes, c.ttft_ms, c.plan.output_error, c.draft_tokens)
                for c in m.candidates
            ),
            link={"uplink_mbps": m.link.uplink_mbps, "downlink_mbps": m.link.downlink_mbps, "rtt_ms": m.link.rtt_ms},
            device=m.device, current=m.current.label, hysteresis_margin=m.hysteresis_margin, would_switch=m.would_switch,
            calibration={"edge_factor": m.calibration.edge_factor, "offload_ms": m.calibration.offload_ms,
                         "samples": m.calibration.samples, "request_ms": m.calibration.request_ms},
            power={"idle_w": m.power.idle_w, "active_w": m.power.active_w, "source": m.power.source},
            plans_unavailable=m.plans_unavailable,
            profile_shapes={spec.name: tuple(spec.shape) for spec in m.profile.inputs}, profile_source=m.profile.source,
            nodes=tuple(NodeView(n.address, n.kind, n.planned, n.note, tuple(n.cuts)) for n in m.nodes),
            connectivity=m.connectivity, connectivity_reason=m.connectivity_reason,
            deferred_pending=m.deferred_pending, deferred_oldest_age_s=m.deferred_oldest_age_s,
            tier=m.tier, threshold=m.threshold, confidence_tokens=m.confidence_tokens,
        )

    def candidate(self, plan: str) -> CandidateView:
        return next(c for c in self.candidates if c.plan == plan)


def _infer_request(model: str, inputs: dict[str, Any], objective: str | None, plan: str | None, encoding: str | None,
                   tensors: list[pb.Tensor] | None = None) -> pb.InferRequest:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of latency, energy, weighted; got {objective!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of raw, fp16, int8; got {encoding!r}")
    if tensors is None:
        tensors = [codec.encode(np.asarray(value), name) for name, value in inputs.items()]
    return pb.InferRequest(model=model, inputs=tensors, objective=OBJECTIVES[objective], plan=plan or "",
                           encoding=ENCODINGS[encoding])


ALIGNMENT = 64  # each tensor's start in a region, as the agent aligns outputs (server.SHARED_ALIGNMENT)
FIRST_OUTPUT_BYTES = 1 << 20  # the output region before a reply shows what the model gives


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


class _CallRegions:
    """One call's inputs and outputs in shared memory: two regions this
    process owns and the agent has registered, each grown (a new region) when
    a request needs more than it holds."""

    def __init__(self, register: Callable[[OwnedRegion], None], unregister: Callable[[OwnedRegion], None]) -> None:
        self._register, self._unregister = register, unregister
        self.inputs: OwnedRegion | None = None
        self.outputs: OwnedRegion | None = None
        self.output_bytes = FIRST_OUTPUT_BYTES

    def _sized(self, region: OwnedRegion | None, size: int) -> OwnedRegion:
        if region is not None and region.byte_size >= size:
            return region
        if region is not None:
            self._unregister(region)
            region.close()
        fresh = OwnedRegion(f"tandem-sdk-{os.getpid()}-{secrets.token_hex(6)}", max(size, 4096))
        try:
            self._register(fresh)
        except BaseException:
            fresh.close()
            raise
        return fresh

    def request(self, inputs: dict[str, Any]) -> tuple[list[pb.Tensor], pb.SharedBytes]:
        """The inputs written into the input region, and the output region to offer."""
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        starts, end = {}, 0
        for name, array in arrays.items():
            starts[name] = _aligned(end)
            end = starts[name] + array.nbytes
        self.inputs = self._sized(self.inputs, end)
        self.outputs = self._sized(self.outputs, self.output_bytes)
        tensors = []
        for name, array in arrays.items():
            self.inputs.write(starts[name], array)
            tensors.append(pb.Tensor(name=name, dtype=codec.dtype_to_pb(array.dtype), shape=array.shape,
                                     encoding=pb.ENCODING_RAW, shared=pb.SharedBytes(
                                         region=self.inputs.key, offset=starts[name], byte_size=array.nbytes)))
        return tensors, pb.SharedBytes(region=self.outputs.key, offset=0, byte_size=self.outputs.byte_size)

    def read(self, tensor: pb.Tensor) -> np.ndarray:
        if tensor.shared.region != self.outputs.key:
            raise codec.CodecError(f"output {tensor.name!r} names region {tensor.shared.region!r}, not this call's")
        if tensor.shared.offset + tensor.shared.byte_size > self.outputs.byte_size:
            raise codec.CodecError(f"output {tensor.name!r} lies beyond this call's output region")
        return self.outputs.read(tensor.shared.offset, tensor.shared.byte_size)

    def fit(self, reply: pb.InferReply) -> None:
        """Room for every output next time, if some came inline for want of it."""
        if any(not t.HasField("shared") for t in reply.outputs):
            self.output_bytes = sum(_aligned(len(t.payload) or t.shared.byte_size) for t in reply.outputs)

    def close(self) -> None:
        for region in (self.inputs, self.outputs):
            if region is not None:
                with contextlib.suppress(grpc.RpcError):
                    self._unregister(region)
                region.close()


class _SharedMemory:
    """The client's shared-memory regions: a pair per call in flight, kept
    for the next call. Registered with the agent over OIP's
    SystemSharedMemoryRegister on the client's own channel."""

    def __init__(self, channel: grpc.Channel, timeout: float | None) -> None:
        from tritonclient.grpc import service_pb2 as oip  # the agent's OIP messages (see edge_agent.oip)
        from tritonclient.grpc import service_pb2_grpc as oip_grpc

        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        self._register = lambda region: stub.SystemSharedMemoryRegister(oip.SystemSharedMemoryRegisterRequest(
            name=region.key, key=region.key, offset=0, byte_size=region.byte_size), timeout=timeout)
        self._unregister = lambda region: stub.SystemSharedMemoryUnregister(
            oip.SystemSharedMemoryUnregisterRequest(name=region.key), timeout=timeout)
        self._idle: list[_CallRegions] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def call(self) -> Iterator[_CallRegions]:
        with self._lock:
            regions = self._idle.pop() if self._idle else _CallRegions(self._register, self._unregister)
        try:
            yield regions
        except BaseException:
            regions.close()  # a failed call's regions may be half set up: never reused
            raise
        with self._lock:
            self._idle.append(regions)

    def close(self) -> None:
        with self._lock:
            for regions in self._idle:
                regions.close()
            self._idle.clear()


def _explain_request(model: str, objective: str | None, link: dict[str, float] | None, encoding: str | None,
                     prompt_tokens: int, max_tokens: int,
                     input_shapes: dict[str, tuple[int, ...]] | None = None, tier: str = "") -> pb.ExplainRequest:
    request = pb.ExplainRequest(model=model, objective=OBJECTIVES[objective], encoding=ENCODINGS[encoding], tier=tier,
                                prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                input_shapes=[pb.TensorSpec(name=n, shape=list(s)) for n, s in (input_shapes or {}).items()])
    if link is not None:
        request.link.CopyFrom(pb.LinkOverride(**link))
    return request


@dataclass(frozen=True)
class Token:
    index: int          # position in the completion
    token_id: int
    text: str           # "" while a multi-byte character is incomplete


@dataclass(frozen=True)
class GenerationSummary:
    finish_reason: str  # stop, length, cancelled, error
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float
    ran: str            # where the last token came from: "local", "remote" or "speculative" (drafted here, checked there)
    node: str
    switched: bool      # the stream moved from the cloud to the device
    switched_at_token: int
    switch_reason: str
    queue_ms: float
    total_ms: float
    planned: str
    reason: str
    predicted_ttft_ms: float
    predicted_total_ms: float
    predicted_energy_j: float
    resumed_state_bytes: int = 0  # after a node handed over: its KV state the device went on from (0: evaluated)
    model: str = ""               # the model that answered
    tier: str = ""                # as asked
    confidence: float = 0.0       # tier auto: the device's mean log-probability over its first tokens
    confidence_probability: float = 0.0  # ... calibrated: the chance its answer is right
    threshold: float = 0.0        # ... below which the cloud model answers
    escalated: bool = False       # ... and whether it did
    draft_rounds: int = 0         # speculative: rounds of drafts the node checked
    drafted_tokens: int = 0       # ... their tokens, in the node's vocabulary
    accepted_tokens: int = 0      # ... those that stood

    @classmethod
    def from_message(cls, m: pb.GenerateSummary) -> "GenerationSummary":
        labels = {pb.PLAN_LOCAL: "local", pb.PLAN_REMOTE: "remote", pb.PLAN_SPLIT: "speculative"}
        return cls(
            m.finish_reason, m.prompt_tokens, m.completion_tokens, m.ttft_ms, m.tokens_per_s, labels.get(m.ran, ""),
            m.node, m.switched, m.switched_at_token, m.switch_reason, m.queue_ms, m.total_ms, labels.get(m.planned, ""),
            m.reason, m.predicted_ttft_ms, m.predicted_total_ms, m.predicted_energy_j, m.resumed_state_bytes,
            m.model, m.tier, m.confidence, m.confidence_probability, m.threshold, m.escalated,
            m.draft_rounds, m.drafted_tokens, m.accepted_tokens,
        )


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    summary: GenerationSummary


@dataclass(frozen=True)
class Deferral:
    """A deferred request the agent has stored: fetch its result by ``id``."""

    id: str
    created: bool   # False: its idempotency key was submitted before, and this is that request
    state: str      # queued, delivering, done, failed


@dataclass(frozen=True)
class DeferredResult:
    id: str
    state: str                       # queued, delivering, done, failed
    infer: InferResult | None        # a done tensor request's reply
    completion: Completion | None    # a done generation's text and usage
    error_code: str                  # a failed one's gRPC status name (DEADLINE_EXCEEDED, ...)
    error: str
    attempts: int                    # deliveries started

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed")

    @classmethod
    def from_message(cls, m: pb.DeferredResult) -> "DeferredResult":
        kind = m.WhichOneof("result")
        completion = None
        if kind == "generate":
            g = m.generate
            completion = Completion(g.text, tuple(g.token_ids), GenerationSummary.from_message(g.summary))
        return cls(m.id, m.state, InferResult.from_reply(m.infer) if kind == "infer" else None, completion,
                   m.error_code, m.error, m.attempts)


def _defer_request(request: pb.InferRequest | pb.GenerateRequest, deliver_by: float | datetime.datetime | None,
                   idempotency_key: str | None) -> pb.DeferRequest:
    if deliver_by is None:
        raise ValueError("a deferred request needs deliver_by: when it must have run (a datetime or a unix time)")
    when = deliver_by.timestamp() if isinstance(deliver_by, datetime.datetime) else float(deliver_by)
    kind = "infer" if isinstance(request, pb.InferRequest) else "generate"
    return pb.DeferRequest(**{kind: request}, deliver_by_unix_s=when, idempotency_key=idempotency_key or uuid.uuid4().hex)


def _generate_request_of(prompt: str | None, kwargs: dict[str, Any]) -> pb.GenerateRequest:
    """generate()'s keyword arguments as the request it would send, for a deferred one."""
    unknown = set(kwargs) - {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "objective", "plan",
                             "tier"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments for a deferred generation: {sorted(unknown)}")
    return _generate_request(prompt, kwargs.get("model"), kwargs.get("messages"), kwargs.get("max_tokens", 64),
                             kwargs.get("temperature", 0.0), kwargs.get("top_p", 1.0), kwargs.get("seed", 0),
                             kwargs.get("stop", ()), kwargs.get("objective"), kwargs.get("plan"), kwargs.get("tier"))


def _chunk(message: pb.GenerateChunk) -> Token | GenerationSummary:
    if message.HasField("token"):
        return Token(message.token.index, message.token.token_id, message.token.text)
    return GenerationSummary.from_message(message.done)


def _generate_request(prompt: str | None, model: str | None, messages: list[dict[str, str]] | None, max_tokens: int,
                      temperature: float, top_p: float, seed: int, stop: list[str] | tuple[str, ...],
                      objective: str | None, plan: str | None, tier: str | None = None) -> pb.GenerateRequest:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of latency, energy, weighted; got {objective!r}")
    return pb.GenerateRequest(
        model=model or "", prompt=prompt or "",
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []],
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop),
        objective=OBJECTIVES[objective], plan=plan or "", tier=tier or "",
    )


def _collect(chunks) -> Completion:
    tokens = [c for c in chunks if isinstance(c, Token)]
    summary = next(c for c in chunks if isinstance(c, GenerationSummary))
    return Completion("".join(t.text for t in tokens), tuple(t.token_id for t in tokens), summary)


_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# A blocking stream read on the caller's own thread, not handed over from the
# channel's polling thread: a token then costs this client 0.33 instead of
# 0.42 ms of CPU, taken from the cores the device's model decodes on
# (docs/benchmarks.md, "Where single-stream LOCAL loses").
_BLOCKING_OPTIONS = [*_OPTIONS, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]


class EdgeClient:
    """Blocking client; ``deadline`` is seconds for one call. With
    ``shared_memory`` tensors go through POSIX shared memory the agent maps
    (it must run on this board, able to open the app's files in /dev/shm); if
    the agent refuses the regions, the client says so once and uses the socket."""

    def __init__(self, address: str, *, timeout: float | None = 30.0, shared_memory: bool = False) -> None:
        self._channel = grpc.insecure_channel(address, options=_BLOCKING_OPTIONS)
        self._stub = pb_grpc.EdgeAgentStub(self._channel)
        self.timeout = timeout
        self._shared = _SharedMemory(self._channel, timeout) if shared_memory else None

    def infer(self, model: str, inputs: dict[str, Any], *, objective: str | None = None, plan: str | None = None,
              encoding: str | None = None, deadline: float | None = None, defer: bool = False,
              deliver_by: float | datetime.datetime | None = None, idempotency_key: str | None = None
              ) -> InferResult | Deferral:
        """Run ``model`` now; or with ``defer``, have the agent store it and run
        it when a node can take it, by ``deliver_by``: the Deferral's id then
        fetches the result (``result``). The same ``idempotency_key`` twice is
        one request (default: a new key each call)."""
        if defer:
            return self._defer(_infer_request(model, inputs, objective, plan, encoding), deliver_by, idempotency_key)
        if self._shared is not None:
            try:
                with self._shared.call() as regions:
                    tensors, output_region = regions.request(inputs)
                    request = _infer_request(model, inputs, objective, plan, encoding, tensors)
                    request.output_region.CopyFrom(output_region)
                    with _agent_errors():
                        reply = self._stub.Infer(request, timeout=deadline or self.timeout, metadata=outgoing())
                    regions.fit(reply)
                    return InferResult.from_reply(reply, regions.read)
            except (grpc.RpcError, OSError) as exc:  # registering failed: the agent cannot map this process's memory
                logger.warning("shared memory unavailable (%s); tensors go through the socket", exc)
                self._shared.close()
                self._shared = None
        request = _infer_request(model, inputs, objective, plan, encoding)
        with _agent_errors():
            return InferResult.from_reply(self._stub.Infer(request, timeout=deadline or self.timeout, metadata=outgoing()))

    def explain(self, model: str = "", *, objective: str | None = None, link: dict[str, float] | None = None,
                encoding: str | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                input_shapes: dict[str, tuple[int, ...]] | None = None, tier: str = "") -> Explanation:
        """Candidates with predicted latency and energy; ``link`` plans for
        {"uplink_mbps", "downlink_mbps", "rtt_ms"} instead of the measured link;
        ``input_shapes`` for inputs of these shapes (default: the first profiled).
        For an LLM, ``prompt_tokens`` and ``max_tokens`` describe the generation,
        and ``tier`` may stand for the model (generate's tiers)."""
        request = _explain_request(model, objective, link, encoding, prompt_tokens, max_tokens, input_shapes, tier)
        with _agent_errors():
            return Explanation.from_message(self._stub.Explain(request, timeout=self.timeout, metadata=outgoing()))

    def models(self) -> list[pb.ModelInfo]:
        with _agent_errors():
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def skipped_models(self) -> dict[str, str]:
        """Files in the agent's models directory it does not serve: file name -> why."""
        with _agent_errors():
            return _skipped(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout))

    def generate(self, prompt: str | None = None, *, model: str | None = None, messages: list[dict[str, str]] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop: list[str] | tuple[str, ...] = (), objective: str | None = None, plan: str | None = None,
                 deadline: float | None = None, tier: str | None = None) -> Iterator[Token | GenerationSummary]:
        """Stream a generation: ``Token`` chunks, then one ``GenerationSummary``.
        ``model`` may be left out when the agent has a single LLM; ``tier``
        ("device", "cloud" or "auto") instead of a model lets the agent choose
        by tier (the summary's ``model`` says which answered)."""
        request = _generate_request(prompt, model, messages, max_tokens, temperature, top_p, seed, stop, objective, plan,
                                    tier)
        call = self._stub.Generate(request, timeout=deadline, metadata=outgoing())
        try:
            with _agent_errors():
                for message in call:
                    yield _chunk(message)
        finally:
            call.cancel()  # a caller that stops iterating frees its slot on the agent

    def generate_text(self, prompt: str | None = None, *, defer: bool = False,
                      deliver_by: float | datetime.datetime | None = None, idempotency_key: str | None = None,
                      **kwargs: Any) -> Completion | Deferral:
        """The whole generation at once; with ``defer``, stored and run when a
        node can take it (as ``infer``'s), its text and usage kept."""
        if defer:
            return self._defer(_generate_request_of(prompt, kwargs), deliver_by, idempotency_key)
        return _collect(list(self.generate(prompt, **kwargs)))

    def _defer(self, request: pb.InferRequest | pb.GenerateRequest, deliver_by, idempotency_key: str | None) -> Deferral:
        with _agent_errors():
            reply = self._stub.Defer(_defer_request(request, deliver_by, idempotency_key), timeout=self.timeout)
        return Deferral(reply.id, reply.created, reply.state)

    def result(self, request_id: str, *, wait: float = 0.0) -> DeferredResult:
        """A deferred request's state, and its result once it has one; ``wait``
        seconds for it to end first (the agent waits at most 300)."""
        with _agent_errors():
            return DeferredResult.from_message(self._stub.Result(pb.ResultRequest(id=request_id, wait_s=wait),
                                                                 timeout=wait + (self.timeout or 30.0)))

    def results(self, request_ids: list[str] | tuple[str, ...] = (), *, deadline: float | None = None
                ) -> Iterator[DeferredResult]:
        """Each request's result as it ends (every pending one when none are named)."""
        call = self._stub.Results(pb.ResultsRequest(ids=list(request_ids)), timeout=deadline)
        try:
            with _agent_errors():
                for message in call:
                    yield DeferredResult.from_message(message)
        finally:
            call.cancel()

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self._channel.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEdgeClient:
    """The asyncio twin of ``EdgeClient``."""

    def __init__(self, address: str, *, timeout: float | None = 30.0) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._stub = pb_grpc.EdgeAgentStub(self._channel)
        self.timeout = timeout

    async def infer(self, model: str, inputs: dict[str, Any], *, objective: str | None = None, plan: str | None = None,
                    encoding: str | None = None, deadline: float | None = None, defer: bool = False,
                    deliver_by: float | datetime.datetime | None = None, idempotency_key: str | None = None
                    ) -> InferResult | Deferral:
        request = _infer_request(model, inputs, objective, plan, encoding)
        if defer:
            return await self._defer(request, deliver_by, idempotency_key)
        with _agent_errors():
            return InferResult.from_reply(await self._stub.Infer(request, timeout=deadline or self.timeout, metadata=outgoing()))

    async def explain(self, model: str = "", *, objective: str | None = None, link: dict[str, float] | None = None,
                      encoding: str | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                      input_shapes: dict[str, tuple[int, ...]] | None = None, tier: str = "") -> Explanation:
        request = _explain_request(model, objective, link, encoding, prompt_tokens, max_tokens, input_shapes, tier)
        with _agent_errors():
            return Explanation.from_message(await self._stub.Explain(request, timeout=self.timeout, metadata=outgoing()))

    async def models(self) -> list[pb.ModelInfo]:
        with _agent_errors():
            return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)).models)

    async def skipped_models(self) -> dict[str, str]:
        with _agent_errors():
            return _skipped(await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout))

    async def generate(self, prompt: str | None = None, *, model: str | None = None,
                       messages: list[dict[str, str]] | None = None, max_tokens: int = 64, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0, stop: list[str] | tuple[str, ...] = (),
                       objective: str | None = None, plan: str | None = None,
                       deadline: float | None = None, tier: str | None = None) -> AsyncIterator[Token | GenerationSummary]:
        request = _generate_request(prompt, model, messages, max_tokens, temperature, top_p, seed, stop, objective, plan,
                                    tier)
        call = self._stub.Generate(request, timeout=deadline, metadata=outgoing())
        try:
            with _agent_errors():
                async for message in call:
                    yield _chunk(message)
        finally:
            call.cancel()

    async def generate_text(self, prompt: str | None = None, *, defer: bool = False,
                            deliver_by: float | datetime.datetime | None = None, idempotency_key: str | None = None,
                            **kwargs: Any) -> Completion | Deferral:
        if defer:
            return await self._defer(_generate_request_of(prompt, kwargs), deliver_by, idempotency_key)
        return _collect([chunk async for chunk in self.generate(prompt, **kwargs)])

    async def _defer(self, request: pb.InferRequest | pb.GenerateRequest, deliver_by, idempotency_key: str | None
                     ) -> Deferral:
        with _agent_errors():
            reply = await self._stub.Defer(_defer_request(request, deliver_by, idempotency_key), timeout=self.timeout)
        return Deferral(reply.id, reply.created, reply.state)

    async def result(self, request_id: str, *, wait: float = 0.0) -> DeferredResult:
        with _agent_errors():
            return DeferredResult.from_message(await self._stub.Result(
                pb.ResultRequest(id=request_id, wait_s=wait), timeout=wait + (self.timeout or 30.0)))

    async def results(self, request_ids: list[str] | tuple[str, ...] = (), *, deadline: float | None = None
                      ) -> AsyncIterator[DeferredResult]:
        call = self._stub.Results(pb.ResultsRequest(ids=list(request_ids)), timeout=deadline)
        try:
            with _agent_errors():
                async for message in call:
                    yield DeferredResult.from_message(message)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncEdgeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
