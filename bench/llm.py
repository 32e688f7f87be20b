"""LLM path: Tandem against bare llama-cpp-python and against itself under load.

    python -m bench.llm [--tokens 128] [--only local|prefix|handoff|quality|ceiling|speculative] [--json bench/results/llm.json]

Side by side in one run, on the packaged SmolLM2 GGUF:
  1. generation tokens/s: bare ``Llama.generate`` vs the agent's LOCAL plan through the SDK;
  2. the same LOCAL generation streamed through the agent's OpenAI-compatible HTTP API with the
     official ``openai`` client (SSE) vs the SDK: what the HTTP frontend adds per token;
  3. streaming through the agent (REMOTE over loopback) vs the cloud node called directly:
     time between tokens and time to first token, as the client sees them;
  4. cloud-node aggregate tokens/s at 1, 2, 4, 8 concurrent streams vs 8 requests one after
     another, with time to first token under that load;
  5. a multi-turn chat (system prompt and history resent every turn): time to first token per
     turn, an engine without the prefix cache against one with it (``--only prefix`` runs this alone);
  6. a node shutting down mid-generation (SIGTERM after HANDOFF_AT tokens of a long prompt): the
     gap the app sees before the device's first token, when the agent fetches the node's KV state
     (loopback) against when it evaluates the tokens (an agent told the link is 0.05 Mbit/s),
     each on a fresh node and prompt (``--only handoff`` runs this alone);
  7. two tiers: the device's SmolLM2-135M and the cloud's Gemma 3 270M on the labelled set of
     offload_tune.quality_tasks (greedy, in-process engines): accuracy of each, how well the
     device's confidence ranks its own answers (AUROC), and on the test split the accuracy of
     routing by the threshold calibrated on the other split, with the cloud calls it saves
     (``--only quality`` runs this alone);
  8. the ceiling: llama.cpp's own batched decode at 1, 2, 4 and 8 sequences through the low-level
     API with nothing of ours in the loop, beside the node's aggregate at as many streams, for
     both KV layouts (``--only ceiling`` runs this alone);
  9. draft-and-verify: the device's SmolLM2 drafts, a node's Gemma 3 270M checks, through a relay
     adding 5, 20, 80 and 200 ms of RTT, agent on core 0 and node on core 1: per-stream tokens/s
     against cloud-only (REMOTE) on the same link, acceptance, the adaptive draft length against
     fixed ones, and the node's CPU time per token, from which its capacity follows
     (``--only speculative`` runs this alone);
 10. where single-stream LOCAL loses against bare: the engine alone (asyncio, no gRPC) beside
     the agent through the SDK, the CPU per token of the agent and of the client, and two engines of
     one process taking turns (``--only local``; not part of the whole run, whose item 1 compares LOCAL).
Greedy decoding throughout, so every configuration generates the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import llama_cpp
import openai
import psutil
from llama_cpp import Llama
from rich.console import Console
from rich.table import Table

from edge_agent.sdk import EdgeClient, Token
from emulation.relay import Relay
from offload_tune.quality import calibrate, measure
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from runtimes.kv_cache import PrefixCache
from runtimes.llm import PACKAGED_LLMS, DoneEvent, LlmEngine, Sampling, find_smollm2
from runtimes.llm_serving import stream
from runtimes.peers import free_port

PREFIX_CACHE_BYTES = 64 << 20  # the agent's default llm_prefix_cache_mb
PROMPT = "Write a long story about a robot who learns to paint. Once upon a time"
REPEATS = 5  # single streams on 2 shared cores vary by about 1 ms per token run to run
OPENAI_LOCAL = "agent LOCAL (OpenAI SSE, openai client)"


def timed_stream(chunks) -> dict:
    """Arrival times of a token stream: ttft and the mean gap between tokens."""
    start = time.perf_counter()
    return stream_times(start, [time.perf_counter() for _ in chunks])


def stream_times(start: float, arrivals: list[float]) -> dict:
    tokens = len(arrivals)
    gaps_ms = (arrivals[-1] - arrivals[0]) / (tokens - 1) * 1e3 if tokens > 1 else 0.0
    return {"tokens": tokens, "ttft_ms": (arrivals[0] - start) * 1e3, "gap_ms": gaps_ms,
            "tok_s": (tokens - 1) / (arrivals[-1] - arrivals[0]) if tokens > 1 else 0.0}


def bare_stream(llm: Llama, tokens: int):
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    for count, _ in enumerate(llm.generate(prompt, temp=0.0, repeat_penalty=1.0), start=1):
        yield _
        if count == tokens:
            break
    llm.reset()


def agent_stream(client: EdgeClient, tokens: int, plan: str):
    for chunk in client.generate(PROMPT, model="smollm2", max_tokens=tokens, plan=plan):
        if isinstance(chunk, Token):
            yield chunk


def openai_stream(client: openai.OpenAI, tokens: int, plan: str):
    """One item per SSE chunk that carries text: a token, unless its character is still incomplete."""
    stream = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
                                       extra_body={"tandem": {"plan": plan}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            yield chunk


def node_stream(stub: pb_grpc.CloudNodeStub, tokens: int, prompt: str = PROMPT):
    for chunk in stub.Generate(pb.GenerateRequest(model="smollm2", prompt=prompt, max_tokens=tokens), timeout=600):
        if chunk.HasField("token"):
            yield chunk


HANDOFF_AT = 32
HANDOFF_PROMPT = ("Here are the notes from the field trip, which the class wrote together. " * 60
                  + "Summarise the notes in one paragraph:")
SLOW_LINK = ("--uplink-mbps", "0.05", "--downlink-mbps", "0.05", "--rtt-ms", "50")


def wait_for_node(client: EdgeClient, within_s: float = 120.0) -> None:
    """Until the agent plans the LLM on a node (it probes every 0.5 s here)."""
    for _ in range(int(within_s / 0.2)):
        if any(c.node for c in client.explain("smollm2", prompt_tokens=64, max_tokens=64).candidates):
            return
        time.sleep(0.2)
    raise TimeoutError("the agent never saw the node")


def handed_over_stream(models: Path, port: int, agent: EdgeClient, prompt: str, tokens: int) -> dict:
    """One generation whose node (on ``port``) is told to shut down after
    HANDOFF_AT tokens: the gap before the device's first token, and what the summary said."""
    with launch.cloud_node(models, "--listen", f"127.0.0.1:{port}", "--llm", "smollm2", "--grace-s", "60") as node:
        wait_for_node(agent)
        arrivals, summary = [], None
        for chunk in agent.generate(prompt, model="smollm2", max_tokens=tokens, plan="remote"):
            if isinstance(chunk, Token):
                arrivals.append(time.perf_counter())
                if len(arrivals) == HANDOFF_AT:
                    node.process.send_signal(signal.SIGTERM)
            else:
                summary = chunk
    at = summary.switched_at_token  # the node sent a few more tokens before it saw the signal
    return {"gap_ms": (arrivals[at] - arrivals[at - 1]) * 1e3, "switched_at": at, "tokens": len(arrivals),
            "prompt_tokens": summary.prompt_tokens, "state_bytes": summary.resumed_state_bytes,
            "why": summary.switch_reason}


def handoff(tokens: int, repeats: int = 3) -> dict:
    """Fetch the state (loopback) against evaluate (a 0.05 Mbit/s link override), alternating, fresh prompts."""
    modes = {"fetch the node's KV state (loopback)": (), "evaluate the tokens (link said 0.05 Mbit/s)": SLOW_LINK}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        agents = {}
        for mode, extra in modes.items():
            port = free_port()
            daemon = stack.enter_context(launch.edge_agent(models, [f"127.0.0.1:{port}"], "--llm", "smollm2",
                                                           "--refresh-s", "0.5", *extra))
            agents[mode] = (port, stack.enter_context(EdgeClient(daemon.address, timeout=600)))
        for i in range(repeats):
            for mode, (port, client) in agents.items():
                # a new prompt each time: the agent's prefix cache must not hold it
                runs[mode].append(handed_over_stream(models, port, client, f"Run {i}: {mode}. {HANDOFF_PROMPT}", tokens))
    return {mode: {"gap_ms": statistics.median(r["gap_ms"] for r in rs), "runs": rs} for mode, rs in runs.items()}


def print_handoff(console: Console, result: dict) -> None:
    table = Table(title=f"a node shutting down after {HANDOFF_AT} tokens: the app's wait for the device's first token")
    for column in ("how the device went on", "gap ms (median)", "prompt tokens", "state MB", "agent's reason"):
        table.add_column(column, justify="left" if column in ("how the device went on", "agent's reason") else "right")
    for mode, row in result.items():
        last = row["runs"][-1]
        table.add_row(mode, f"{row['gap_ms']:.0f}", str(last["prompt_tokens"]), f"{last['state_bytes'] / 1e6:.1f}",
                      last["why"].partition("; ")[2])
    console.print(table)


def quality() -> dict:
    """What offload-tune calibrate-llm measures (offload_tune.quality), with every answer kept."""
    engines = [LlmEngine(name, PACKAGED_LLMS[name](), slots=4, ctx_per_seq=512) for name in ("smollm2", "gemma3-270m")]
    try:
        items, device, cloud, continued = measure(*engines)
    finally:
        for engine in engines:
            engine.close()
    policy = calibrate(items, device, cloud, device_model="smollm2", cloud_model="gemma3-270m", continued=continued)
    return {"items": len(items), "by_kind": policy.accuracy_by_kind, "calibration": policy.calibration.to_dict(),
            "threshold": policy.threshold, "on_calibration": policy.on_calibration.__dict__,
            "on_test": policy.on_test.__dict__, "test_auroc": policy.test_auroc,
            "escalation": policy.escalation, "escalated_accuracy": policy.escalated_accuracy,
            "answers": {"device": [a.__dict__ for a in device], "cloud": [a.__dict__ for a in cloud]}}


def print_quality(console: Console, result: dict) -> None:
    table = Table(title=f"two tiers on {result['items']} labelled prompts (greedy): accuracy")
    for column in ("kind", "device SmolLM2-135M", "cloud Gemma 3 270M"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, row in result["by_kind"].items():
        table.add_row(kind, f"{row['device']:.3f}", f"{row['cloud']:.3f}")
    console.print(table)
    test = result["on_test"]
    routed_vs_cloud = test["routed_accuracy"] / test["cloud_accuracy"] if test["cloud_accuracy"] else float("nan")
    console.print(f"test split ({result['items'] // 2} prompts): device-only {test['device_accuracy']:.3f}, "
                  f"cloud-only {test['cloud_accuracy']:.3f}, routed {test['routed_accuracy']:.3f} "
                  f"({routed_vs_cloud * 100:.1f} % of cloud-only; target >= 95 %) with "
                  f"{(1 - test['cloud_share']) * 100:.1f} % fewer cloud calls (target >= 40 %); threshold "
                  f"{result['threshold']:.3f} on the calibrated probability; the device's confidence ranks its "
                  f"answers with AUROC {result['test_auroc']:.3f}")
    escalated = result.get("escalated_accuracy")
    if escalated:
        console.print(f"escalated calibration items ({escalated['items']}): the cloud model restarting "
                      f"{escalated['restart']:.3f}, continuing after the device's first tokens "
                      f"{escalated['continue']:.3f}: {result['escalation']}; over every calibration item "
                      f"{escalated['restart_all']:.3f} against {escalated['continue_all']:.3f}")


_ENGINE: LlmEngine | None = None


def _start_engine() -> None:
    global _ENGINE
    _ENGINE = LlmEngine("smollm2", find_smollm2(), slots=1, prefix_cache_bytes=PREFIX_CACHE_BYTES)


def engine_run(tokens: int, engine: LlmEngine | None = None) -> dict:
    """One generation on the agent's engine through the asyncio bridge the
    daemons use, no gRPC, in a worker process of its own: with llama.cpp
    built with OpenMP, two contexts decoding from different threads of one
    process slowed both about 3x (bare 36 against 12 ms a token; Makefile)."""
    engine = engine or _ENGINE

    async def arrivals() -> list[float]:
        times = []
        async for event in stream(engine, engine.tokenize_prompt(PROMPT), Sampling(max_tokens=tokens)):
            if not isinstance(event, DoneEvent):
                times.append(time.perf_counter())
        return times
    start = time.perf_counter()
    return stream_times(start, asyncio.run(arrivals()))


def two_engines(tokens: int) -> dict[str, list[float]]:
    """ms between tokens of one engine alone, then of two engines in one
    process taking turns, as a daemon serving two models runs them (each
    decodes on its own thread)."""
    first = LlmEngine("a", find_smollm2(), slots=1)
    try:
        alone = [engine_run(tokens, first)["gap_ms"] for _ in range(3)]
        second = LlmEngine("b", find_smollm2(), slots=1)
        try:
            taking_turns = [engine_run(tokens, engine)["gap_ms"] for engine in (second, first) * 3]
        finally:
            second.close()
    finally:
        first.close()
    return {"alone": alone, "taking_turns": taking_turns}


def local_path(tokens: int, repeats: int = 3 * REPEATS) -> dict:
    """Where single-stream LOCAL loses against bare llama-cpp-python: the
    agent's engine alone (no gRPC, no serving) against the agent through the
    SDK, alternating, with the CPU the agent process and this client spend
    per token; then two engines of one process taking turns."""
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as models, \
            launch.edge_agent(Path(models), [], "--llm", "smollm2") as agent, EdgeClient(agent.address) as client:
        threads = os.cpu_count() or 1
        bare = Llama(model_path=str(find_smollm2()), n_ctx=2048, n_threads=threads, verbose=False)
        worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_engine)
        configs = {"bare llama-cpp-python": lambda: timed_stream(bare_stream(bare, tokens)),
                   "engine alone (asyncio, no gRPC)": lambda: worker.submit(engine_run, tokens).result(),
                   "agent LOCAL (SDK)": lambda: timed_stream(agent_stream(client, tokens, "local"))}
        agent_process, this_process = psutil.Process(agent.process.pid), psutil.Process()
        try:
            for make in configs.values():
                make()
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            agent_cpu_s = client_cpu_s = 0.0
            for _ in range(repeats):  # alternating, so drift hits every configuration alike
                for name, make in configs.items():
                    if name == "agent LOCAL (SDK)":
                        agent_before, client_before = agent_process.cpu_times(), this_process.cpu_times()
                    runs[name].append(make())
                    if name == "agent LOCAL (SDK)":
                        agent_cpu_s += cpu_s(agent_process.cpu_times(), agent_before)
                        client_cpu_s += cpu_s(this_process.cpu_times(), client_before)
        finally:
            worker.shutdown()
            bare.close()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        both = fresh.submit(two_engines, tokens).result()
    single = {name: median_of(r) for name, r in runs.items()}
    bare_tok_s = single["bare llama-cpp-python"]["tok_s"]
    streamed = repeats * tokens
    return {"repeats": repeats, "single": single,
            "vs_bare": {name: row["tok_s"] / bare_tok_s for name, row in single.items()},
            "threads": threads, "agent_cpu_ms_per_token": agent_cpu_s * 1e3 / streamed,
            "client_cpu_ms_per_token": client_cpu_s * 1e3 / streamed,
            "two_engines_gap_ms": {key: statistics.median(gaps) for key, gaps in both.items()}}


def cpu_s(after, before) -> float:
    return (after.user - before.user) + (after.system - before.system)


def print_local(console: Console, result: dict) -> None:
    table = Table(title=f"single stream LOCAL, greedy, median of {result['repeats']} alternating runs")
    for column in ("configuration", "tokens/s", "ms between tokens", "vs bare"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, row in result["single"].items():
        table.add_row(name, f"{row['tok_s']:.1f}", f"{row['gap_ms']:.2f}", f"{result['vs_bare'][name] * 100:.1f} %")
    console.print(table)
    agent = result["single"]["agent LOCAL (SDK)"]
    console.print(f"CPU per token: the agent process {result['agent_cpu_ms_per_token']:.2f} ms against "
                  f"{result['threads']} llama.cpp threads x {agent['gap_ms']:.2f} ms between tokens, this client "
                  f"{result['client_cpu_ms_per_token']:.3f} ms (target: agent LOCAL >= 95 % of bare)")
    both = result["two_engines_gap_ms"]
    console.print(f"one process, ms between tokens: one engine alone {both['alone']:.2f}, two engines taking turns "
                  f"{both['taking_turns']:.2f} (a daemon serving two models)")


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def concurrency(stub: pb_grpc.CloudNodeStub, streams: int, tokens: int) -> dict:
    results: list[dict] = [{} for _ in range(streams)]
    prompts = [f"{PROMPT} (story {i})" for i in range(streams)]

    def worker(i: int) -> None:
        results[i] = timed_stream(node_stream(stub, tokens, prompts[i]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {"streams": streams, "tokens": total, "wall_s": wall, "aggregate_tok_s": total / wall,
            "ttft_ms_median": statistics.median(r["ttft_ms"] for r in results),
            "ttft_ms_max": max(r["ttft_ms"] for r in results)}


def load_test(stub: pb_grpc.CloudNodeStub, tokens: int) -> dict:
    rows = [concurrency(stub, n, tokens) for n in (1, 2, 4, 8)]
    start = time.perf_counter()
    total = sum(timed_stream(node_stream(stub, tokens, f"{PROMPT} (story {i})"))["tokens"] for i in range(8))
    return {"concurrent": rows, "sequential_8_tok_s": total / (time.perf_counter() - start)}


def llama_ceiling(streams: int, tokens: int, *, unified: bool) -> dict:
    """llama.cpp's own batched decode on this machine, nothing of ours in the loop:
    every prompt prefilled in one batch, then ``tokens`` greedy steps of one batch
    holding every sequence (llama.cpp's C greedy sampler), through the low-level
    API on the same GGUF; aggregate tokens/s over the whole run, as the node's."""
    threads = os.cpu_count() or 1
    llm = Llama(model_path=str(find_smollm2()), n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False)
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max, params.n_ctx, params.kv_unified = streams, streams * 2048, unified
    params.n_batch = params.n_ubatch = 512
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = [llama_cpp.llama_sampler_init_greedy() for _ in range(streams)]
    prompts = [llm.tokenize(f"{PROMPT} (story {i})".encode(), add_bos=False, special=True) for i in range(streams)]

    def fill(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        start = time.perf_counter()
        fill([(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
        ends = list(itertools.accumulate(len(p) for p in prompts))
        last = [llama_cpp.llama_sampler_sample(samplers[s], ctx, ends[s] - 1) for s in range(streams)]
        positions = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            fill([(last[s], positions[s], s, True) for s in range(streams)])
            last = [llama_cpp.llama_sampler_sample(samplers[s], ctx, s) for s in range(streams)]
            positions = [pos + 1 for pos in positions]
        wall = time.perf_counter() - start
    finally:
        for sampler in samplers:
            llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return {"streams": streams, "tokens": streams * tokens, "wall_s": wall, "aggregate_tok_s": streams * tokens / wall}


def ceiling(tokens: int) -> dict:
    """The node's aggregate at 1, 2, 4 and 8 streams beside llama.cpp's own, both KV layouts, in one run."""
    result = {}
    for layout, unified in (("per-stream KV caches (default)", False), ("unified KV cache", True)):
        extra = ("--llm-unified-kv", "true") if unified else ()
        with tempfile.TemporaryDirectory(prefix="tandem-bench-") as models, \
                launch.cloud_node(Path(models), "--llm", "smollm2", "--llm-slots", "8", *extra) as node, \
                grpc.insecure_channel(node.address) as channel:
            stub = pb_grpc.CloudNodeStub(channel)
            timed_stream(node_stream(stub, 8))  # warm
            rows = []
            for streams in (1, 2, 4, 8):
                bare = llama_ceiling(streams, tokens, unified=unified)
                ours = concurrency(stub, streams, tokens)
                rows.append({"streams": streams, "llama_cpp_tok_s": bare["aggregate_tok_s"],
                             "node_tok_s": ours["aggregate_tok_s"],
                             "node_vs_ceiling": ours["aggregate_tok_s"] / bare["aggregate_tok_s"]})
        result[layout] = rows
    return result


def print_ceiling(console: Console, result: dict) -> None:
    for layout, rows in result.items():
        table = Table(title=f"cloud node against llama.cpp's own batched decode, {layout}")
        for column in ("streams", "llama.cpp tokens/s", "node tokens/s", "node / llama.cpp"):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(str(row["streams"]), f"{row['llama_cpp_tok_s']:.1f}", f"{row['node_tok_s']:.1f}",
                          f"{row['node_vs_ceiling']:.2f} (target >= 0.90)")
        console.print(table)


SYSTEM = ("You are a patient teacher. You explain science to children in plain words, with one example from "
          "everyday life, and you never use jargon without saying what it means.")
QUESTIONS = ("Why is the sky blue?", "And why are sunsets red?", "What makes a rainbow?", "Why do stars twinkle?",
             "Why is the sea salty?", "Can you sum up everything in three sentences?")


def chat_turn(engine: LlmEngine, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], str, DoneEvent]:
    tokens, done = engine.complete(engine.tokenize_chat(messages), Sampling(max_tokens=max_tokens), timeout_s=300)
    return [t.token_id for t in tokens], "".join(t.text for t in tokens), done


def prefix_reuse(max_tokens: int, repeats: int = 3) -> dict:
    """TTFT per turn of one chat, cold engine and cached engine turn by turn (each repeat starts with an empty cache)."""
    cold = LlmEngine("smollm2", find_smollm2(), slots=1)
    warm = LlmEngine("smollm2", find_smollm2(), slots=1, prefix_cache_bytes=PREFIX_CACHE_BYTES)
    rows, identical = [], True
    try:
        for repeat in range(repeats):
            warm.prefix_cache = PrefixCache(PREFIX_CACHE_BYTES)
            messages = [{"role": "system", "content": SYSTEM}]
            for turn, question in enumerate(QUESTIONS, start=1):
                messages.append({"role": "user", "content": question})
                cold_tokens, _, cold_done = chat_turn(cold, messages, max_tokens)
                warm_tokens, text, warm_done = chat_turn(warm, messages, max_tokens)
                identical &= cold_tokens == warm_tokens
                rows.append({"repeat": repeat, "turn": turn, "prompt_tokens": warm_done.prompt_tokens,
                             "cached_tokens": warm_done.cached_tokens, "cold_ttft_ms": cold_done.ttft_ms,
                             "cached_ttft_ms": warm_done.ttft_ms})
                messages.append({"role": "assistant", "content": text})
    finally:
        cold.close()
        warm.close()
    turns = []
    for turn in range(1, len(QUESTIONS) + 1):
        mine = [r for r in rows if r["turn"] == turn]
        turns.append({"turn": turn, "prompt_tokens": mine[0]["prompt_tokens"], "cached_tokens": mine[-1]["cached_tokens"],
                      "cold_ttft_ms": statistics.median(r["cold_ttft_ms"] for r in mine),
                      "cached_ttft_ms": statistics.median(r["cached_ttft_ms"] for r in mine)})
    return {"turns": turns, "identical_greedy_tokens": identical, "repeats": repeats, "runs": rows}


def print_prefix(console: Console, result: dict, max_tokens: int) -> None:
    table = Table(title=f"multi-turn chat, {max_tokens} tokens a turn, greedy, median of {result['repeats']}: "
                        f"time to first token without and with the prefix cache")
    for column in ("turn", "prompt tokens", "from the cache", "cold TTFT ms", "cached TTFT ms", "cached / cold"):
        table.add_column(column, justify="right")
    for row in result["turns"]:
        table.add_row(str(row["turn"]), str(row["prompt_tokens"]), str(row["cached_tokens"]), f"{row['cold_ttft_ms']:.1f}",
                      f"{row['cached_ttft_ms']:.1f}", f"{row['cached_ttft_ms'] / row['cold_ttft_ms']:.2f}")
    console.print(table)
    console.print(f"greedy answers identical with and without the cache: {result['identical_greedy_tokens']}")


SPEC_PROMPTS = ("The capital of France is", "Write the days of the week: Monday,")
SPEC_WARM_UP = "A short poem about the sea:"
SPEC_RTTS_MS = (5, 20, 80, 200)
SPEC_FIXED_K = (1, 2, 4, 8)


def pin_all_threads(daemon: launch.Daemon, cpu: int) -> None:
    """Every thread of ``daemon`` (llama.cpp's included) onto one core."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(daemon.process.pid)], check=True, capture_output=True)


def speculative(tokens: int) -> dict:
    """Cloud-only against draft-and-verify at each RTT, for the adaptive and each fixed draft length."""
    configs = {"adaptive": "0", **{f"k={k}": str(k) for k in SPEC_FIXED_K}}
    result: dict = {"rtt_ms": {}}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp, \
            launch.cloud_node(Path(tmp), "--llm", "gemma3-270m", "--llm-threads", "1") as node:
        pin_all_threads(node, 1)
        host, port = node.address.rsplit(":", 1)
        node_cpu = psutil.Process(node.process.pid)
        with Relay((host, int(port))) as relay:
            relay_address = "{}:{}".format(*relay.address)
            for rtt in SPEC_RTTS_MS:
                relay.set_delay(rtt / 2)
                rows: dict = {}
                for name, k in configs.items():
                    with launch.edge_agent(Path(tmp), [relay_address], "--llm", "smollm2", "--llm-threads", "1",
                                           "--llm-cloud-model", "gemma3-270m", "--llm-draft-tokens", k,
                                           "--refresh-s", "0.5") as agent, EdgeClient(agent.address, timeout=600) as c:
                        pin_all_threads(agent, 0)
                        wait_for_model(c, "gemma3-270m")
                        time.sleep(3)  # a few probes through the relay: the agent's RTT estimate settles
                        plans = {"speculative": "speculative"} if name != "adaptive" else {
                            "cloud-only (REMOTE)": "remote", "speculative": "speculative"}
                        for label, plan in plans.items():
                            rows[name if plan == "speculative" else label] = spec_runs(c, plan, tokens, node_cpu)
                result["rtt_ms"][rtt] = rows
    return result


def wait_for_model(client: EdgeClient, model: str, within_s: float = 120.0) -> None:
    for _ in range(int(within_s / 0.2)):
        if any(c.node for c in client.explain(model, prompt_tokens=16, max_tokens=16).candidates):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the agent never saw a node serving {model}")


def spec_runs(client: EdgeClient, plan: str, tokens: int, node_cpu: psutil.Process) -> dict:
    """Tokens/s as the app sees them, acceptance, and node CPU seconds per token, over SPEC_PROMPTS."""
    produced = drafted = accepted = rounds = 0
    seconds = 0.0
    texts = []
    # untimed: the agent's first rounds measure acceptance and the node's steps, as a running agent already has
    client.generate_text(prompt=SPEC_WARM_UP, model="gemma3-270m", max_tokens=tokens, plan=plan)
    cpu_before = sum(node_cpu.cpu_times()[:2])
    for prompt in SPEC_PROMPTS:
        start = time.perf_counter()
        done = client.generate_text(prompt=prompt, model="gemma3-270m", max_tokens=tokens, plan=plan)
        seconds += time.perf_counter() - start
        produced += len(done.token_ids)
        drafted, accepted, rounds = (drafted + done.summary.drafted_tokens, accepted + done.summary.accepted_tokens,
                                     rounds + done.summary.draft_rounds)
        texts.append(done.text)
    node_cpu_s = sum(node_cpu.cpu_times()[:2]) - cpu_before
    return {"tok_s": produced / seconds, "tokens": produced, "acceptance": accepted / drafted if drafted else None,
            "draft_per_round": drafted / rounds if rounds else None, "node_cpu_ms_per_token": node_cpu_s / produced * 1e3,
            "texts": texts}


def print_speculative(console: Console, result: dict) -> None:
    table = Table(title="draft-and-verify (device SmolLM2 drafts, node Gemma 3 270M checks), tokens/s per stream")
    names = list(next(iter(result["rtt_ms"].values())))
    table.add_column("RTT ms", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for rtt, rows in result["rtt_ms"].items():
        cells = []
        for name in names:
            row = rows[name]
            extra = f" a={row['acceptance']:.2f} k~{row['draft_per_round']:.1f}" if row["acceptance"] is not None else ""
            cells.append(f"{row['tok_s']:.1f}{extra}")
        table.add_row(str(rtt), *cells)
    console.print(table)
    for rtt, rows in result["rtt_ms"].items():
        remote = rows["cloud-only (REMOTE)"]
        fixed = max((rows[f"k={k}"]["tok_s"] for k in SPEC_FIXED_K))
        adaptive = rows["adaptive"]
        same = all(row["texts"] == remote["texts"] for row in rows.values())
        console.print(f"RTT {rtt} ms: adaptive {adaptive['tok_s'] / fixed * 100:.1f} % of the best fixed k; "
                      f"{adaptive['tok_s'] / remote['tok_s']:.2f}x cloud-only; node CPU per token "
                      f"{adaptive['node_cpu_ms_per_token']:.1f} ms against {remote['node_cpu_ms_per_token']:.1f} ms "
                      f"cloud-only (capacity {remote['node_cpu_ms_per_token'] / adaptive['node_cpu_ms_per_token']:.2f}x); "
                      f"every output identical: {same}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--json", type=Path, default=Path("bench/results/llm.json"))
    parser.add_argument("--only", choices=["local", "prefix", "handoff", "quality", "ceiling", "speculative"],
                        help="run only this part")
    args = parser.parse_args()
    console = Console(width=120)
    parts = {"quality": ("the labelled set on both tiers", quality, print_quality),
             "speculative": ("draft-and-verify through an emulated RTT", lambda: speculative(args.tokens),
                             print_speculative),
             "ceiling": ("the node against llama.cpp's own batched decode", lambda: ceiling(args.tokens), print_ceiling),
             "handoff": ("nodes shutting down mid-generation", lambda: handoff(args.tokens), print_handoff),
             "local": ("single-stream LOCAL against bare llama-cpp-python", lambda: local_path(args.tokens), print_local),
             "prefix": ("multi-turn chat, cold and cached", lambda: prefix_reuse(args.tokens),
                        lambda c, r: print_prefix(c, r, args.tokens))}
    if args.only is not None:
        status, run, show = parts[args.only]
        with console.status(f"{status} ..."):
            result = run()
        show(console, result)
        key = {"prefix": "prefix_reuse"}.get(args.only, args.only)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"node": platform.node(), "cpus": os.cpu_count()},
                                         key: result}, indent=2))
        console.print(f"wrote {args.json}")
        return 0
    threads = os.cpu_count() or 1
    report: dict = {"machine": {"node": platform.node(), "cpus": threads, "python": platform.python_version()},
                    "tokens": args.tokens, "prompt": PROMPT}

    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as models:
        with launch.cloud_node(Path(models), "--llm", "smollm2", "--llm-slots", "8") as node, \
                launch.edge_agent(Path(models), [node.address], "--llm", "smollm2", "--http-listen", "127.0.0.1:0") as agent, \
                EdgeClient(agent.address) as client, grpc.insecure_channel(node.address) as channel:
            stub = pb_grpc.CloudNodeStub(channel)
            http = openai.OpenAI(base_url=agent.ready["http"] + "/v1", api_key="none", max_retries=0)
            bare = Llama(model_path=str(find_smollm2()), n_ctx=2048, n_threads=threads, verbose=False)
            configs = {
                "bare llama-cpp-python": lambda: bare_stream(bare, args.tokens),
                "agent LOCAL (SDK)": lambda: agent_stream(client, args.tokens, "local"),
                OPENAI_LOCAL: lambda: openai_stream(http, args.tokens, "local"),
                "cloud node direct": lambda: node_stream(stub, args.tokens),
                "agent REMOTE (SDK, loopback)": lambda: agent_stream(client, args.tokens, "remote"),
            }
            for make in configs.values():  # warm every path once
                timed_stream(make())
            with console.status("single streams ..."):
                runs = {name: [] for name in configs}
                for _ in range(REPEATS):  # alternate so drift hits every configuration alike
                    for name, make in configs.items():
                        runs[name].append(timed_stream(make()))
            single = {name: median_of(r) for name, r in runs.items()}
            bare.close()

            with console.status("concurrent streams ..."):
                load = {"per-stream KV caches (default)": load_test(stub, args.tokens)}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as models, \
            launch.cloud_node(Path(models), "--llm", "smollm2", "--llm-slots", "8", "--llm-unified-kv", "true") as node, \
            grpc.insecure_channel(node.address) as channel, console.status("concurrent streams, unified KV cache ..."):
        load["unified KV cache (--llm-unified-kv)"] = load_test(pb_grpc.CloudNodeStub(channel), args.tokens)

    table = Table(title=f"single stream, {args.tokens} tokens, greedy, median of {REPEATS}")
    for column in ("configuration", "tokens", "tokens/s", "ms between tokens", "time to first token ms"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, row in single.items():
        table.add_row(name, f"{row['tokens']:.0f}", f"{row['tok_s']:.1f}", f"{row['gap_ms']:.2f}", f"{row['ttft_ms']:.1f}")
    console.print(table)
    local_ratio = single["agent LOCAL (SDK)"]["tok_s"] / single["bare llama-cpp-python"]["tok_s"]
    added_ms = single["agent REMOTE (SDK, loopback)"]["gap_ms"] - single["cloud node direct"]["gap_ms"]
    http_ms = single[OPENAI_LOCAL]["gap_ms"] - single["agent LOCAL (SDK)"]["gap_ms"]
    console.print(f"agent LOCAL / bare: {local_ratio * 100:.1f} % (target >= 95 %); "
                  f"agent REMOTE adds {added_ms:+.3f} ms per token over the node direct (target <= 1 ms); "
                  f"OpenAI SSE adds {http_ms:+.3f} ms per token over the SDK (target <= 1 ms)")

    for mode, result in load.items():
        load_table = Table(title=f"cloud node under load, 8 slots, {mode}")
        for column in ("concurrent streams", "aggregate tokens/s", "vs 8 sequential", "TTFT median ms", "TTFT max ms"):
            load_table.add_column(column, justify="right")
        sequential = result["sequential_8_tok_s"]
        for row in result["concurrent"]:
            load_table.add_row(str(row["streams"]), f"{row['aggregate_tok_s']:.1f}", f"{row['aggregate_tok_s'] / sequential:.2f}x",
                               f"{row['ttft_ms_median']:.1f}", f"{row['ttft_ms_max']:.1f}")
        load_table.add_row("8 one after another", f"{sequential:.1f}", "1.00x", "", "")
        console.print(load_table)

    with console.status("multi-turn chat, cold and cached ..."):
        prefix = prefix_reuse(args.tokens)
    print_prefix(console, prefix, args.tokens)
    with console.status("nodes shutting down mid-generation ..."):
        handed = handoff(args.tokens)
    print_handoff(console, handed)
    with console.status("the labelled set on both tiers ..."):
        tiers = quality()
    print_quality(console, tiers)
    with console.status("the node against llama.cpp's own batched decode ..."):
        bounds = ceiling(args.tokens)
    print_ceiling(console, bounds)
    with console.status("draft-and-verify through an emulated RTT ..."):
        drafted = speculative(args.tokens)
    print_speculative(console, drafted)
    report.update(single=single, local_vs_bare=local_ratio, remote_added_ms_per_token=added_ms,
                  openai_added_ms_per_token=http_ms, load=load, prefix_reuse=prefix, handoff=handed,
                  quality=tiers, ceiling=bounds, speculative=drafted)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
