"""The edge agent's memory under a flood of large requests, and after it.

    python -m bench.memory [--requests 60] [--batch 48] [--budget-mb 256] [--json bench/results/memory.json]

An agent with no cloud node serves resnet LOCAL. Once it has served and
profiled the flood's shape and come to rest (its idle RSS), ``--requests``
Infer calls of ``--batch`` images each (27.6 MiB at batch 48) are sent at once
while the agent's RSS is sampled every 10 ms; then the agent is left alone and
its RSS read again. The same flood runs against the agent's default settings
and against one given ``--request-memory-mb``. Every call must end answered or
refused with RESOURCE_EXHAUSTED (a refusal the app can retry); anything else
counts as lost.

Targets (issue 11): peak RSS above idle within the request memory budget, and
the agent settles within 10 % of its idle RSS afterwards.

Then what the agent's fixed stream window costs: the median time of a call
carrying a 600 KB request (mobilenet's input) and a 27.6 MiB one to an echo
server on loopback, with gRPC's adaptive window and with the agent's, in
alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from bench.overhead import MESSAGE_OPTIONS, EchoServer
from edge_agent.sdk import EdgeClient
from modelzoo.build import build_all
from protos import codec
from protos import tandem_pb2 as pb
from runtimes import launch
from runtimes.heap import TRIM_DELAYS_S
from runtimes.rpc import APP_STREAM_WINDOW_BYTES, server_options

MIB = 2**20
SETTLE_S = 10.0       # how long the agent is given to come to rest after the flood
SAMPLE_S = 0.01


class RssSampler:
    """Peak resident set size of one process, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def resting_rss(sampler: RssSampler, settle_s: float) -> int:
    """RSS once it stops falling, no sooner than the agent's last trim after
    going idle (heap.TRIM_DELAYS_S), at most ``settle_s``."""
    started = time.monotonic()
    last = sampler.rss()
    while time.monotonic() - started < settle_s:
        time.sleep(0.5)
        now = sampler.rss()
        if abs(now - last) < MIB and time.monotonic() - started > max(TRIM_DELAYS_S) + 0.5:
            return now
        last = now
    return last


def flood(address: str, request: bytes, count: int) -> Counter:
    """``count`` calls at once; how each ended."""
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as channel:
        call = channel.unary_unary("/tandem.v1.EdgeAgent/Infer")
        futures = [call.future(request, timeout=300) for _ in range(count)]
        outcomes: Counter = Counter()
        for future in futures:
            try:
                future.result()
                outcomes["answered"] += 1
            except grpc.RpcError as error:
                outcomes["refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else f"lost ({error.code().name})"] += 1
        return outcomes


def run_flood(models: Path, extra: list[str], batch: int, requests: int, console: Console) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    request = pb.InferRequest(model="resnet", inputs=[codec.encode(x, "input")], plan="local").SerializeToString()
    with launch.edge_agent(models, [], *extra) as agent, EdgeClient(agent.address, timeout=300) as client:
        sampler = RssSampler(agent.process.pid)
        fresh = sampler.rss()
        with console.status(f"warming up at batch {batch} ..."):
            client.infer("resnet", {"input": x}, plan="local")
            launch.wait_profiled(client, "resnet", x.shape)
            client.infer("resnet", {"input": x}, plan="local")
            idle = resting_rss(sampler, SETTLE_S)
        sampler.peak = idle
        with console.status(f"{requests} requests of {len(request) / MIB:.1f} MiB at once ..."), sampler:
            started = time.perf_counter()
            outcomes = flood(agent.address, request, requests)
            flood_s = time.perf_counter() - started
        with console.status("letting the agent settle ..."):
            settled = resting_rss(sampler, SETTLE_S)
        budget = re.search(r"requests may hold (\d+) MiB at once", agent.log())
    return {"settings": " ".join(extra) or "defaults", "budget_mib": float(budget[1]) if budget else float("nan"),
            "request_mib": len(request) / MIB, "requests": requests,
            "fresh_mib": fresh / MIB, "idle_mib": idle / MIB, "peak_mib": sampler.peak / MIB,
            "settled_mib": settled / MIB, "flood_s": flood_s, "outcomes": dict(outcomes)}


def window_cost(rounds: int = 4, calls: int = 50) -> list[dict]:
    """Median loopback call time per request size, adaptive vs fixed window."""
    windows = {"adaptive (gRPC default)": MESSAGE_OPTIONS,
               f"fixed {APP_STREAM_WINDOW_BYTES // 1024} KiB (agent)": server_options(64, stream_window_bytes=APP_STREAM_WINDOW_BYTES)}
    rows = []
    for size in (602_112, 48 * 3 * 224 * 224 * 4):
        request = bytes(size)
        times: dict[str, list[float]] = {name: [] for name in windows}
        servers = {name: EchoServer(reply_bytes=4200, options=options) for name, options in windows.items()}
        try:
            for server in servers.values():
                server.call(request, timeout=30)
            for _ in range(rounds):
                for name, server in servers.items():
                    for _ in range(calls // (1 if size < 2**20 else 5)):
                        started = time.perf_counter()
                        server.call(request, timeout=30)
                        times[name].append((time.perf_counter() - started) * 1e3)
        finally:
            for server in servers.values():
                server.close()
        rows.append({"request_bytes": size, **{name: float(np.median(values)) for name, values in times.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="calls sent at once")
    parser.add_argument("--batch", type=int, default=48, help="images per call (27.6 MiB at 48)")
    parser.add_argument("--request-memory-mb", type=float, default=256.0, help="the budget of the second run, MiB")
    parser.add_argument("--json", type=Path, default=Path("bench/results/memory.json"))
    args = parser.parse_args()
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        models = Path(tmp)
        build_all(models, names=["resnet"])
        runs = [run_flood(models, extra, args.batch, args.requests, console)
                for extra in ([], ["--request-memory-mb", f"{args.request_memory_mb:g}"])]

    table = Table(title=f"{args.requests} resnet requests at once, batch {args.batch} "
                        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.node()})")
    for column in ("agent settings", "budget MiB", "request MiB", "idle MiB", "peak MiB", "peak - idle", "settled MiB",
                   "settled vs idle", "answered", "refused", "lost"):
        table.add_column(column, justify="left" if column == "agent settings" else "right")
    for run in runs:
        outcomes = run["outcomes"]
        lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
        table.add_row(run["settings"], f"{run['budget_mib']:.0f}", f"{run['request_mib']:.1f}", f"{run['idle_mib']:.0f}", f"{run['peak_mib']:.0f}",
                      f"{run['peak_mib'] - run['idle_mib']:+.0f}", f"{run['settled_mib']:.0f}",
                      f"{(run['settled_mib'] / run['idle_mib'] - 1) * 100:+.1f} %",
                      str(outcomes.get("answered", 0)), str(outcomes.get("refused", 0)), str(lost))
    console.print(table)
    for run in runs:
        budget = run["budget_mib"]
        peak_met = run["peak_mib"] - run["idle_mib"] <= budget
        settle_met = run["settled_mib"] <= 1.1 * run["idle_mib"]
        run.update(peak_within_budget=peak_met, settled_within_10_percent=settle_met)
        console.print(f"{run['settings']}: peak within the {budget:.0f} MiB budget: {'met' if peak_met else 'NOT met'}; "
                      f"settled within 10 % of idle: {'met' if settle_met else 'NOT met'}")

    with console.status("timing the stream windows ..."):
        windows = window_cost()
    window_table = Table(title="median loopback call time (ms), echo server, by server stream window")
    window_table.add_column("request")
    for name in windows[0]:
        if name != "request_bytes":
            window_table.add_column(name, justify="right")
    for row in windows:
        window_table.add_row(f"{row['request_bytes'] / MIB:.2f} MiB",
                             *(f"{value:.2f}" for name, value in row.items() if name != "request_bytes"))
    console.print(window_table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": {"node": platform.node(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "batch": args.batch, "runs": runs, "window_cost_ms": windows,
    }, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
