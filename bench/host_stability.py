"""Does a board prediction hold when the machine is busy? The host speed figure under load.

    python -m bench.host_stability [--model mobilenet] [--device pi4] [--samples 5]
                                   [--json bench/results/host_stability.json]

Every `--device` prediction and the emulation's `cpus_like` quota scale from
this host's own speed figure (`devices.profiles.measure_host`), so a figure
that load moves moves every plan. Measured here:

1. Fresh processes: `offload-tune explain MODEL --device DEVICE --json`
   (in-process, through `offload_tune.cli.main`), each run a new process with
   its own empty Tandem cache before run 1; runs 2 and 3 with every core kept
   busy by spinning processes started (and killed) here. Reported per run: the
   LOCAL prediction, the same before any floor (roofline-scaled host time) and
   with the fp32 compute ceiling as its floor, the model's host time and the
   host figures the run read. Three series: nothing cleared between runs; the
   host speed file deleted before each run (every process measures the host,
   busy ones under load); the whole cache deleted (the model profile, which
   `runtimes.profiler` times in wall time, re-measured too).
2. The uncached measurement, `--samples` times idle and busy: the CPU-time
   per-core figure Tandem uses, against the wall-clock whole-CPU figure it
   replaced (best of wall-timed matmuls with every BLAS thread).

And the whole model's floor on the board (FLOPs over the compute figure, bytes
over the bandwidth), which no prediction may beat.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from devices.profiles import DEVICES, core_speed_file, measure_core_speed
from emulation import exit_on_sigterm
from modelzoo.build import build_all
from partitioner.graph import analyze
from partitioner.work import Machine, Work, concrete_shapes, floor_ms, node_work, predict_profile, scaled_segment_ms
from runtimes.onnx_exec import OnnxModel

BUSY_RUNS = (2, 3)  # 1-based: which fresh-process runs have every core busy
BANDWIDTH_MBPS = 10.0  # explain needs a link; LOCAL does not depend on it
SPIN_LIMIT_S = 600  # spinners stop by themselves after this, should this process die first

SPINNER = f"""
import time
deadline = time.monotonic() + {SPIN_LIMIT_S}
print("spinning", flush=True)
while time.monotonic() < deadline:
    pass
"""


@contextlib.contextmanager
def all_cores_busy(busy: bool = True) -> Iterator[list[subprocess.Popen]]:
    """One busy-looping process per CPU for the body, each spinning before it starts
    (none when not ``busy``); yields them, so a caller can check they still run."""
    if not busy:
        yield []
        return
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
                for _ in range(os.cpu_count() or 1)]
    try:
        for spinner in spinners:
            if spinner.stdout is None or spinner.stdout.readline().strip() != "spinning":
                raise RuntimeError("a spinner did not start")
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def one_run(model: Path, device: str) -> dict:
    """In a fresh process: what `offload-tune explain` predicts, the host figure it planned with,
    and the same prediction unbounded and with the fp32 compute ceiling as its floor."""
    from devices.profiles import measure_host
    from offload_tune import cli
    from offload_tune.scenario import profile_board

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = cli.main(["explain", str(model), "--device", device, "--bandwidth", str(BANDWIDTH_MBPS), "--json"])
    if code != 0:
        raise RuntimeError(f"offload-tune explain exited {code}")
    report = json.loads(captured.getvalue())
    local = next(c for c in report["candidates"] if c["plan"].lower() == "local")
    # Both from this process's caches: the profile explain used, the lru-cached host figure it scaled by.
    board = profile_board(OnnxModel(model.stem, model), DEVICES[device])
    host = measure_host()
    here = Machine(host.gflops_fp64, host.mem_bandwidth_gbs, name="this host")
    target = DEVICES[device]
    fp32_ceiling = Machine(target.cpu_gflops, target.mem_bandwidth_gbs, name=device, peak_gflops=target.cpu_gflops_fp32)
    overhead_ms = board.measured.run_overhead_ms * here.gflops / target.cpu_gflops
    return {
        "local_ms": local["total_ms"], "host_model_ms": board.measured.whole_ms,
        "unbounded_ms": sum(scaled_segment_ms(board.measured.segment_ms, board.works, here, fp32_ceiling)) + overhead_ms,
        "fp32_floor_ms": predict_profile(board.measured, board.works, here, fp32_ceiling).whole_ms,
        "host_gflops_fp64": host.gflops_fp64, "per_core_gflops_fp64": host.per_core_gflops_fp64,
        "per_core_median_gflops_fp64": host.core.gflops_fp64.median, "samples": host.core.gflops_fp64.samples,
        "host_mem_bandwidth_gbs": host.mem_bandwidth_gbs, "cpus": host.cpus, "host_figure_cached": host.cached,
    }


# What each series deletes from its cache directory before every run (the first run always starts empty).
CLEARED_EACH_RUN = {
    "cached": "nothing: later runs reuse the host figure and the model profile of run 1",
    "host_remeasured": "the host speed file: every process measures the host itself, busy ones under load",
    "all_remeasured": "the whole cache: the model's profile (wall-time, runtimes.profiler) too",
}


def fresh_runs(model: Path, device: str, cache: Path, series: str) -> list[dict]:
    rows = []
    for run in range(1, 5):
        if series == "host_remeasured":
            core_speed_file(cache).unlink(missing_ok=True)
        elif series == "all_remeasured":
            shutil.rmtree(cache, ignore_errors=True)
        busy = run in BUSY_RUNS
        argv = [sys.executable, "-m", "bench.host_stability", "--one-run", str(model), "--device", device]
        with all_cores_busy(busy):
            out = subprocess.run(argv, capture_output=True, text=True, check=True,
                                 env={**os.environ, "TANDEM_CACHE_DIR": str(cache)})
        rows.append({"run": run, "busy": busy, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def wall_clock_whole_cpu_gflops(seconds: float = 0.5) -> float:
    """The figure Tandem used before: best wall-timed float64 matmul with every BLAS thread."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)), rng.standard_normal((512, 512))
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds / 3  # the old default gave each figure a third of 0.5 s
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 512**3 / (time.perf_counter() - start) / 1e9)
    return best


def uncached_spread(samples: int) -> dict[str, dict[str, list[float]]]:
    result: dict[str, dict[str, list[float]]] = {}
    for condition in ("idle", "busy"):
        per_core, wall = [], []
        with all_cores_busy(condition == "busy"):
            for _ in range(samples):
                per_core.append(measure_core_speed(seconds=0.5).gflops_fp64.best)
                wall.append(wall_clock_whole_cpu_gflops())
        result[condition] = {"per_core_cpu_time_gflops_fp64": per_core, "wall_clock_whole_cpu_gflops_fp64": wall}
    return result


def model_floors_ms(model: Path, device: str) -> dict[str, float]:
    """The whole model's floor on the board: at its fp64 HPL figure, and at the fp32 ceiling."""
    graph = analyze(onnx.load(model))
    total = sum(node_work(graph.model, concrete_shapes(graph.model)).values(), Work(0.0, 0.0))
    board = DEVICES[device]
    return {
        "gflops": total.flops / 1e9,
        "fp64_figure": floor_ms(total, Machine(board.cpu_gflops, board.mem_bandwidth_gbs)),
        "fp32_ceiling": floor_ms(total, Machine(board.cpu_gflops, board.mem_bandwidth_gbs,
                                                peak_gflops=board.cpu_gflops_fp32)),
    }


def agreement(values: list[float]) -> float:
    """Largest over smallest, minus one: 0.15 means every value within 15 % of every other."""
    return max(values) / min(values) - 1


def print_runs(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in ("run", "cores", "LOCAL ms", "unbounded ms", "fp32-floor ms", "host model ms",
                   "host GFLOPS fp64", "per core (median)", "GB/s", "host figure"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["run"]), "busy" if r["busy"] else "idle", f"{r['local_ms']:.2f}", f"{r['unbounded_ms']:.2f}",
                      f"{r['fp32_floor_ms']:.2f}", f"{r['host_model_ms']:.2f}", f"{r['host_gflops_fp64']:.1f}",
                      f"{r['per_core_gflops_fp64']:.1f} ({r['per_core_median_gflops_fp64']:.1f})",
                      f"{r['host_mem_bandwidth_gbs']:.1f}", "cached" if r["host_figure_cached"] else "measured")
    console.print(table)
    console.print("agreement (max/min - 1): " + ", ".join(
        f"{key} {agreement([r[key] for r in rows]):.1%}" for key in ("local_ms", "unbounded_ms", "fp32_floor_ms")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet")
    parser.add_argument("--device", default="pi4", choices=sorted(DEVICES))
    parser.add_argument("--samples", type=int, default=5, help="uncached measurements per condition")
    parser.add_argument("--json", type=Path, default=Path("bench/results/host_stability.json"))
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)  # the child process of a fresh run
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.one_run, args.device)))
        return 0
    exit_on_sigterm()
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="tandem-host-stability-") as tmp:
        model = build_all(Path(tmp) / "models", names=[args.model])[args.model]
        floors = model_floors_ms(model, args.device)
        series = {name: fresh_runs(model, args.device, Path(tmp) / f"cache-{name}", name) for name in CLEARED_EACH_RUN}
    spread = uncached_spread(args.samples)

    where = f"{platform.node()}, {os.cpu_count()} CPUs"
    for name, rows in series.items():
        print_runs(console, f"{args.model} LOCAL on {args.device}, 4 fresh processes (runs {BUSY_RUNS} busy), "
                            f"cleared before each run: {CLEARED_EACH_RUN[name]} ({where})", rows)
    console.print(f"{args.model} ({floors['gflops']:.2f} GFLOP) floor on {args.device}: {floors['fp64_figure']:.1f} ms "
                  f"at its {DEVICES[args.device].cpu_gflops} GFLOPS fp64 figure, {floors['fp32_ceiling']:.1f} ms "
                  f"at the fp32 ceiling; LOCAL ms uses the first (runtimes.profiler.predicted_for), fp32-floor ms "
                  f"the second; unbounded ms is the roofline-scaled host time before any floor")
    table = Table(title=f"uncached host measurement, {args.samples} runs each ({where})")
    for column in ("figure", "cores", "min", "median", "max", "max/min - 1"):
        table.add_column(column, justify="right")
    for condition, figures in spread.items():
        for name, values in figures.items():
            table.add_row(name, condition, f"{min(values):.1f}", f"{statistics.median(values):.1f}",
                          f"{max(values):.1f}", f"{agreement(values):.1%}")
    console.print(table)
    for name in ("per_core_cpu_time_gflops_fp64", "wall_clock_whole_cpu_gflops_fp64"):
        busy_over_idle = statistics.median(spread["busy"][name]) / statistics.median(spread["idle"][name])
        console.print(f"{name}: busy median / idle median = {busy_over_idle:.2f}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "host": where, "model": args.model, "device": args.device, "busy_runs": list(BUSY_RUNS),
        "floors_ms": floors, "cleared_each_run": CLEARED_EACH_RUN, "series": series,
        "agreement": {name: {key: agreement([r[key] for r in rows]) for key in ("local_ms", "unbounded_ms", "fp32_floor_ms")}
                      for name, rows in series.items()},
        "uncached_measurement": spread,
    }, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
