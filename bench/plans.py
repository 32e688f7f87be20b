"""Are Tandem's plans right on slow devices and links? A sweep on emulated hardware.

    python -m bench.plans [--bandwidths 0.25 1 5.85 18.88 50 100] [--runs 3]

Bandwidth (Mbit/s, both directions, `tc tbf` between two network namespaces)
x edge CPU (a cgroup quota like a Pi 4, like a Pi 5, or none) x model (chain,
DAG). At each point the agent plans unpinned (Tandem's choice) and every
candidate plan is run for real, pinned, `--runs` times: regret (Tandem's
measured latency over the best measured plan's), MAPE of predicted vs
measured latency, and Tandem's speedup over all-local and all-remote. Plans
predicted to take longer than `--max-predicted-s` are not run (said in the
JSON): at 0.25 Mbit/s an early cut would take tens of seconds per request.
Tensors travel int8 (the codec's documented error), as a deployment on such
links would. Needs root, `ip netns` and cgroups. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent import sdk
from emulation import CpuQuota, Testbed, exit_on_sigterm, netns
from emulation import cpu as cpu_emulation
from emulation.deployment import Deployment, cpus_like
from modelzoo.build import build_all

# After a rate change the agent gets this long to notice it by itself (it
# probes a link idle for half of it); nothing tells it the new rate.
SETTLE_S = 4.0


def measure(client: sdk.EdgeClient, model: str, x: np.ndarray, plan: str | None, runs: int) -> tuple[float | None, str]:
    """Median latency of ``plan`` (None: Tandem's choice) and the plan that ran;
    None when a pinned plan fell back (it was not measured)."""
    times, ran = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        result = client.infer(model, {"input": x}, plan=plan)
        times.append((time.perf_counter() - start) * 1e3)
        ran = result.planned
        if plan is not None and result.fell_back:
            return None, ran
    return statistics.median(times), ran


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[0.25, 1.0, 5.85, 18.88, 50.0, 100.0])
    parser.add_argument("--edges", nargs="+", default=["pi4", "pi5", "unthrottled"])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-predicted-s", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/plans.json"))
    parser.add_argument("--png", type=Path, default=Path("bench/results/plans.png"))
    args = parser.parse_args()
    exit_on_sigterm()
    reason = netns.available() or cpu_emulation.available()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    console = Console(width=130)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    points = []
    with tempfile.TemporaryDirectory(prefix="tandem-plans-") as tmp_name:
        tmp = Path(tmp_name)
        build_all(tmp / "models")
        for edge in args.edges:
            cpus = None if edge == "unthrottled" else cpus_like(edge)
            with Testbed(uplink_mbps=max(args.bandwidths), downlink_mbps=max(args.bandwidths)) as bed, \
                    CpuQuota(cpus or float(os.cpu_count() or 1)) as quota:
                deployment = Deployment(
                    bed, tmp / "models", quota if cpus else None, "--encoding", "int8", "--probe-idle-s", str(SETTLE_S / 2),
                    "--hysteresis-margin", "0", "--cloud-timeout-s", "120", timeout_s=300,
                )
                try:
                    for mbps in sorted(args.bandwidths, reverse=True):
                        bed.set_rate(uplink_mbps=mbps, downlink_mbps=mbps)
                        time.sleep(SETTLE_S)  # the agent's own idle probe measures the new link
                        for model in args.models:
                            with console.status(f"{edge} {mbps} Mbit/s {model}"):
                                points.append(sweep_point(deployment.client, model, x, edge, cpus, mbps, args))
                finally:
                    deployment.close()
    report(points, console, args)
    return 0


def sweep_point(client: sdk.EdgeClient, model: str, x: np.ndarray, edge: str, cpus: float | None, mbps: float, args) -> dict:
    explanation = client.explain(model)
    chosen_ms, chosen = measure(client, model, x, None, args.runs)
    measured, skipped = {}, []
    for candidate in explanation.candidates:
        if candidate.predicted["total_ms"] > args.max_predicted_s * 1e3 and candidate.plan not in ("local", chosen):
            skipped.append(candidate.plan)
            continue
        client.infer(model, {"input": x}, plan=candidate.plan)  # builds the cut's sessions on both sides
        ms = measure(client, model, x, candidate.plan, args.runs)[0]
        if ms is None:
            skipped.append(f"{candidate.plan} (fell back)")
        else:
            measured[candidate.plan] = ms
    predicted = {c.plan: c.predicted["total_ms"] for c in explanation.candidates}
    best = min(measured.values())
    errors = [abs(predicted[p] - m) / m for p, m in measured.items()]
    return {
        "edge": edge, "cpus": cpus, "uplink_mbps": mbps, "model": model, "chosen": chosen, "chosen_ms": chosen_ms,
        "best_plan": min(measured, key=measured.get), "best_ms": best, "regret": chosen_ms / best,
        "mape": float(np.mean(errors)), "local_ms": measured.get("local"), "remote_ms": measured.get("remote"),
        "measured": measured, "predicted": predicted, "skipped": skipped, "link_estimate": explanation.link,
        "predicted_stages": {c.plan: c.predicted for c in explanation.candidates if c.plan in ("local", "remote", chosen)},
    }


def report(points: list[dict], console: Console, args) -> None:
    table = Table(title=f"plans on emulated devices and links ({platform.node()}, int8 tensors, median of {args.runs})")
    for column in ("edge", "Mbit/s", "model", "Tandem", "ms", "best measured", "ms", "regret", "MAPE",
                   "vs local", "vs remote"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(p["edge"], f"{p['uplink_mbps']:g}", p["model"], p["chosen"], f"{p['chosen_ms']:.1f}",
                      p["best_plan"], f"{p['best_ms']:.1f}", f"{p['regret']:.2f}", f"{p['mape']:.0%}",
                      f"{p['local_ms'] / p['chosen_ms']:.2f}x" if p["local_ms"] else "-",
                      f"{p['remote_ms'] / p['chosen_ms']:.2f}x" if p["remote_ms"] else "-")
    console.print(table)
    regrets = [p["regret"] for p in points]
    mapes = [p["mape"] for p in points]
    summary = {"regret_median": statistics.median(regrets), "regret_worst": max(regrets),
               "mape_median": statistics.median(mapes), "mape_mean": statistics.mean(mapes)}
    console.print(f"regret median {summary['regret_median']:.3f} (target <= 1.05), worst {summary['regret_worst']:.3f} "
                  f"(target <= 1.2); prediction MAPE mean {summary['mape_mean']:.0%} (target <= 15 %)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "points": points}, indent=2))
    plot(points, args.png)
    console.print(f"wrote {args.json} and {args.png}")


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = sorted({p["edge"] for p in points})
    models = sorted({p["model"] for p in points})
    fig, axes = plt.subplots(len(models), len(edges), figsize=(5 * len(edges), 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col, edge in enumerate(edges):
            ax = axes[row][col]
            series = sorted((p for p in points if p["model"] == model and p["edge"] == edge), key=lambda p: p["uplink_mbps"])
            bw = [p["uplink_mbps"] for p in series]
            for key, label, style in (("local_ms", "all local", "--"), ("remote_ms", "all remote", ":"),
                                      ("chosen_ms", "Tandem", "-"), ("best_ms", "best measured", "-.")):
                ax.plot(bw, [p[key] if p[key] else np.nan for p in series], style, marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{model}, edge {edge}")
            ax.set_xlabel("uplink Mbit/s")
            ax.set_ylabel("latency ms (measured)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
