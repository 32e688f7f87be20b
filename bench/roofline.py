"""How well does scaling a profile predict a slower machine? Measured against a CPU quota.

    python -m bench.roofline [--quotas 0.25 0.5 1.0] [--json bench/results/roofline.json]

For each model and quota q (CPUs), the profile measured here unthrottled is
scaled to a machine with q/cores of this host's compute and memory bandwidth
(`partitioner.work.predict_profile`; a CFS quota limits CPU time, so both
shrink together), and compared with the profile measured for real inside a
cgroup with that quota (`offload-tune profile --json` run in the group).
Reports the whole-run error and the per-segment MAPE. Needs root and cgroups.
"""

from __future__ import annotations

import argparse
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

from devices.profiles import measure_host
from emulation import CpuQuota, exit_on_sigterm
from emulation import cpu as cpu_emulation
from modelzoo.build import build_all
from partitioner.profile import ModelProfile
from partitioner.work import Machine, concrete_shapes, node_work, predict_profile, segment_work
from runtimes.onnx_exec import OnnxModel


def measure_in_quota(path: Path, cpus: float | None, cache: Path) -> ModelProfile:
    argv = [sys.executable, "-m", "offload_tune.cli", "profile", str(path), "--json"]
    env = {**os.environ, "TANDEM_CACHE_DIR": str(cache)}
    if cpus is None:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    else:
        with CpuQuota(cpus) as quota:
            out = subprocess.run(quota.wrap(argv), capture_output=True, text=True, env=env, check=True)
    return ModelProfile.from_json(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quotas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/roofline.json"))
    args = parser.parse_args()
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
                target = Machine(host.gflops_fp64 * q / cores, host.mem_bandwidth_gbs * q / cores, name=f"{q} CPU")
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
    args.json.write_text(json.dumps({"host": host.__dict__, "rows": rows}, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
