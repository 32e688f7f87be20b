"""``offload-tune``: profile a model on this host and show its cut points.

The remaining subcommands (link, sweep, explain, write-policy) arrive with
issue 6; this one is what the agent and node already measure at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from partitioner.graph import GraphError
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import load_or_measure


def profile_command(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    path = Path(args.model)
    if not path.is_file():
        console.print(f"[red]error:[/] {path} does not exist")
        return 2
    try:
        model = OnnxModel(path.stem, path)
    except GraphError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"profiling {model.name}", total=1)
        profile = load_or_measure(model, on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    if args.json:
        print(profile.to_json())
        return 0
    table = Table(title=f"{model.name}: {profile.num_segments} segments, whole run {profile.whole_ms:.2f} ms")
    for column in ("k", "segment ms", "cumulative ms", "tensors crossing after k", "bytes"):
        table.add_column(column, justify="right")
    cumulative = profile.run_overhead_ms
    for k, ms in enumerate(profile.segment_ms, start=1):
        cumulative += ms
        crossing = profile.crossings[k] if k < profile.num_segments else profile.outputs
        table.add_row(str(k), f"{ms:.3f}", f"{cumulative:.3f}", ", ".join(m.name for m in crossing),
                      f"{sum(m.raw_bytes for m in crossing):,}")
    Console().print(table)
    if model.cut_error:
        console.print(f"runs whole only: {model.cut_error}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-tune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("profile", help="per-segment times and tensor sizes, measured on this host")
    profile.add_argument("model", help="path to an .onnx file")
    profile.add_argument("--json", action="store_true", help="print the profile as JSON")
    args = parser.parse_args(argv)
    return {"profile": profile_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
