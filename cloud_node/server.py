"""CloudNode gRPC service: runs model suffixes and whole models for agents."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import psutil

from cloud_node.handoff import STATE_CHUNK_BYTES, HandedOver
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import tracing
from runtimes.admission import Admission, Overloaded, run_cancellable
from runtimes.heap import Trimmer
from runtimes.llm import DoneEvent, GenerationError, Round, RoundEvent, TokenEvent, whole_characters
from runtimes.llm_serving import (
    LlmStore,
    RoundSession,
    checked,
    operation_of,
    prompt_tokens,
    relay,
    sampling_of,
    stream,
    summary_of,
    token_chunk,
)
from runtimes.metrics import Metrics
from runtimes.model_store import ModelStore, decode_all
from runtimes.onnx_exec import OnnxModel
from runtimes.profile_book import ProfileBook
from runtimes.rpc import ModelMismatch, NotProfiled, Unread, abort_for
from runtimes.tls import caller_key

logger = logging.getLogger(__name__)

MAX_PROBE_BYTES = 16 * 1024 * 1024
MAX_DRAFT_BYTES = 4096  # one round's drafted text: far more than any useful draft


def _decode_run_encode(model: OnnxModel, tensors, reply_encoding: int, run,
                       options: ort.RunOptions) -> tuple[tuple[float, float, float, float], list[pb.Tensor]]:
    """The blocking part of a request, runs in a worker thread: its
    perf_counter marks (start, decoded, computed, encoded) and the reply's tensors."""
    start = time.perf_counter()
    feeds = decode_all(tensors)
    decoded = time.perf_counter()
    outputs = run(model, feeds, options)
    computed = time.perf_counter()
    encoded = [codec.encode(array, name, reply_encoding) for name, array in outputs.items()]
    return (start, decoded, computed, time.perf_counter()), encoded


class CloudNodeService(pb_grpc.CloudNodeServicer):
    def __init__(self, store: ModelStore, book: ProfileBook, llms: LlmStore, *, node_id: str,
                 max_concurrency: int, max_queue: int, metrics: Metrics, max_queue_per_device: int | None = None) -> None:
        self.store = store
        self.llms = llms
        self.book = book
        self.node_id = node_id
        self.trimmer = Trimmer()
        self.admission = Admission(max_concurrency=max_concurrency, max_queue=max_queue,
                                   max_queue_per_key=max_queue_per_device,
                                   on_idle=lambda: self.trimmer.when_idle(self.admission.idle))
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="cloud-compute")
        self.metrics = metrics
        self.handed_over = HandedOver()
        # Queue depths are read at each scrape, so they are exact whenever Prometheus looks.
        metrics.set_queue("onnx", lambda: self.admission.queued)
        metrics.watch_llms(llms.engines)
        psutil.cpu_percent()  # first call primes the counter

    @contextlib.contextmanager
    def _observed(self, method: str) -> Iterator[dict[str, float]]:
        """Count the enclosed request by outcome, in flight while it runs; the
        block fills in its stage times (ms)."""
        stages: dict[str, float] = {}
        outcome = "error"
        with self.metrics.in_flight():
            try:
                yield stages
                outcome = "ok"
            except Overloaded:
                outcome = "rejected"
                raise
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "cancelled"
                raise
            finally:
                self.metrics.observe_request(method, "", outcome, stages)

    def load(self) -> pb.NodeLoad:
        return pb.NodeLoad(
            in_flight=self.admission.in_flight,
            queued=self.admission.queued,
            max_concurrency=self.admission.max_concurrency,
            max_queue=self.admission.max_queue,
            queue_delay_ms=self.admission.queue_delay_ms,
            cpu_percent=psutil.cpu_percent(),
        )

    async def _compute(self, context: grpc.aio.ServicerContext, method: str, call: Unread,
                       tensors_of: Callable[[Any], Any], run: Callable[..., dict[str, np.ndarray]]) -> pb.RunReply:
        """Admit, read the request, then decode, run and encode in a worker
        thread; every failure becomes a status. ``run(request, model, feeds, options)``."""
        try:
            with tracing.serving(f"tandem.CloudNode/{method}", context.invocation_metadata()), \
                    self._observed(method) as stages:
                arrived = time.perf_counter()
                async with self.admission.slot(caller_key(context)) as waited_ms:  # devices served in turn
                    tracing.record("queue", arrived)
                    request = await call.read()  # a queued call holds its stream window, not its tensors
                    self.trimmer.took(call.size)
                    model = self.store.get(request.model)
                    if request.model_digest and request.model_digest != model.digest:
                        raise ModelMismatch(f"model {request.model}: caller has digest {request.model_digest[:12]}…, "
                                            f"this node has {model.digest[:12]}…")
                    marks, encoded = await run_cancellable(self._pool, _decode_run_encode, model, tensors_of(request),
                                                           request.reply_encoding, functools.partial(run, request))
                # each stage a span (the model's run named "cloud", as the agent's plans call it) and a reply figure
                timings = {f"{stage}_ms": tracing.record(span, start, end, model=model.name) for stage, span, start, end
                           in zip(("decode", "compute", "encode"), ("decode", "cloud", "encode"), marks, marks[1:])}
                stages.update(queue=waited_ms, compute=timings["compute_ms"])
        except Exception as exc:  # noqa: BLE001 -- mapped to a status, server stays up
            await abort_for(context, exc)
        return pb.RunReply(outputs=encoded, queue_ms=waited_ms, load=self.load(), node_id=self.node_id, **timings)

    async def RunPartition(self, call: Unread[pb.PartitionRequest], context: grpc.aio.ServicerContext) -> pb.RunReply:
        def run(request: pb.PartitionRequest, model: OnnxModel, feeds: dict[str, np.ndarray],
                options: ort.RunOptions) -> dict[str, np.ndarray]:
            edge_outputs = list(request.edge_outputs) if request.has_edge_outputs else None
            return model.run_suffix(model.find_cut(list(request.cut), edge_outputs=edge_outputs), feeds, options)

        return await self._compute(context, "RunPartition", call, lambda request: request.tensors, run)

    async def RunModel(self, call: Unread[pb.ModelRequest], context: grpc.aio.ServicerContext) -> pb.RunReply:
        def run(request: pb.ModelRequest, model: OnnxModel, feeds: dict[str, np.ndarray],
                options: ort.RunOptions) -> dict[str, np.ndarray]:
            model.check_inputs(feeds)
            return model.run(feeds, options)

        return await self._compute(context, "RunModel", call, lambda request: request.inputs, run)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        tensor_models = [self.book.model_info(self.store.get(info.name), info) for info in self.store.model_infos()]
        return pb.NodeStatus(node_id=self.node_id, models=[*tensor_models, *self.llms.model_infos()],
                             load=self.load(), llm=self.llms.loads(), skipped=self.store.skipped_infos())

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        with tracing.serving("tandem.CloudNode/Generate", context.invocation_metadata(),
                             **{"gen_ai.request.model": request.model}):
            async for chunk in relay(context, self._generate(request)):
                yield chunk

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        started = time.perf_counter()
        self.handed_over.generating += 1
        try:
            async for chunk in self._generated(request, started):
                yield chunk
        finally:
            self.handed_over.generating -= 1

    async def _generated(self, request: pb.GenerateRequest, started: float) -> AsyncIterator[pb.GenerateChunk]:
        with self._observed("Generate"):
            engine = self.llms.get(request.model)
            events = stream(engine, prompt_tokens(engine, request), sampling_of(request), request.generated_token_ids)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, TokenEvent):
                        yield token_chunk(event)
                        continue
                    if event.finish_reason == "handoff":
                        yield pb.GenerateChunk(handoff=self._hand_over(request.model, event))
                        return
                    done = checked(event)
                    # A continuation's completion count includes the tokens another side generated.
                    generated_here = done.completion_tokens - len(request.generated_token_ids)
                    summary = summary_of(done, started=started, ran=pb.PLAN_REMOTE, node=self.node_id)
                    self.metrics.observe_llm(request.model, "node", tokens=generated_here, tok_s=done.tokens_per_s,
                                             operation=operation_of(request), ttft_ms=summary.ttft_ms,
                                             total_ms=summary.total_ms)
                    yield pb.GenerateChunk(done=summary)

    async def Verify(self, steps: AsyncIterator[pb.VerifyStep], context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.VerifyReply]:
        """Check a device's drafts round by round; each reply carries this
        model's tokens for the round, so the stream is this model's greedy
        generation, however good the drafts."""
        started = time.perf_counter()
        self.handed_over.generating += 1
        session: RoundSession | None = None
        try:
            with self._observed("Verify"):
                steps = aiter(steps)
                first = await anext(steps, None)
                if first is None or not first.HasField("start"):
                    raise GenerationError("a Verify stream begins with its generation (start)")
                request = first.start
                engine = self.llms.get(request.model)
                session = RoundSession(engine, prompt_tokens(engine, request), sampling_of(request), rounds="verify")
                while True:  # the first reply is the first token; each later one answers a draft
                    reply = await self._verified(session, request, started)
                    yield reply
                    if reply.HasField("done"):
                        return
                    step = await anext(steps, None)
                    if step is None:
                        raise GenerationError("the Verify stream ended before its generation did")
                    if not step.HasField("draft") or len(step.draft) > MAX_DRAFT_BYTES:
                        raise GenerationError(f"after start a Verify stream sends drafts of at most {MAX_DRAFT_BYTES} bytes")
                    text = whole_characters(step.draft).decode("utf-8", errors="replace")
                    session.send(Round(draft=tuple(engine.tokenize_text(text))))
        except Exception as exc:  # noqa: BLE001 -- mapped to a status; the daemon stays up
            await abort_for(context, exc)
        finally:
            if session is not None:
                session.close()
            self.handed_over.generating -= 1

    async def _verified(self, session: RoundSession, request: pb.GenerateRequest, started: float) -> pb.VerifyReply:
        """The reply to one round: its streamed tokens, then how it ended."""
        reply = pb.VerifyReply()
        while True:
            event = await session.next_event()
            if isinstance(event, TokenEvent):
                reply.tokens.append(token_chunk(event).token)
            elif isinstance(event, RoundEvent):
                reply.pieces, reply.drafted, reply.accepted, reply.step_ms = (event.pieces, event.drafted, event.accepted,
                                                                              event.step_ms)
                return reply
            else:
                done = event if event.finish_reason == "handoff" else checked(event)
                reply.done.CopyFrom(summary_of(done, started=started, ran=pb.PLAN_REMOTE, node=self.node_id))
                self.metrics.observe_llm(request.model, "node", tokens=done.completion_tokens, tok_s=done.tokens_per_s,
                                         operation=operation_of(request), ttft_ms=done.ttft_ms,
                                         total_ms=reply.done.total_ms)
                return reply

    def _hand_over(self, model: str, done: DoneEvent) -> pb.Handoff:
        handle = self.handed_over.keep(done.state) if done.state else None
        if done.state and handle is None:
            logger.warning("no room to keep a %d-byte state of %s: its device will evaluate the tokens", len(done.state),
                           model)
        return pb.Handoff(handle=handle or "", completion_tokens=done.completion_tokens,
                          state_tokens=done.state_tokens if handle else 0, state_bytes=len(done.state) if handle else 0,
                          model_digest=self.llms.digests[model])

    def hand_off(self) -> None:
        """Every LLM hands its generations over: the node is shutting down."""
        for engine in self.llms.engines.values():
            engine.hand_off()

    async def FetchState(self, request: pb.StateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StateChunk]:
        if not request.take:
            self.handed_over.release(request.handle)
            return
        try:
            state = self.handed_over.take(request.handle)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        for start in range(0, len(state), STATE_CHUNK_BYTES):
            yield pb.StateChunk(data=state[start:start + STATE_CHUNK_BYTES])

    async def GetProfile(self, request: pb.ProfileRequest, context: grpc.aio.ServicerContext) -> pb.ModelProfileMsg:
        try:
            self.store.get(request.model)
            profile = self.book.default(request.model)
            if profile is None:
                raise NotProfiled(f"{request.model} has no profile on this node: {self.book.unavailable(request.model)}")
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        return pb.ModelProfileMsg(
            model=profile.model, digest=profile.digest, segment_ms=profile.segment_ms,
            run_overhead_ms=profile.run_overhead_ms, json=profile.to_json(),
        )

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeReply:
        size = max(0, min(request.reply_bytes, MAX_PROBE_BYTES))
        return pb.ProbeReply(payload=bytes(size))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.llms.close()
