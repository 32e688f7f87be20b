"""offload-tune for a GGUF model: LOCAL or REMOTE, by prompt and generation length.

Speeds on the board come from one real generation here (llama.cpp through
llama-cpp-python), scaled to the board: prompt evaluation by compute
(GFLOPS ratio: prefill is batched matrix work), generation by memory
bandwidth (each token reads every weight once). The cloud's speeds are a
running node's (``--cloud``) or, without one, this host's. Routing is the
agent's own ``route_generation``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from devices.profiles import DeviceProfile, measure_host
from offload_tune.scenario import DEFAULT_RTT_MS, ToolError, device_named, reach_node
from partitioner.costmodel import Link
from partitioner.llm_routing import (
    GenerationShape,
    LlmDecision,
    LlmNode,
    LlmPolicy,
    LlmSpeed,
    estimated_prompt_bytes,
    route_generation,
)
from partitioner.planning import power_of
from partitioner.policy import OBJECTIVES

GGUF_MAGIC = b"GGUF"
MEASURE_PROMPT_TOKENS = 64   # the warm-up's filler text holds this many tokens of SmolLM2's vocabulary
MEASURE_NEW_TOKENS = 48


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 128, 512, 1536],
                        help="GGUF: prompt lengths for the routing table")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 64, 256],
                        help="GGUF: generation lengths for the routing table")


def measured_speed(path: Path) -> LlmSpeed:
    """Prompt and generation tokens/s of ``path`` on this host, from one real generation."""
    from runtimes.llm_serving import LlmStore

    if not path.is_file():
        raise ToolError(f"{path}: no such file")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ToolError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        store = LlmStore.load([str(path)], slots=1, ctx_per_seq=2048, threads=None, max_queue=1)
    except Exception as exc:  # noqa: BLE001 -- llama.cpp refuses a file in many ways
        raise ToolError(f"{path}: llama.cpp cannot load it: {exc}") from None
    try:
        engine = next(iter(store.engines.values()))
        # The start-up warm-up is short and pays one-off costs; time a prompt
        # and a generation long enough to say what the model sustains.
        done = engine.warm_up(prompt_tokens=MEASURE_PROMPT_TOKENS, max_tokens=MEASURE_NEW_TOKENS)
        if done.error or done.prompt_eval_ms <= 0 or done.tokens_per_s <= 0:
            raise ToolError(f"{path}: the measuring generation failed: {done.error or done.finish_reason}")
        return LlmSpeed(done.prompt_tokens * 1e3 / done.prompt_eval_ms, done.tokens_per_s)
    finally:
        store.close()


def on_device(speed: LlmSpeed, device: DeviceProfile) -> LlmSpeed:
    if device.name == "host":
        return speed
    host = measure_host()
    return LlmSpeed(prompt_tok_s=speed.prompt_tok_s * device.cpu_gflops / host.gflops_fp64,
                    gen_tok_s=speed.gen_tok_s * device.mem_bandwidth_gbs / host.mem_bandwidth_gbs)


def cloud_speed(args: argparse.Namespace, name: str, here: LlmSpeed) -> tuple[LlmSpeed, str, float | None]:
    """(speed, where it comes from, measured RTT or None)."""
    if not args.cloud:
        return here, "this host's measured speed (no --cloud node given)", None
    node = asyncio.run(reach_node(args.cloud, args))
    load = next((load for load in node.state.llm if load.model == name), None)
    if load is None or load.gen_tok_s <= 0:
        raise ToolError(f"cloud node {args.cloud} does not serve {name} (LLMs there: {[l.model for l in node.state.llm]})")
    return LlmSpeed(load.prompt_tok_s, load.gen_tok_s), f"measured by cloud node {args.cloud}", node.link.rtt_ms


def _checked(values: list[int], flag: str) -> list[int]:
    if any(v < 1 for v in values):
        raise ToolError(f"{flag} must be >= 1, got {values}")
    return sorted(set(values))


def _setup(args: argparse.Namespace):
    if args.objective not in OBJECTIVES:
        raise ToolError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {args.objective!r}")
    path = Path(args.model)
    device = device_named(args.device)
    here = measured_speed(path)
    local = on_device(here, device)
    remote, source, measured_rtt = cloud_speed(args, path.stem, here)
    rtt = args.rtt_ms if args.rtt_ms is not None else (measured_rtt if measured_rtt is not None else DEFAULT_RTT_MS)
    return path, device, local, remote, source, rtt


def _decide(local: LlmSpeed, remote: LlmSpeed, device: DeviceProfile, args, mbps: float, rtt: float,
            prompt: int, tokens: int) -> LlmDecision:
    link = Link(uplink_mbps=mbps, downlink_mbps=args.downlink_mbps or mbps, rtt_ms=rtt)
    shape = GenerationShape(prompt_tokens=prompt, max_tokens=tokens, prompt_bytes=estimated_prompt_bytes(prompt))
    return route_generation(shape, local, [LlmNode("cloud", link, 0.0, remote)], power_of(device),
                            objective=OBJECTIVES[args.objective], weight_latency=args.weight_latency,
                            policy=LlmPolicy(slo_ms=args.slo_ms, energy_budget_j=args.energy_budget_j))


def _entry(decision: LlmDecision, **where) -> dict:
    by_kind = {c.kind: c for c in decision.candidates}
    win = decision.winner or decision.best_effort
    return {**where, "chosen": win.kind if win else None, "why": decision.why,
            **{f"{kind}_{field}": getattr(c, field) for kind, c in by_kind.items()
               for field in ("ttft_ms", "total_ms", "energy_j")}}


def sweep(args: argparse.Namespace, bandwidths: list[float], out: Console, err: Console) -> int:
    prompts, lengths = _checked(args.prompt_tokens, "--prompt-tokens"), _checked(args.max_tokens, "--max-tokens")
    with err.status("measuring the model with llama.cpp"):
        path, device, local, remote, source, rtt = _setup(args)
    rows = [_entry(_decide(local, remote, device, args, mbps, rtt, p, t), uplink_mbps=mbps, prompt_tokens=p, max_tokens=t)
            for mbps in bandwidths for p in prompts for t in lengths]
    report = {"model": path.stem, "device": device.name, "local_tok_s": vars_of(local), "cloud_tok_s": vars_of(remote),
              "cloud_source": source, "rtt_ms": rtt, "objective": args.objective, "routes": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"{path.stem} on {device.name}: LOCAL or REMOTE ({args.objective}, RTT {rtt:.1f} ms); "
                        f"device {local.prompt_tok_s:.0f}/{local.gen_tok_s:.1f} tok/s prompt/gen, "
                        f"cloud {remote.prompt_tok_s:.0f}/{remote.gen_tok_s:.1f}")
    table.add_column("prompt", justify="right")
    table.add_column("max tokens", justify="right")
    for mbps in bandwidths:
        table.add_column(f"{mbps:g} Mbit/s", justify="right")
    for p in prompts:
        for t in lengths:
            cells = []
            for mbps in bandwidths:
                row = next(r for r in rows if (r["uplink_mbps"], r["prompt_tokens"], r["max_tokens"]) == (mbps, p, t))
                cells.append(f"{row['chosen']} {row.get('local_total_ms', 0) / 1e3:.2f}/{row['remote_total_ms'] / 1e3:.2f} s")
            table.add_row(str(p), str(t), *cells)
    out.print(table)
    out.print(f"cells: chosen route, then predicted LOCAL / REMOTE seconds to the last token; cloud speed: {source}")
    return 0


def explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    prompt, tokens = _checked(args.prompt_tokens, "--prompt-tokens")[0], _checked(args.max_tokens, "--max-tokens")[0]
    with err.status("measuring the model with llama.cpp"):
        path, device, local, remote, source, rtt = _setup(args)
    decision = _decide(local, remote, device, args, args.bandwidth, rtt, prompt, tokens)
    report = _entry(decision, model=path.stem, device=device.name, uplink_mbps=args.bandwidth, prompt_tokens=prompt,
                    max_tokens=tokens)
    report["cloud_source"] = source
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"{path.stem} on {device.name}: {prompt} prompt tokens, {tokens} new, {args.bandwidth:g} Mbit/s")
    for column in ("route", "TTFT ms", "total ms", "J", "score", "feasible"):
        table.add_column(column, justify="right")
    for c in decision.candidates:
        table.add_row(c.kind, f"{c.ttft_ms:.0f}", f"{c.total_ms:.0f}", f"{c.energy_j:.2f}", f"{c.score:.4g}",
                      "yes" if c.feasible else "; ".join(c.violations))
    out.print(table)
    out.print(decision.why, markup=False)
    return 0


def vars_of(speed: LlmSpeed) -> dict:
    return {"prompt": speed.prompt_tok_s, "generation": speed.gen_tok_s}
