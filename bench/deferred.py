"""Deferred requests draining while live requests run.

    python -m bench.deferred [--queued 40] [--live 100] [--json bench/results/deferred.json]

One agent and one cloud node on loopback, side by side in one run:
  1. the node is down: ``--queued`` deferred mobilenet requests (pinned REMOTE: they need
     the cloud) are accepted, and live LOCAL requests, one at a time, measure the agent idle;
  2. the node starts: the same live requests while the queue drains, and how long it takes;
  3. the queue empty and the node up: the same live requests again.
Then every deferred id is checked: delivered, lost (never done) or run twice (attempts > 1).
The link here is loopback; with root, the emulated link-down of issue 14 is still to be built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.sdk import EdgeClient
from modelzoo.build import build_all
from runtimes import launch
from runtimes.peers import free_port


def live(client: EdgeClient, x: np.ndarray, count: int, until: threading.Event | None = None) -> list[float]:
    """LOCAL requests one after another: ``count`` of them, or until ``until`` is set."""
    times = []
    while len(times) < count or (until is not None and not until.is_set()):
        start = time.perf_counter()
        client.infer("mobilenet", {"input": x}, plan="local")
        times.append((time.perf_counter() - start) * 1e3)
        if until is None and len(times) >= count:
            break
    return times


def summary(times: list[float]) -> dict:
    return {"requests": len(times), "p50_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=40, help="deferred requests waiting when the node returns")
    parser.add_argument("--live", type=int, default=100, help="live LOCAL requests per phase (at least)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/deferred.json"))
    args = parser.parse_args()
    console = Console(width=120)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="tandem-deferred-") as tmp_name:
        tmp = Path(tmp_name)
        build_all(tmp / "models", names=["mobilenet"])
        port = free_port()
        with launch.edge_agent(tmp / "models", [f"127.0.0.1:{port}"], "--queue-file", str(tmp / "q.sqlite"),
                               "--refresh-s", "0.5") as agent, EdgeClient(agent.address, timeout=120) as client:
            ids = [client.infer("mobilenet", {"input": x}, plan="remote", defer=True, deliver_by=time.time() + 3600,
                                idempotency_key=f"bench-{i}").id for i in range(args.queued)]
            live(client, x, 10)  # warm
            with console.status("live requests, queue waiting, node down"):
                idle = live(client, x, args.live)
            with launch.cloud_node(tmp / "models", "--listen", f"127.0.0.1:{port}"):
                drained = threading.Event()
                started = time.perf_counter()

                def wait_drain() -> None:
                    with EdgeClient(agent.address, timeout=600) as watcher:
                        for _ in watcher.results(ids, deadline=600):
                            pass
                    drained.set()

                watcher = threading.Thread(target=wait_drain)
                watcher.start()
                with console.status("live requests while the queue drains"):
                    during = live(client, x, 1, until=drained)
                watcher.join()
                drain_s = time.perf_counter() - started
                with console.status("live requests, queue empty, node up"):
                    after = live(client, x, args.live)
            results = [client.result(i) for i in ids]
    delivered = sum(r.state == "done" for r in results)
    twice = sum(r.attempts > 1 for r in results)
    phases = {"node down, queue waiting": summary(idle), "queue draining": summary(during),
              "queue empty, node up": summary(after)}
    table = Table(title=f"live LOCAL mobilenet while {args.queued} deferred REMOTE requests wait and drain "
                        f"({platform.node()}, {os.cpu_count()} CPUs)")
    for column in ("phase", "live requests", "p50 ms", "p90 ms", "p50 vs idle"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    base = phases["node down, queue waiting"]["p50_ms"]
    for name, row in phases.items():
        table.add_row(name, str(row["requests"]), f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{(row['p50_ms'] / base - 1) * 100:+.1f} %")
    console.print(table)
    console.print(f"drained {args.queued} in {drain_s:.2f} s; delivered {delivered}, lost {args.queued - delivered}, "
                  f"delivered more than once {twice}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": {"node": platform.node(), "cpus": os.cpu_count()}, "phases": phases,
                                     "queued": args.queued, "drain_s": drain_s, "delivered": delivered,
                                     "lost": args.queued - delivered, "twice": twice}, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
