"""What both daemons need to serve LLMs over gRPC: loading, request parsing,
and the bridge from the decode thread to an asyncio stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc

from partitioner.speculation import MAX_DRAFT_TOKENS
from protos import tandem_pb2 as pb
from runtimes.llm import PACKAGED_LLMS, DoneEvent, Event, GenerationError, LlmEngine, Request, Round, Sampling, TokenEvent
from runtimes.onnx_exec import file_digest
from runtimes.rpc import UnknownModel, abort_for

logger = logging.getLogger(__name__)

# Bounds on what one request may ask for, whatever the context allows.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def resolve(entry: str) -> tuple[str, Path]:
    """(name, path) of an ``--llm`` entry: a packaged model ("smollm2" for
    SmolLM2-135M-Instruct, "gemma3-270m" for Gemma 3 270M), a GGUF path
    (named by its stem) or NAME=PATH."""
    if entry in PACKAGED_LLMS:
        return entry, PACKAGED_LLMS[entry]()
    name, sep, path = entry.partition("=")
    path_obj = Path(path if sep else entry)
    if not path_obj.is_file():
        raise ValueError(f"LLM model file {path_obj} does not exist")  # the operator's to fix: exit 2
    return (name if sep else path_obj.stem), path_obj


class LlmStore:
    def __init__(self, engines: dict[str, LlmEngine]) -> None:
        self.engines = engines
        self.digests = {name: file_digest(engine.path) for name, engine in engines.items()}

    @classmethod
    def load(cls, entries: Sequence[str], *, slots: int, ctx_per_seq: int, threads: int | None, max_queue: int,
             unified_kv: bool = False, prefix_cache_bytes: int = 0, batched_verify: bool = False) -> "LlmStore":
        engines = {}
        for entry in entries:
            name, path = resolve(entry)
            engine = engines[name] = LlmEngine(name, path, slots=slots, ctx_per_seq=ctx_per_seq, threads=threads,
                                               max_queue=max_queue, unified_kv=unified_kv,
                                               prefix_cache_bytes=prefix_cache_bytes, batched_verify=batched_verify)
            engine.warm_up()
            engine.measure_verify_steps()
            logger.info("LLM %s from %s: %d slots x %d tokens; prompt %.0f tok/s, generation %.0f tok/s",
                        name, path, slots, ctx_per_seq, engine.prompt_tok_s, engine.gen_tok_s)
        return cls(engines)

    def get(self, name: str) -> LlmEngine:
        try:
            return self.engines[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; LLMs served here: {sorted(self.engines)}") from None

    def model_infos(self) -> list[pb.ModelInfo]:
        return [pb.ModelInfo(name=name, digest=self.digests[name], kind="gguf") for name in self.engines]

    def loads(self) -> list[pb.LlmLoad]:
        return [
            pb.LlmLoad(model=name, slots=e.slots, active=e.active, queued=e.queued, max_queue=e.max_queue,
                       queue_delay_ms=e.queue_delay_ms, prompt_tok_s=e.prompt_tok_s, gen_tok_s=e.gen_tok_s,
                       ctx_per_seq=e.ctx_per_seq, next_stream_tok_s=e.stream_tok_s(min(e.active + 1, e.slots)),
                       batched_steps=e.batched_steps, batched_verify=e.batched_verify, step_ms=[e.step_ms(n) for n in range(1, MAX_DRAFT_TOKENS + 2)])
            for name, e in self.engines.items()
        ]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def prompt_tokens(engine: LlmEngine, request: pb.GenerateRequest) -> list[int]:
    """The tokenized prompt, from exactly one of prompt, messages or token ids."""
    given = [bool(request.prompt), bool(request.messages), bool(request.prompt_token_ids)]
    if sum(given) != 1:
        raise GenerationError("give exactly one of prompt, messages or prompt_token_ids" if any(given) else "the prompt is empty")
    if request.prompt_token_ids:
        return list(request.prompt_token_ids)
    if request.messages:
        for message in request.messages:
            if not message.role:
                raise GenerationError("every chat message needs a role")
        return engine.tokenize_chat([{"role": m.role, "content": m.content} for m in request.messages])
    return engine.tokenize_prompt(request.prompt)


def operation_of(request: pb.GenerateRequest) -> str:
    """The request's OpenTelemetry GenAI operation name."""
    return "chat" if request.messages else "text_completion"


def sampling_of(request: pb.GenerateRequest) -> Sampling:
    if len(request.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in request.stop):
        raise GenerationError(f"stop strings: at most {MAX_STOP_STRINGS}, each 1..{MAX_STOP_LENGTH} characters")
    if request.top_logprobs and not request.logprobs:
        raise GenerationError("top_logprobs needs logprobs")
    return Sampling(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p or 1.0,
                    seed=request.seed, stop=tuple(request.stop),
                    logprobs=request.top_logprobs if request.logprobs else -1)


def _bridge(events: "asyncio.Queue[Event]") -> Callable[[Event], None]:
    """An ``emit`` for the decode thread that puts events on this loop's queue."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            pass
    return emit


async def stream(engine: LlmEngine, prompt: list[int], sampling: Sampling, generated: Sequence[int] = (), *,
                 reserved: bool = False, state: bytes | None = None, state_tokens: int = 0) -> AsyncIterator[Event]:
    """Submit a generation and yield its events as they are produced. Leaving
    the iteration early (client gone, cancelled) cancels the generation, which
    frees its slot at the next decode step. ``reserved``: its place was kept
    when it was accepted (a failover continuation), so a full queue takes it;
    ``state``: a handed-over KV state it goes on from (Request.state)."""
    events: asyncio.Queue[Event] = asyncio.Queue()
    request = Request(prompt_tokens=prompt, sampling=sampling, emit=_bridge(events), generated=list(generated),
                      reserved=reserved, state=state, state_tokens=state_tokens)
    engine.submit(request)
    finished = False
    try:
        while True:
            event = await events.get()
            yield event
            if isinstance(event, DoneEvent):
                finished = True
                return
    finally:
        if not finished:
            engine.cancel(request)


class RoundSession:
    """A round-by-round generation (Request.rounds) seen from asyncio: send
    each Round, await its RoundEvent (and, verifying, the tokens streamed
    before it). Closing it before its DoneEvent cancels the generation."""

    def __init__(self, engine: LlmEngine, prompt: list[int], sampling: Sampling, *, rounds: str,
                 draft_tokens: int = 0) -> None:
        self.engine = engine
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.request = Request(prompt_tokens=prompt, sampling=sampling, emit=_bridge(self._events), rounds=rounds,
                               draft_tokens=draft_tokens)
        self.done: DoneEvent | None = None
        engine.submit(self.request)

    def send(self, round_: Round) -> None:
        self.engine.next_round(self.request, round_)

    async def next_event(self) -> Event:
        event = await self._events.get()
        if isinstance(event, DoneEvent):
            self.done = event
        return event

    def close(self) -> None:
        if self.done is None:
            self.engine.cancel(self.request)


async def relay(context: grpc.aio.ServicerContext, chunks: AsyncIterator[pb.GenerateChunk]) -> AsyncIterator[pb.GenerateChunk]:
    """Stream ``chunks`` to the caller; a failure at any point (the first
    chunk included, where a generation is submitted) becomes its status, with
    a retry hint in the trailing metadata when the server is full."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # noqa: BLE001 -- mapped to a status; the daemon stays up
            await abort_for(context, exc)


class GenerationFailed(RuntimeError):
    """llama.cpp failed while decoding this request."""


def checked(done: DoneEvent) -> DoneEvent:
    if done.finish_reason == "error":
        raise GenerationFailed(f"generation failed: {done.error}")
    return done


def token_chunk(event: TokenEvent) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(token=pb.TokenChunk(index=event.index, token_id=event.token_id, text=event.text))
    if (logprobs := event.logprobs) is not None:
        chunk.token.logprob, chunk.token.piece = logprobs.logprob, logprobs.piece
        chunk.token.top_logprobs.extend(pb.TopLogprob(token_id=t, piece=piece, logprob=lp) for t, piece, lp in logprobs.top)
    return chunk


def summary_of(done: DoneEvent, *, started: float, ran: int, node: str = "") -> pb.GenerateSummary:
    return pb.GenerateSummary(
        finish_reason=done.finish_reason, prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
        ttft_ms=done.ttft_ms, tokens_per_s=done.tokens_per_s, ran=ran, node=node, queue_ms=done.queue_ms,
        total_ms=(time.perf_counter() - started) * 1e3,
    )
