"""Deferred requests draining while live requests run.

    python -m bench.deferred [--queued 40] [--live 100] [--json bench/results/deferred.json]
    python -m bench.deferred --outage 30 [--queued 40] [--uplink 10] [--downlink 30]   # root

Loopback (default). One agent and one cloud node, side by side in one run:
  1. the node is down: ``--queued`` deferred mobilenet requests (pinned REMOTE: they need
     the cloud) are accepted, and live LOCAL requests, one at a time, measure the agent idle;
  2. the node starts: the same live requests while the queue drains, and how long it takes;
  3. the queue empty and the node up: the same live requests again.

``--outage S`` (root: network namespaces, a shaped veth). The device (agent and
app) on one core, the node on the other, as in emulation.deployment:
  1. link up: live LOCAL requests measure the agent idle;
  2. the link goes down in silence (``Testbed.set_link``) for S seconds: the
     deferred requests are submitted, each with its own input, and unpinned live
     requests run: the plan each takes and what it costs once the agent knows it
     is offline, against pinned LOCAL online (a node that cannot be reached must
     cost nothing);
  3. the link comes back: live LOCAL requests while the queue drains;
  4. the queue empty: live LOCAL again.
A thread reads the agent's connectivity every 200 ms: when it saw the outage and the return.

Then every deferred id is checked: delivered (and, with --outage, equal to
onnxruntime on its own input), lost (never done), or taken again after an
attempt that found no node (attempts > 1: it went back into the queue); with
--outage the node's own count of the runs it finished says whether any request
ran twice there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from devices.profiles import DEVICES
from edge_agent.sdk import EdgeClient
from emulation import netns
from emulation.cpu import CpuQuota
from emulation.deployment import EDGE_CPU, Deployment, cpus_like, pinning_available
from emulation.netns import Testbed
from modelzoo.build import build_all
from runtimes import launch
from runtimes.peers import free_port


def live(client: EdgeClient, x: np.ndarray, count: int, until: threading.Event | None = None, *,
         plan: str | None = "local", plans: list[tuple[float, str]] | None = None) -> list[float]:
    """Requests one after another: ``count`` of them, or until ``until`` is set;
    ``plans`` collects when each one started (monotonic) and the plan it ran."""
    times = []
    while len(times) < count or (until is not None and not until.is_set()):
        start, start_s = time.perf_counter(), time.monotonic()
        result = client.infer("mobilenet", {"input": x}, plan=plan)
        times.append((time.perf_counter() - start) * 1e3)
        if plans is not None:
            plans.append((start_s, result.plan))
        if until is None and len(times) >= count:
            break
    return times


def summary(times: list[float]) -> dict:
    return {"requests": len(times), "p50_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "max_ms": max(times)}


def phase_table(title: str, phases: dict[str, dict], base: str) -> Table:
    table = Table(title=title)
    for column in ("phase", "live requests", "p50 ms", "p90 ms", "max ms", "p50 vs idle"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, row in phases.items():
        table.add_row(name, str(row["requests"]), f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{row['max_ms']:.1f}", f"{(row['p50_ms'] / phases[base]['p50_ms'] - 1) * 100:+.1f} %")
    return table


def wait_all(address: str, ids: list[str], done: threading.Event, results: dict) -> None:
    """Each request's result as it ends, into ``results`` (a fetched result is
    forgotten soon after: the stream is the one place to read them)."""
    with EdgeClient(address, timeout=900) as watcher:
        for result in watcher.results(ids, deadline=900):
            results[result.id] = result
    done.set()


class Connectivity(threading.Thread):
    """The agent's view of the cloud, read every ``period_s``: (seconds since start, state) at each change."""

    def __init__(self, address: str, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.address, self.period_s = address, period_s
        self.started_at = time.monotonic()
        self.changes: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with EdgeClient(self.address, timeout=10) as client:
            while not self.stop.wait(self.period_s):
                state = client.explain("mobilenet").connectivity
                if not self.changes or self.changes[-1][1] != state:
                    self.changes.append((time.monotonic() - self.started_at, state))

    def first(self, state: str, after_s: float) -> float | None:
        return next((t for t, s in self.changes if s == state and t >= after_s), None)


def loopback(args: argparse.Namespace, models: Path, tmp: Path, console: Console) -> dict:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    port = free_port()
    with launch.edge_agent(models, [f"127.0.0.1:{port}"], "--queue-file", str(tmp / "q.sqlite"),
                           "--refresh-s", "0.5") as agent, EdgeClient(agent.address, timeout=120) as client:
        ids = [client.infer("mobilenet", {"input": x}, plan="remote", defer=True, deliver_by=time.time() + 3600,
                            idempotency_key=f"bench-{i}").id for i in range(args.queued)]
        live(client, x, 10)  # warm
        with console.status("live requests, queue waiting, node down"):
            idle = live(client, x, args.live)
        with launch.cloud_node(models, "--listen", f"127.0.0.1:{port}"):
            drained = threading.Event()
            started = time.perf_counter()
            ended: dict = {}
            watcher = threading.Thread(target=wait_all, args=(agent.address, ids, drained, ended))
            watcher.start()
            with console.status("live requests while the queue drains"):
                during = live(client, x, 1, until=drained)
            watcher.join()
            drain_s = time.perf_counter() - started
            with console.status("live requests, queue empty, node up"):
                after = live(client, x, args.live)
        results = [ended[i] for i in ids]
    phases = {"node down, queue waiting": summary(idle), "queue draining": summary(during),
              "queue empty, node up": summary(after)}
    console.print(phase_table(f"live LOCAL mobilenet while {args.queued} deferred REMOTE requests wait and drain "
                              f"({platform.node()}, {os.cpu_count()} CPUs)", phases, "node down, queue waiting"))
    return {"phases": phases, "drain_s": drain_s, **tally(results, args.queued, console, drain_s)}


def tally(results: list, queued: int, console: Console, drain_s: float, wrong: int = 0) -> dict:
    delivered = sum(r.state == "done" for r in results)
    taken_again = sum(r.attempts > 1 for r in results)
    fell_back = [r.infer.fallback_reason for r in results if r.infer is not None and r.infer.fell_back]
    console.print(f"drained {queued} in {drain_s:.2f} s; delivered {delivered}, lost {queued - delivered}, "
                  f"taken again after a failed attempt {taken_again}, results unlike onnxruntime {wrong}, fell back to the device "
                  f"{len(fell_back)}{': ' if fell_back else ''}{'; '.join(sorted(set(fell_back)))}")
    return {"queued": queued, "delivered": delivered, "lost": queued - delivered, "taken_again": taken_again,
            "wrong": wrong, "fell_back": fell_back}


def node_runs(bed: Testbed, metrics_url: str) -> Counter:
    """RunModel calls the node ended, by outcome, from its own metrics (read inside its namespace)."""
    text = bed.run("cloud", [sys.executable, "-c", "import sys, urllib.request; "
                             "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", metrics_url]).stdout
    runs: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("tandem_requests_total{") and 'method="RunModel"' in line:
            runs[line.partition('outcome="')[2].partition('"')[0]] += round(float(line.rpartition(" ")[2]))
    return runs


def outage(args: argparse.Namespace, models: Path, tmp: Path, console: Console) -> dict:
    reason = netns.available()
    if reason is not None:
        raise SystemExit(f"--outage needs the emulated testbed: {reason}")
    if pinning_available():
        os.sched_setaffinity(0, {EDGE_CPU})  # the app runs on the device
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    inputs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(args.queued)]
    with Testbed(uplink_mbps=args.uplink, downlink_mbps=args.downlink) as bed, contextlib.ExitStack() as stack:
        quota = stack.enter_context(CpuQuota(cpus_like(args.board))) if args.board else None
        deployment = Deployment(bed, models, quota, "--queue-file", str(tmp / "q.sqlite"),
                                "--queue-drain-share", str(args.drain_share),
                                node_args=("--metrics-listen", f"{bed.address('cloud')}:9464"))
        try:
            client, address = deployment.client, deployment.agent.address
            metrics_url = deployment.node.ready["metrics"]
            live(client, x, 10)  # warm
            watch = Connectivity(address)
            watch.start()
            with console.status("link up: live LOCAL, then unpinned"):
                idle = live(client, x, args.live)
                online_plans: list[tuple[float, str]] = []
                online = live(client, x, args.live, plan=None, plans=online_plans)
            runs_before = node_runs(bed, metrics_url)
            bed.set_link(False)
            down_at = time.monotonic() - watch.started_at
            back = threading.Event()
            threading.Timer(args.outage, back.set).start()
            ids = [client.infer("mobilenet", {"input": inputs[i]}, plan="remote", defer=True,
                                deliver_by=time.time() + 3600, idempotency_key=f"outage-{i}").id
                   for i in range(args.queued)]
            again = client.infer("mobilenet", {"input": inputs[0]}, plan="remote", defer=True,
                                 deliver_by=time.time() + 3600, idempotency_key="outage-0")
            plans: list[tuple[float, str]] = []
            with console.status(f"link down {args.outage:.0f} s: deferred submitted, live unpinned"):
                offline_all = live(client, x, 1, until=back, plan=None, plans=plans)
            offline_at = watch.first("offline", down_at)
            bed.set_link(True)
            up_at = time.monotonic() - watch.started_at
            drained = threading.Event()
            ended: dict = {}
            watcher = threading.Thread(target=wait_all, args=(address, ids, drained, ended))
            watcher.start()
            with console.status("link back: live LOCAL while the queue drains"):
                during = live(client, x, 1, until=drained)
            watcher.join()
            drain_s = time.monotonic() - watch.started_at - up_at
            with console.status("queue empty: live LOCAL"):
                after = live(client, x, args.live)
            watch.stop.set()
            runs = node_runs(bed, metrics_url) - runs_before
            results = [ended[i] for i in ids]
        finally:
            deployment.close()
    online_at = watch.first("online", up_at)
    session = ort.InferenceSession(str(models / "mobilenet.onnx"), providers=["CPUExecutionProvider"])
    wrong = sum(not (r.state == "done" and np.allclose(r.infer.outputs["logits"], session.run(["logits"], {"input": i})[0],
                                                       rtol=1e-4, atol=1e-5))
                for r, i in zip(results, inputs))
    # Requests sent once the agent had said it was offline: what a known outage costs.
    known = [ms for ms, (start_s, _) in zip(offline_all, plans)
             if offline_at is not None and start_s - watch.started_at >= offline_at]
    phases = {"link up, queue empty (idle)": summary(idle),
              "link up, unpinned": summary(online),
              "link down, all unpinned": summary(offline_all),
              "link down, once known offline": summary(known or [float("nan")]),
              "link back, queue draining": summary(during),
              "link back, queue empty": summary(after)}
    console.print(phase_table(f"live mobilenet while the link is down {args.outage:.0f} s and {args.queued} deferred "
                              f"REMOTE requests wait, then drain (up {args.uplink} / down {args.downlink} Mbit/s, "
                              f"drain share {args.drain_share}, "
                              f"{platform.node()}{', device like a ' + args.board if args.board else ''})", phases, "link up, queue empty (idle)"))
    detect = None if offline_at is None else offline_at - down_at
    reconnect = None if online_at is None else online_at - up_at
    console.print(f"offline seen {detect if detect is None else round(detect, 2)} s after the link went down; online "
                  f"{reconnect if reconnect is None else round(reconnect, 2)} s after it came back; unpinned plans up: "
                  f"{dict(Counter(plan for _, plan in online_plans))}, down: "
                  f"{dict(Counter(plan for _, plan in plans))}; duplicate idempotency key -> created={again.created}; the node ran "
                  f"RunModel {dict(runs)} (by outcome) for {args.queued} requests")
    return {"phases": phases, "drain_s": drain_s, "offline_detected_s": detect, "online_detected_s": reconnect,
            "plans_while_down": dict(Counter(plan for _, plan in plans)),
            "plans_while_up": dict(Counter(plan for _, plan in online_plans)), "board": args.board, "duplicate_key_created": again.created, "node_runs": dict(runs),
            "connectivity_changes": watch.changes, "outage_s": args.outage, "uplink_mbps": args.uplink,
            "downlink_mbps": args.downlink, "drain_share": args.drain_share, **tally(results, args.queued, console, drain_s, wrong)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=40, help="deferred requests waiting when the node returns")
    parser.add_argument("--live", type=int, default=100, help="live LOCAL requests per steady phase")
    parser.add_argument("--outage", type=float, default=None, help="seconds the emulated link is down (root)")
    parser.add_argument("--uplink", type=float, default=10.0, help="with --outage: uplink Mbit/s")
    parser.add_argument("--downlink", type=float, default=30.0, help="with --outage: downlink Mbit/s")
    parser.add_argument("--drain-share", type=float, default=0.2,
                        help="with --outage: the agent's queue_drain_share (1: no pacing)")
    parser.add_argument("--board", choices=sorted(DEVICES), default=None,
                        help="with --outage: the device under a CPU quota that computes like this board")
    parser.add_argument("--json", type=Path, default=None,
                        help="default bench/results/deferred.json, or deferred_outage.json with --outage")
    args = parser.parse_args()
    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="tandem-deferred-") as tmp_name:
        tmp = Path(tmp_name)
        build_all(tmp / "models", names=["mobilenet"])
        run = outage if args.outage is not None else loopback
        figures = run(args, tmp / "models", tmp, console)
    path = args.json or Path("bench/results") / ("deferred_outage.json" if args.outage else "deferred.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {"node": platform.node(), "cpus": os.cpu_count()}, **figures}, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
