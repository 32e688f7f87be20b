"""What planning one request costs, against the number of cuts and of nodes.

    python -m bench.decide [--cuts 25 100 300 1000] [--nodes 1 4 16 64] [--repeats 7] [--codecs]

Per request the agent plans, then picks with hysteresis, shares the load
among equal nodes and lists the nodes to retry on. Both ways, side by side in
one run, in-process, on seeded synthetic profiles (a chain with n cut points,
every node with its own link and queue, a calibration learned from requests;
with ``--codecs`` also fp16 and int8 chosen per request, as under a
``max_output_error`` policy):

- "objects": the path the agent took until issue 16: the calibrated
  ModelCosts and one CloudOption per node built for the request, then
  ``costmodel.choose`` (one Candidate per node and cut);
- "arrays": ``plan_table.PlanTable``, built once per profile and policy, then
  per request ``PlanTable.choose`` over (node x cut) in numpy.

Each cell is the median over the requests of one run (each request with new
queues and calibration, as live requests see), the min of ``--repeats`` runs.
Every decision of the two is compared (winner, node, reason) and the run
fails if any differs. Then the DAG min-cut (``partitioner.mincut.solve``) on
seeded DAGs of 100-1,000 nodes with skip connections. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from partitioner.calibration import Calibration
from partitioner.costmodel import CloudOption, CodecOption, Constraints, Link, ModelCosts, Power, Transfer, choose
from partitioner.hysteresis import hold_or_switch, share_load
from partitioner.mincut import CutProblem, Tensor, solve
from partitioner.plan_table import Calibrated, NodeNow, NodeSegments, PlanTable

REQUESTS = 40          # requests timed per run (each with its own queues and calibration)
POWER = Power(active_w=6.4, idle_w=2.7, radio_alpha_w_per_mbps=0.05, radio_beta_w=0.4)
CONSTRAINTS = Constraints(slo_ms=400.0, memory_limit_bytes=3 * 2**30)


@dataclass
class Setting:
    """One synthetic deployment: a model of n cut points and m nodes."""

    costs: ModelCosts
    profiles: list[NodeSegments]
    requests: list[tuple[Calibration, list[NodeNow]]]
    codecs: list[CodecOption]


def setting(cuts: int, nodes: int, seed: int, codecs: bool = False) -> Setting:
    rng = random.Random(seed)
    n = cuts + 1  # segments: a cut after each of the first n - 1
    sizes = [int(600_000 * 0.995**k * rng.uniform(0.5, 1.5)) for k in range(n)]
    costs = ModelCosts(
        edge_segment_ms=tuple(rng.uniform(0.05, 1.0) for _ in range(n)), edge_overhead_ms=0.2,
        crossings=tuple(Transfer(b, b / 4e5, b / 5e5) for b in sizes), output=Transfer(4_000, 0.01, 0.01),
        edge_memory_bytes=tuple(range(0, 2_000_000 * (n + 1), 2_000_000)))
    profiles = [NodeSegments(f"10.0.0.{i}:50051", tuple(rng.uniform(0.005, 0.1) for _ in range(n)), 0.3)
                for i in range(nodes)]
    links = {p.node: Link(rng.uniform(5, 100), rng.uniform(20, 200), rng.uniform(2, 40)) for p in profiles}
    requests = []
    for _ in range(REQUESTS):
        order = rng.sample(profiles, len(profiles))  # the agent lists the least busy node first
        calibration = Calibration(edge_factor=rng.uniform(0.9, 1.1), offload_ms=rng.uniform(0, 0.5), samples=20,
                                  request_ms=rng.uniform(0.1, 0.3))
        requests.append((calibration, [NodeNow(p.node, links[p.node], rng.uniform(0, 5)) for p in order]))
    lossy = [CodecOption(name, encoding, tuple(Transfer(int(b * shrink), b / 8e5, b / 9e5) for b in sizes),
                         tuple(rng.uniform(0, 0.02) for _ in range(n)), frozenset(k for k in range(n) if rng.random() < 0.8))
             for name, encoding, shrink in (("fp16", 2, 0.5), ("int8", 3, 0.25))] if codecs else []
    return Setting(costs, profiles, requests, lossy)


def objects_path(s: Setting, calibration: Calibration, nodes: list[NodeNow], current: str | None):
    segments = {p.node: p for p in s.profiles}
    clouds = [CloudOption(now.node, now.link, now.queue_ms, segments[now.node].segment_ms, segments[now.node].overhead_ms)
              for now in nodes]
    codecs = [replace(c, crossings=calibration.sent(c.crossings)) for c in s.codecs]
    decision = choose(calibration.apply(s.costs), clouds, POWER, constraints=CONSTRAINTS, codecs=codecs,
                      keep=frozenset({current}) if current else frozenset())
    return decision, *after(decision, current)


def arrays_path(table: PlanTable, calibration: Calibration, nodes: list[NodeNow], current: str | None):
    decision = table.choose(Calibrated(calibration.edge_factor, calibration.offload_ms, calibration.request_ms), nodes,
                            POWER, keep=frozenset({current}) if current else frozenset())
    return decision, *after(decision, current)


def after(decision, current: str | None):
    """What the agent does with a decision on every request (server._pick, share_load, _attempts)."""
    held = hold_or_switch(decision, current, margin=0.05)
    chosen = share_load(decision, held.candidate, {}) if held.candidate else None
    retry = sorted((c for c in decision.plans(chosen.label) if c.node != chosen.node and c.feasible),
                   key=lambda c: c.score)[:1] if chosen else []
    return held, chosen, retry


def time_requests(s: Setting, path, first) -> tuple[float, list]:
    """Median ms per request over one run, and what each request decided."""
    times, seen, current = [], [], None
    for calibration, nodes in s.requests:
        start = time.perf_counter()
        decision, held, chosen, retry = path(first, calibration, nodes, current)
        times.append((time.perf_counter() - start) * 1e3)
        current = chosen.label if chosen else None
        seen.append((decision.why, held.why, current, chosen.node if chosen else None, [c.node for c in retry]))
    return statistics.median(times), seen


def dag_problem(n: int, seed: int) -> CutProblem:
    """A chain of n nodes with seeded skip connections (a ResNet/FPN-like DAG)."""
    rng = random.Random(seed)
    names = [f"v{i}" for i in range(n)]
    readers: dict[str, set[str]] = {"x": {names[0]}}
    for i, v in enumerate(names[:-1]):
        readers[v] = {names[i + 1]} | ({names[min(n - 1, i + rng.randint(2, 8))]} if rng.random() < 0.25 else set())
    tensors = (Tensor("x", None, tuple(readers["x"]), 40.0),
               *(Tensor(v, v, tuple(sorted(readers.get(v, ()))), rng.uniform(1, 40), 0.5 if v == names[-1] else 0.0)
                 for v in names))
    return CutProblem(tuple(names), {v: rng.uniform(0.05, 1.0) for v in names}, {v: 0.02 for v in names}, tensors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, nargs="+", default=[25, 100, 300, 1000])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dag-nodes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--codecs", action="store_true", help="the codec chosen per request: fp16 and int8 besides raw")
    parser.add_argument("--json", type=Path, default=Path("bench/results/decide.json"))
    args = parser.parse_args()
    console = Console(width=160)
    cells, differing = [], 0
    with console.status("planning") as status:
        for cuts in args.cuts:
            for nodes in args.nodes:
                status.update(f"{cuts} cut points, {nodes} nodes")
                s = setting(cuts, nodes, seed=cuts * 100 + nodes, codecs=args.codecs)
                start = time.perf_counter()
                table = PlanTable(s.costs, s.profiles, CONSTRAINTS, s.codecs)
                build_ms = (time.perf_counter() - start) * 1e3
                old = [time_requests(s, objects_path, s)
                       for _ in range(args.repeats)]
                new = [time_requests(s, arrays_path, table) for _ in range(args.repeats)]
                same = old[0][1] == new[0][1]
                differing += not same
                cells.append({"cuts": cuts, "nodes": nodes, "objects_ms": min(t for t, _ in old),
                              "arrays_ms": min(t for t, _ in new), "table_build_ms": build_ms,
                              "requests": REQUESTS, "same_decisions": same})
    codecs = ", codec per request (raw, fp16, int8)" if args.codecs else ""
    table_view = Table(title=f"planning one request, ms ({platform.node()}{codecs}; median of {REQUESTS} requests, "
                             f"min of {args.repeats} runs): objects (costmodel.choose) / arrays (PlanTable)")
    table_view.add_column("cut points", justify="right")
    for nodes in args.nodes:
        table_view.add_column(f"{nodes} node{'s' * (nodes > 1)}", justify="right")
    for cuts in args.cuts:
        row = {c["nodes"]: c for c in cells if c["cuts"] == cuts}
        table_view.add_row(str(cuts), *(f"{row[m]['objects_ms']:.3g} / {row[m]['arrays_ms']:.3g}" for m in args.nodes))
    console.print(table_view)
    console.print("PlanTable built once per profile and policy: "
                  + ", ".join(f"{c['cuts']}x{c['nodes']} {c['table_build_ms']:.2g} ms" for c in cells))
    dags = []
    for n in args.dag_nodes:
        problem = dag_problem(n, seed=n)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            solve(problem)
            times.append((time.perf_counter() - start) * 1e3)
        dags.append({"nodes": n, "solve_ms": min(times), "median_ms": statistics.median(times)})
    console.print("DAG min-cut (mincut.solve, min / median of runs): "
                  + ", ".join(f"{d['nodes']} nodes {d['solve_ms']:.2f} / {d['median_ms']:.2f} ms" for d in dags))
    console.print("decisions identical in every cell" if not differing else f"[red]{differing} cells decided differently")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": platform.node(), "codecs": args.codecs, "cells": cells, "mincut": dags},
                                    indent=2))
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
