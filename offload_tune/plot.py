"""The sweep as a picture: latency and energy against bandwidth, per plan.

LOCAL, REMOTE and every split chosen somewhere are drawn; the best split at
each bandwidth is a grey envelope; the chosen plan is the thick band; each
break-even point is a dotted vertical line.
"""

from __future__ import annotations

from pathlib import Path


def plot_sweep(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    bandwidths = [p["uplink_mbps"] for p in points]
    chosen_plans = {p["chosen"] for p in points if p["chosen"]}
    shown = ["local", "remote"] + sorted(p for p in chosen_plans if p.startswith("split"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "total_ms", "predicted latency, ms"), (axes[1], "energy_j", "predicted device energy, J")):
        for plan in shown:
            values = [next((c[key] for c in p["candidates"] if c["plan"] == plan), float("nan")) for p in points]
            ax.plot(bandwidths, values, marker="o", markersize=3, label=plan)
        envelope = [min((c[key] for c in p["candidates"] if c["plan"].startswith("split")), default=float("nan"))
                    for p in points]
        ax.plot(bandwidths, envelope, color="grey", linestyle="--", linewidth=1, label="best split")
        picked = [next((c[key] for c in p["candidates"] if c["plan"] == p["chosen"]), float("nan")) for p in points]
        ax.plot(bandwidths, picked, color="black", linewidth=6, alpha=0.18, label="chosen")
        for edge in report["break_even"]:
            ax.axvline(edge["mbps"], color="black", linestyle=":", linewidth=1)
            ax.annotate(f"{edge['mbps']:.3g}", (edge["mbps"], 1), xycoords=("data", "axes fraction"),
                        fontsize=7, ha="left", va="top", rotation=90)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("uplink, Mbit/s")
        ax.set_ylabel(label)
        ax.grid(True, which="both", linewidth=0.3)
    axes[0].legend(fontsize=7)
    a = report["assumptions"]
    fig.suptitle(f"{report['model']} on {a['device']} ({a['objective']} objective, RTT {a['rtt_ms']:.1f} ms); "
                 "dotted: break-even", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
