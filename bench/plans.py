"""Are Tandem's plans right on slow devices and links? A sweep on emulated hardware.

    python -m bench.plans [--bandwidths 0.25 1 5.85 18.88 50 100] [--runs 3] [--edges pi4 pi5 unthrottled]

Bandwidth (Mbit/s, both directions, `tc tbf` between two network namespaces)
x edge CPU (a cgroup quota like a Pi 4, like a Pi 5, or a whole core) x model
(chain, ResNet-style DAG, a detector with an FPN neck, an Inception-style
recogniser; each fed the shape its metadata declares). The device (agent and
this app) and the cloud node each have a core of their own. At each point:

- Tandem plans unpinned and the plausible candidate plans (the `--max-plans`
  predicted fastest, LOCAL, REMOTE and any DAG cut) run for real, pinned, in
  `--runs` interleaved rounds, tensors as int8. Reported: regret (Tandem's
  latency as the app sees it over the best measured plan's), MAPE of the
  prediction against the agent's measured total and against the app's round
  trip, and Tandem's speedup over all-local and all-remote. Plans predicted
  slower than `--max-predicted-s` or `--max-predicted-ratio` times the fastest
  are not run (listed in the JSON).
- DAG cuts: the agent offers every minimum s-t cut that beats the chain at
  all (`dag_min_gain = 0` in its policy); reported is how often one is offered
  and its predicted and measured gain over the best chain split.
- The codec: Tandem's unpinned choice with the codec chosen per plan
  (`max_output_error = --error-budget`) against its choice with each codec
  fixed (raw, fp16, int8); reported is the speedup over the best fixed one.

Needs root, `ip netns` and cgroups. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from edge_agent import sdk
from emulation import CpuQuota, Testbed, exit_on_sigterm, netns
from emulation import cpu as cpu_emulation
from emulation.deployment import EDGE_CPU, Deployment, cpus_like, pinning_available
from modelzoo.build import build_all
from partitioner.shapes import profile_candidates

CODECS = (None, "raw", "fp16", "int8")  # None: chosen per plan within the error budget

# After a rate change the agent gets this long to notice it by itself (it
# probes a link idle for half of it); nothing tells it the new rate.
SETTLE_S = 4.0


@dataclass
class Runs:
    """Timings of one plan at one point: the app's round trip, and the agent's own
    total with the prediction it planned by (both from the reply)."""

    client_ms: list[float] = field(default_factory=list)
    agent_ms: list[float] = field(default_factory=list)
    predicted_ms: list[float] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    fell_back: bool = False

    def add(self, client: sdk.EdgeClient, model: str, x: dict[str, np.ndarray], plan: str | None,
            encoding: str | None = "int8") -> None:
        start = time.perf_counter()
        result = client.infer(model, x, plan=plan, encoding=encoding)
        self.client_ms.append((time.perf_counter() - start) * 1e3)
        self.agent_ms.append(result.measured["total_ms"])
        self.predicted_ms.append(result.predicted["total_ms"])
        self.ran.append(result.planned)
        self.fell_back |= result.fell_back

    def summary(self) -> dict:
        return {"client_ms": statistics.median(self.client_ms), "agent_ms": statistics.median(self.agent_ms),
                "predicted_ms": statistics.median(self.predicted_ms), "ran": Counter(self.ran).most_common(1)[0][0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[0.25, 1.0, 5.85, 18.88, 50.0, 100.0])
    parser.add_argument("--edges", nargs="+", default=["pi4", "pi5", "unthrottled"])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet", "detector", "branchy"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-plans", type=int, default=10, help="run at most this many of the plans predicted fastest "
                        "(LOCAL, REMOTE and DAG cuts besides)")
    parser.add_argument("--error-budget", type=float, default=0.01,
                        help="max_output_error for the per-request codec (share of each output's range)")
    parser.add_argument("--max-predicted-s", type=float, default=4.0)
    parser.add_argument("--max-predicted-ratio", type=float, default=4.0,
                        help="skip plans predicted this many times slower than the fastest prediction")
    parser.add_argument("--json", type=Path, default=Path("bench/results/plans.json"))
    parser.add_argument("--png", type=Path, default=Path("bench/results/plans.png"))
    args = parser.parse_args()
    exit_on_sigterm()
    reason = netns.available() or cpu_emulation.available()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    if pinning_available():
        os.sched_setaffinity(0, {EDGE_CPU})  # the app lives on the device
    console = Console(width=160)
    points = []
    with tempfile.TemporaryDirectory(prefix="tandem-plans-") as tmp_name:
        tmp = Path(tmp_name)
        paths = build_all(tmp / "models", names=args.models)
        inputs = {name: app_inputs(path) for name, path in paths.items()}
        policy = tmp / "policy.toml"
        policy.write_text(f"version = 1\n[default]\nmax_output_error = {args.error_budget}\ndag_min_gain = 0.0\n")
        for edge in args.edges:
            cpus = None if edge == "unthrottled" else cpus_like(edge)
            with Testbed(uplink_mbps=max(args.bandwidths), downlink_mbps=max(args.bandwidths)) as bed, \
                    CpuQuota(cpus or float(os.cpu_count() or 1)) as quota:
                deployment = Deployment(
                    bed, tmp / "models", quota if cpus else None, "--policy", str(policy), "--probe-idle-s", str(SETTLE_S / 2),
                    "--hysteresis-margin", "0", "--cloud-timeout-s", "120", timeout_s=300,
                )
                try:
                    with console.status(f"{edge}: waiting for the agent's start-up measurements"):
                        wait_until_measured(deployment.client)
                    for mbps in sorted(args.bandwidths, reverse=True):
                        bed.set_rate(uplink_mbps=mbps, downlink_mbps=mbps)
                        time.sleep(SETTLE_S)  # the agent's own idle probe measures the new link
                        for model in args.models:
                            with console.status(f"{edge} {mbps} Mbit/s {model}"):
                                points.append(sweep_point(deployment.client, model, inputs[model], edge, cpus, mbps, args))
                finally:
                    deployment.close()
    report(points, console, args)
    return 0


def wait_until_measured(client: sdk.EdgeClient, timeout_s: float = 900.0) -> None:
    """Until the agent lists no background work (codec errors, shapes being
    profiled): on a quarter-core quota it takes minutes, and requests timed
    meanwhile share the device with it."""
    deadline = time.monotonic() + timeout_s
    while busy := {m.name: list(m.background) for m in client.models() if m.background}:
        if time.monotonic() > deadline:
            raise SystemExit(f"the agent is still measuring after {timeout_s:.0f} s: {busy}")
        time.sleep(1.0)


def app_inputs(path: Path) -> dict[str, np.ndarray]:
    """Seeded inputs of the shape the model's app sends (its metadata, else its static shape)."""
    shapes = profile_candidates(onnx.load(str(path)))[0].as_dict()
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def is_dag(plan: str) -> bool:
    return plan.startswith("split:g")


def sweep_point(client: sdk.EdgeClient, model: str, x: dict[str, np.ndarray], edge: str, cpus: float | None, mbps: float,
                args) -> dict:
    """Tandem's choice and every plausible plan, run in interleaved rounds so
    that a slow moment of this shared machine hits all plans alike. Each
    measured run follows an unmeasured one of the same plan: the agent keeps
    a few cut sessions per model, and cycling through dozens of cuts would
    otherwise time session building, which a deployment does once."""
    explanation = client.explain(model, encoding="int8")
    by_plan: dict[str, float] = {}
    for candidate in explanation.candidates:  # a plan's best node
        by_plan[candidate.plan] = min(by_plan.get(candidate.plan, float("inf")), candidate.predicted["total_ms"])
    fastest = min(by_plan.values())
    ranked = sorted(by_plan, key=by_plan.__getitem__)
    wanted = set(ranked[:args.max_plans]) | {"local", "remote"} | {p for p in by_plan if is_dag(p)}
    plans, skipped = [], []
    for plan in ranked:
        predicted = by_plan[plan]
        if plan not in wanted or (plan != "local" and (predicted > args.max_predicted_s * 1e3
                                                       or predicted > args.max_predicted_ratio * fastest)):
            skipped.append(plan)
        else:
            plans.append(plan)
            client.infer(model, x, plan=plan, encoding="int8")  # builds the cut's sessions on both sides
    chosen, pinned = Runs(), {plan: Runs() for plan in plans}
    codecs = {codec: Runs() for codec in CODECS}
    for _ in range(args.runs):
        client.infer(model, x, encoding="int8")
        chosen.add(client, model, x, None)
        for plan in plans:
            client.infer(model, x, plan=plan, encoding="int8")
            pinned[plan].add(client, model, x, plan)
        for codec, runs in codecs.items():
            client.infer(model, x, encoding=codec)
            runs.add(client, model, x, None, encoding=codec)
    measured = {plan: runs.summary() for plan, runs in pinned.items() if not runs.fell_back}
    skipped += [f"{plan} (fell back)" for plan, runs in pinned.items() if runs.fell_back]
    tandem = chosen.summary()
    best = min(measured, key=lambda plan: measured[plan]["client_ms"])

    def mape(key: str) -> float:
        return float(np.mean([abs(m["predicted_ms"] - m[key]) / m[key] for m in measured.values()]))

    chain = [p for p in measured if p.startswith("split:") and not is_dag(p)]
    dags = [p for p in measured if is_dag(p)]
    dag = None
    if dags and chain:
        best_dag = min(dags, key=lambda p: by_plan[p])
        best_chain = min((p for p in by_plan if p.startswith("split:") and not is_dag(p)), key=by_plan.__getitem__)
        dag = {"plan": best_dag, "predicted_ms": by_plan[best_dag], "chain_plan": best_chain,
               "chain_predicted_ms": by_plan[best_chain], "predicted_gain": 1 - by_plan[best_dag] / by_plan[best_chain],
               "measured_ms": measured[best_dag]["client_ms"],
               "chain_measured_ms": measured.get(best_chain, {}).get("client_ms"),
               "measured_gain": (1 - measured[best_dag]["client_ms"] / measured[best_chain]["client_ms"])
               if best_chain in measured else None}
    codec_ms = {str(codec): runs.summary() for codec, runs in codecs.items() if not runs.fell_back}
    fixed = [codec_ms[c]["client_ms"] for c in ("raw", "fp16", "int8") if c in codec_ms]
    codec = {"by_codec": codec_ms,
             "speedup_over_best_fixed": min(fixed) / codec_ms["None"]["client_ms"] if fixed and "None" in codec_ms else None}
    return {
        "edge": edge, "cpus": cpus, "uplink_mbps": mbps, "model": model, "chosen": tandem["ran"],
        "chosen_ms": tandem["client_ms"], "best_plan": best, "best_ms": measured[best]["client_ms"],
        "regret": tandem["client_ms"] / measured[best]["client_ms"],
        "mape": mape("agent_ms"), "mape_client": mape("client_ms"),
        "local_ms": measured.get("local", {}).get("client_ms"), "remote_ms": measured.get("remote", {}).get("client_ms"),
        "measured": measured, "skipped": skipped, "link_estimate": explanation.link,
        "calibration": client.explain(model).calibration, "dag": dag, "codec": codec,
    }


def report(points: list[dict], console: Console, args) -> None:
    table = Table(title=f"plans on emulated devices and links ({platform.node()}, int8 tensors, median of {args.runs})")
    for column in ("edge", "Mbit/s", "model", "Tandem", "ms", "best measured", "ms", "regret", "MAPE agent",
                   "MAPE app", "vs local", "vs remote"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(p["edge"], f"{p['uplink_mbps']:g}", p["model"], p["chosen"], f"{p['chosen_ms']:.1f}",
                      p["best_plan"], f"{p['best_ms']:.1f}", f"{p['regret']:.2f}", f"{p['mape']:.0%}", f"{p['mape_client']:.0%}",
                      f"{p['local_ms'] / p['chosen_ms']:.2f}x" if p["local_ms"] else "-",
                      f"{p['remote_ms'] / p['chosen_ms']:.2f}x" if p["remote_ms"] else "-")
    console.print(table)
    regrets = [p["regret"] for p in points]
    mapes = [p["mape"] for p in points]
    client_mapes = [p["mape_client"] for p in points]
    summary = {"regret_median": statistics.median(regrets), "regret_worst": max(regrets),
               "mape_median": statistics.median(mapes), "mape_mean": statistics.mean(mapes),
               "mape_client_mean": statistics.mean(client_mapes)}
    console.print(f"regret median {summary['regret_median']:.3f} (target <= 1.05), worst {summary['regret_worst']:.3f} "
                  f"(target <= 1.2); prediction MAPE mean {summary['mape_mean']:.0%} against the agent's total, "
                  f"{summary['mape_client_mean']:.0%} against the app's round trip (target <= 15 %)")
    dag_points = [p for p in points if p["dag"]]
    dag_table = Table(title=f"DAG min-cut against the best chain split: offered at {len(dag_points)} of {len(points)} points")
    for column in ("edge", "Mbit/s", "model", "DAG cut", "predicted ms", "chain", "predicted ms", "gain predicted",
                   "measured ms", "chain measured ms", "gain measured"):
        dag_table.add_column(column, justify="right")
    for p in dag_points:
        d = p["dag"]
        dag_table.add_row(p["edge"], f"{p['uplink_mbps']:g}", p["model"], d["plan"][:14], f"{d['predicted_ms']:.1f}",
                          d["chain_plan"], f"{d['chain_predicted_ms']:.1f}", f"{d['predicted_gain']:.1%}",
                          f"{d['measured_ms']:.1f}", f"{d['chain_measured_ms']:.1f}" if d["chain_measured_ms"] else "-",
                          f"{d['measured_gain']:.1%}" if d["measured_gain"] is not None else "-")
    console.print(dag_table)
    codec_table = Table(title=f"codec chosen per plan (max_output_error {args.error_budget:g}) against each codec fixed: "
                              "Tandem's own plan, app round trip ms")
    for column in ("edge", "Mbit/s", "model", "per plan", "raw", "fp16", "int8", "speedup over best fixed"):
        codec_table.add_column(column, justify="right")
    for p in points:
        c = p["codec"]["by_codec"]

        def cell(key: str) -> str:
            return f"{c[key]['client_ms']:.1f} ({c[key]['ran']})" if key in c else "-"

        speedup = p["codec"]["speedup_over_best_fixed"]
        codec_table.add_row(p["edge"], f"{p['uplink_mbps']:g}", p["model"], cell("None"), cell("raw"), cell("fp16"),
                            cell("int8"), f"{speedup:.2f}x" if speedup else "-")
    console.print(codec_table)
    for mbps in (5.85, 18.88):
        at = [p["codec"]["speedup_over_best_fixed"] for p in points if p["uplink_mbps"] == mbps and p["codec"]["speedup_over_best_fixed"]]
        if at:
            summary[f"codec_speedup_median_{mbps:g}"] = statistics.median(at)
            console.print(f"adaptive codec at {mbps:g} Mbit/s: median speedup over the best fixed codec "
                          f"{statistics.median(at):.2f}x (min {min(at):.2f}x, max {max(at):.2f}x, {len(at)} points)")
    summary["dag_offered"] = f"{len(dag_points)} of {len(points)}"
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
