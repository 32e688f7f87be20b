"""How well does scaling a profile predict a slower machine? Measured against a CPU quota.

    python -m bench.roofline [--quotas 0.25 0.5 1.0] [--json bench/results/roofline.json]

For each model and quota q (CPUs), the profile measured here unthrottled is
scaled to a machine with q/cores of this host's compute and memory bandwidth
(`partitioner.work.predict_profile`, floored at the roofline of one core's
fp32 rate times q; a CFS quota limits CPU time, so both shrink together), and
compared with the profile measured for real inside a cgroup with that quota
(`runtimes.profiler.load_or_measure` in a child process run in the group).
Reports the whole-run error and the per-segment MAPE. Needs root and cgroups.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from devices.profiles import HostMeasurement, measure_host
from emulation import CpuQuota, exit_on_sigterm
from emulation import cpu as cpu_emulation
from modelzoo.build import build_all
from partitioner.profile import ModelProfile
from partitioner.work import Machine, concrete_shapes, node_work, predict_profile, segment_work
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import load_or_measure


def measure_in_quota(path: Path, cpus: float | None, cache: Path) -> ModelProfile:
    """The model's profile measured by a child process, inside a quota of ``cpus`` CPUs when given."""
    argv = [sys.executable, "-m", "bench.roofline", "--profile-one", str(path)]
    env = {**os.environ, "TANDEM_CACHE_DIR": str(cache)}
    if cpus is None:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    else:
        with CpuQuota(cpus) as quota:
            out = subprocess.run(quota.wrap(argv), capture_output=True, text=True, env=env, check=True)
    return ModelProfile.from_json(out.stdout)


def quota_machine(host: HostMeasurement, cpus: float) -> Machine:
    """This host held to ``cpus`` CPUs: a CFS quota limits CPU time, so compute and
    bandwidth shrink together. Its compute ceiling is one core's measured fp32 rate
    times the quota: the models run fp32, and a floor at the fp64 figure would sit
    twice too high (FP32_PER_FP64)."""
    return Machine(host.per_core_gflops_fp64 * cpus, host.mem_bandwidth_gbs * cpus / host.cpus, name=f"{cpus} CPU",
                   peak_gflops=host.core.gflops_fp32.best * cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quotas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/roofline.json"))
    parser.add_argument("--profile-one", type=Path, help=argparse.SUPPRESS)  # the child of measure_in_quota
    args = parser.parse_args()
    if args.profile_one:
        print(load_or_measure(OnnxModel(args.profile_one.stem, args.profile_one)).to_json())
        return 0
    exit_on_sigterm()
    reason = cpu_emulation.available()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    console = Console(width=120)
    cores = os.cpu_count() or 1
    host = measure_host()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-roofline-") as tmp:
        paths = build_all(Path(tmp) / "models")
        for name, path in paths.items():
            base = measure_in_quota(path, None, Path(tmp) / "cache-free")
            model = OnnxModel(name, path)
            works = segment_work(model.graph, node_work(model.graph.model, concrete_shapes(model.graph.model)))
            here = Machine(host.gflops_fp64, host.mem_bandwidth_gbs, name="this host")
            for q in args.quotas:
                target = quota_machine(host, q)
                predicted = predict_profile(base, works, here, target)
                measured = measure_in_quota(path, q, Path(tmp) / f"cache-{q}")
                seg_err = [abs(p - m) / m for p, m in zip(predicted.segment_ms, measured.segment_ms) if m > 0]
                rows.append({
                    "model": name, "cpus": q, "measured_ms": measured.whole_ms, "predicted_ms": predicted.whole_ms,
                    "whole_error": (predicted.whole_ms - measured.whole_ms) / measured.whole_ms,
                    "segment_mape": float(np.mean(seg_err)) if seg_err else None,
                })
    table = Table(title=f"roofline-scaled prediction vs measurement under a CPU quota ({platform.node()}, {cores} CPUs)")
    for column in ("model", "quota CPUs", "measured ms", "predicted ms", "whole-run error", "per-segment MAPE"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['cpus']:.2f}", f"{r['measured_ms']:.1f}", f"{r['predicted_ms']:.1f}",
                      f"{r['whole_error']:+.1%}", f"{r['segment_mape']:.1%}" if r["segment_mape"] is not None else "-")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": dataclasses.asdict(host), "rows": rows}, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
