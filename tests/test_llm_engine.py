"""The llama.cpp engine itself: queueing, text fidelity and stop strings (real SmolLM2)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtimes.admission import Overloaded
from runtimes.llm import DoneEvent, Event, LlmEngine, Request, Sampling, TokenEvent, find_smollm2


def test_llama_cpp_is_built_without_openmp() -> None:
    """With OpenMP each decoding thread gets its own team, and two engines in
    one daemon, once both had decoded, each ran ~2.7x slower (Makefile,
    docs/benchmarks.md). A venv set up another way shows here, not as a slow
    node. A process of its own: nothing else it loads may bring libgomp in."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see which libraries a process maps")
    probe = "import llama_cpp, pathlib; print(pathlib.Path('/proc/self/maps').read_text())"
    mapped = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "llama" in mapped and "libgomp" not in mapped, "llama-cpp-python links OpenMP: rebuild it with make setup"


@pytest.fixture(scope="module")
def engine():
    engine = LlmEngine("smollm2", find_smollm2(), slots=1, ctx_per_seq=2048, max_queue=1)
    yield engine
    engine.close()


class Collector:
    def __init__(self) -> None:
        self.tokens: list[TokenEvent] = []
        self.done = threading.Event()
        self.summary: DoneEvent | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event)
        else:
            self.summary = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


def run(engine: LlmEngine, prompt: str, sampling: Sampling, generated: list[int] | None = None) -> Collector:
    out = Collector()
    engine.submit(Request(engine.tokenize_prompt(prompt), sampling, out, generated=list(generated or [])))
    assert out.done.wait(120)
    return out


def test_queue_bound_and_cancelled_requests_give_their_place_back(engine: LlmEngine) -> None:
    running, queued = Collector(), Collector()
    long = Request(engine.tokenize_prompt("Once upon a time"), Sampling(max_tokens=1500), running)
    engine.submit(long)
    waiting = Request(engine.tokenize_prompt("Hi"), Sampling(max_tokens=4), queued)
    engine.submit(waiting)
    with pytest.raises(Overloaded):
        engine.submit(Request(engine.tokenize_prompt("Hi"), Sampling(max_tokens=4), Collector()))
    waiting.cancel()  # its queue place is free again right away
    replacement = Collector()
    engine.submit(Request(engine.tokenize_prompt("Hi"), Sampling(max_tokens=4), replacement))
    long.cancel()
    assert replacement.done.wait(120) and replacement.summary.finish_reason == "length"
    assert queued.done.wait(10) and queued.summary.finish_reason == "cancelled"
    assert running.done.wait(10) and running.summary.finish_reason == "cancelled"


def test_long_token_pieces_keep_their_text(engine: LlmEngine) -> None:
    # llama-cpp-python's own detokenizer returns b"" for pieces over 32 bytes (runs of indentation)
    longest = max(range(engine.llm.n_vocab()), key=lambda t: len(engine.piece(t)))
    assert len(engine.piece(longest)) > 32


def test_failover_at_any_token_keeps_tokens_and_text(engine: LlmEngine) -> None:
    prompt = "Emoji garden: 🌱🌟🌈🌸 and more emoji:"
    full = run(engine, prompt, Sampling(max_tokens=12))
    ids = [t.token_id for t in full.tokens]
    for k in range(1, len(ids)):
        rest = run(engine, prompt, Sampling(max_tokens=12), generated=ids[:k])
        assert [t.index for t in rest.tokens] == list(range(k, len(ids)))
        assert [t.token_id for t in rest.tokens] == ids[k:]
        assert "".join(t.text for t in full.tokens[:k]) + rest.text == full.text


def test_stop_string_inside_a_token_keeps_the_text_before_it(engine: LlmEngine) -> None:
    full = run(engine, "The three primary colors are", Sampling(max_tokens=24)).text
    stop = "ry"  # begins inside a word
    assert stop in full
    cut = run(engine, "The three primary colors are", Sampling(max_tokens=24, stop=(stop,)))
    assert cut.summary.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_logprobs_are_llama_cpp_pythons_own() -> None:
    # the reference computes them its own way, from every position's logits (logits_all)
    from llama_cpp import Llama

    reference = Llama(model_path=str(find_smollm2()), n_ctx=256, logits_all=True, verbose=False)
    expected = reference.create_completion("The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    expected = expected["choices"][0]["logprobs"]
    engine = LlmEngine("smollm2", find_smollm2(), slots=1, ctx_per_seq=256)
    try:
        ours = run(engine, "The capital of France is", Sampling(max_tokens=6, logprobs=3))
        plain = run(engine, "The capital of France is", Sampling(max_tokens=6))
    finally:
        engine.close()
    assert [t.token_id for t in ours.tokens] == [t.token_id for t in plain.tokens]
    assert all(t.logprobs is None for t in plain.tokens)
    assert [t.logprobs.logprob for t in ours.tokens] == pytest.approx(expected["token_logprobs"], abs=1e-4)
    for token, top in zip(ours.tokens, expected["top_logprobs"]):
        assert token.logprobs.top[0][0] == token.token_id  # greedy: the chosen one is the most likely
        assert {piece.decode(): lp for _, piece, lp in token.logprobs.top} == pytest.approx(top, abs=1e-4)


def chat_turn(engine: LlmEngine, messages: list[dict[str, str]], max_tokens: int = 48) -> Collector:
    out = Collector()
    engine.submit(Request(engine.tokenize_chat(messages), Sampling(max_tokens=max_tokens), out))
    assert out.done.wait(120)
    return out


def test_a_multi_turn_chat_reuses_its_history_and_answers_as_a_cold_run() -> None:
    """Each turn resends the system prompt and the history: with the prefix
    cache the engine evaluates only what is new, and every greedy answer is
    token for token the one an engine without it gives."""
    warm = LlmEngine("smollm2", find_smollm2(), slots=1, ctx_per_seq=2048, prefix_cache_bytes=64 << 20)
    cold = LlmEngine("smollm2", find_smollm2(), slots=1, ctx_per_seq=2048)
    try:
        messages = [{"role": "system", "content": "You are a patient teacher who explains science to children."}]
        for question in ("Why is the sky blue?", "And why are sunsets red?", "Can you say that in one sentence?"):
            messages.append({"role": "user", "content": question})
            with_cache, without = chat_turn(warm, messages), chat_turn(cold, messages)
            assert [t.token_id for t in with_cache.tokens] == [t.token_id for t in without.tokens]
            assert with_cache.text == without.text and without.summary.cached_tokens == 0
            messages.append({"role": "assistant", "content": with_cache.text})
        assert with_cache.summary.cached_tokens > with_cache.summary.prompt_tokens // 2  # the history came from the cache
        assert warm.prefix_cache.hits >= 2 and warm.prefix_cache.bytes <= 64 << 20
    finally:
        warm.close()
        cold.close()


class HandOffAfter(Collector):
    """Tells ``engine`` to hand off once ``tokens`` have streamed."""

    def __init__(self, engine: LlmEngine, tokens: int) -> None:
        super().__init__()
        self.engine, self.after = engine, tokens

    def __call__(self, event: Event) -> None:
        super().__call__(event)
        if isinstance(event, TokenEvent) and len(self.tokens) == self.after:
            self.engine.hand_off()


def test_a_handed_over_state_goes_on_as_the_first_engine_would_have(engine: LlmEngine) -> None:
    sampling = Sampling(max_tokens=40)
    prompt = engine.tokenize_prompt("The three primary colours are")
    reference = run(engine, "The three primary colours are", sampling)
    # another slot count than ``engine``: llama.cpp's state header counts KV streams (one per slot)
    leaving = LlmEngine("smollm2", find_smollm2(), slots=3, ctx_per_seq=512)
    try:
        first = HandOffAfter(leaving, 12)
        leaving.submit(Request(prompt, sampling, first))
        assert first.done.wait(120)
        handed = first.summary
        assert handed.finish_reason == "handoff" and handed.state
        # the state holds the prompt and at least what streamed before the last token
        assert handed.state_tokens >= len(prompt) + len(first.tokens) - 1
        late = Collector()  # a request arriving after the hand-off is handed back at once, with no state
        leaving.submit(Request(prompt, sampling, late))
        assert late.done.wait(60) and late.summary.finish_reason == "handoff" and late.summary.state is None
    finally:
        leaving.close()
    streamed = [t.token_id for t in first.tokens]
    rest = Collector()
    engine.submit(Request(prompt, sampling, rest, generated=streamed, state=handed.state,
                          state_tokens=handed.state_tokens))
    assert rest.done.wait(120)
    assert rest.summary.cached_tokens == len(prompt) + len(streamed) - 1  # only the last streamed token evaluated
    assert streamed + [t.token_id for t in rest.tokens] == [t.token_id for t in reference.tokens]
    assert first.text + rest.text == reference.text


def test_a_state_that_does_not_load_is_evaluated_from_the_tokens(engine: LlmEngine) -> None:
    sampling = Sampling(max_tokens=12)
    reference = run(engine, "Water boils at", sampling)
    out = Collector()
    engine.submit(Request(engine.tokenize_prompt("Water boils at"), sampling, out, state=b"not a llama.cpp state" * 50,
                          state_tokens=4))
    assert out.done.wait(120) and out.summary.cached_tokens == 0
    assert [t.token_id for t in out.tokens] == [t.token_id for t in reference.tokens]
