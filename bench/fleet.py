"""A fleet on loopback: one agent, 1-3 cloud nodes, TLS off and on, and discovery speed.

    python -m bench.fleet [--clients 8] [--requests 80] [--only throughput|discovery|kinds ...] [--json FILE]

Side by side in one run:
  1. requests/s and p50/p99 latency (as the app sees them) of REMOTE mobilenet
     requests through one agent to 1, 2 and 3 cloud nodes, plaintext and
     mutual TLS, under ``--clients`` concurrent callers; and the p50 of one
     request at a time, whose TLS-minus-plaintext difference is the TLS cost
     per request;
  2. time from a node's advert (its ready file: the advert is registered
     before it) to the first request the agent sends it, over DNS-SD on
     loopback, plaintext and TLS (TLS adds the certificate check);
  3. the same load REMOTE and SPLIT (split:8) through an agent whose node is
     a cloud-node, and through one whose node is a real Triton (oip://,
     serving the suffixes offload-tune exported), plaintext.
Every daemon runs on this one machine: with two cores, more nodes add
choice, not compute, and the figures say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.sdk import EdgeClient
from modelzoo.build import build_all
from offload_tune.export import export_repository
from pki import certs
from runtimes import launch
from runtimes.onnx_exec import OnnxModel
from runtimes.peers import PeerUnavailable, TritonPeer

LOOPBACK = "127.0.0.1"


def make_pki(directory: Path, nodes: int) -> dict[str, list[str]]:
    """TLS arguments for each node and for the agent."""
    ca_cert, ca_key = certs.create_ca("bench deployment")
    certs.write_pair(directory, "ca", ca_cert, ca_key)

    def args(stem: str, pair: tuple[bytes, bytes]) -> list[str]:
        certs.write_pair(directory, stem, *pair)
        return ["--tls-ca", str(directory / "ca.crt"), "--tls-cert", str(directory / f"{stem}.crt"),
                "--tls-key", str(directory / f"{stem}.key")]

    out = {f"node{i}": args(f"node{i}", certs.create_node(ca_cert, ca_key, f"node{i}", [LOOPBACK])) for i in range(nodes)}
    out["agent"] = args("device", certs.create_device(ca_cert, ca_key, "bench-device"))
    return out


def load(agent: launch.Daemon, x: np.ndarray, clients: int, requests: int, plan: str = "remote") -> dict:
    """``requests`` requests pinned to ``plan`` from ``clients`` threads sharing one channel (as an app would)."""
    with EdgeClient(agent.address, timeout=60) as client:
        def one(_: int) -> tuple[float, str]:
            start = time.perf_counter()
            result = client.infer("mobilenet", {"input": x}, plan=plan)
            return (time.perf_counter() - start) * 1e3, result.node or "local"

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(2 * clients)))  # warm: sessions on every node, link estimates
            start = time.perf_counter()
            results = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - start
    latencies = sorted(ms for ms, _ in results)
    served: dict[str, int] = {}
    for _, node in results:
        served[node] = served.get(node, 0) + 1
    return {"requests_per_s": requests / wall, "p50_ms": statistics.median(latencies),
            "p99_ms": float(np.percentile(latencies, 99)), "served_by": served}


def throughput(models: Path, pki: dict[str, list[str]], args) -> list[dict]:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    rows = []
    for nodes in (1, 2, 3):
        for tls in (False, True):
            with ExitStack() as stack:
                daemons = [stack.enter_context(launch.cloud_node(models, *(pki[f"node{i}"] if tls else [])))
                           for i in range(nodes)]
                agent = stack.enter_context(launch.edge_agent(models, [d.address for d in daemons],
                                                              *(pki["agent"] if tls else []), "--max-concurrency", "8"))
                alone = load(agent, x, 1, args.requests // 2)  # one app, one request at a time: the per-request cost
                row = {"nodes": nodes, "tls": tls, "sequential_p50_ms": alone["p50_ms"],
                       **load(agent, x, args.clients, args.requests)}
            rows.append(row)
    return rows


def engines(models: Path, repository: Path, args) -> list[dict]:
    """REMOTE and split:8 through an agent on a cloud-node, then through one on a Triton."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    export_repository(OnnxModel("mobilenet", models / "mobilenet.onnx"), repository, [8])
    rows = []
    with ExitStack() as stack:
        node = stack.enter_context(launch.cloud_node(models))
        triton = stack.enter_context(TritonPeer(repository))
        for kind, address in (("tandem", node.address), ("oip (Triton)", f"oip://{triton.address}")):
            with launch.edge_agent(models, [address], "--max-concurrency", "8") as agent:
                for plan in ("remote", "split:8"):
                    alone = load(agent, x, 1, args.requests // 2, plan)
                    rows.append({"node": kind, "plan": plan, "sequential_p50_ms": alone["p50_ms"],
                                 **load(agent, x, args.clients, args.requests, plan)})
    return rows


def first_request_after_advert(models: Path, pki: dict[str, list[str]], tls: bool) -> float:
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    browse = ["--discovery", "true", "--discover-plaintext", "true", "--discovery-interfaces", LOOPBACK, "--refresh-s", "0.2"]
    with launch.edge_agent(models, [], *browse, *(pki["agent"] if tls else [])) as agent, \
            EdgeClient(agent.address) as client:
        node = launch.cloud_node(models, "--advertise", "true", "--advertise-interfaces", LOOPBACK,
                                 *(pki["node0"] if tls else []))
        try:
            node.wait_ready()
            advertised = time.perf_counter()
            for _ in range(600):  # bounded: 60 s at most
                if client.infer("mobilenet", {"input": x}, plan="remote").node == node.address:
                    return (time.perf_counter() - advertised) * 1e3
                time.sleep(0.1)
            raise TimeoutError("the agent never sent the advertised node a request")
        finally:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--json", type=Path, default=Path("bench/results/fleet.json"))
    parser.add_argument("--only", nargs="+", choices=["throughput", "discovery", "kinds"],
                        default=["throughput", "discovery", "kinds"], help="the parts to run (default: all)")
    args = parser.parse_args()
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="tandem-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        build_all(tmp / "models")
        pki = make_pki(tmp / "pki", 3)
        rows, discovery, kinds = [], {}, []
        if "throughput" in args.only:
            with console.status("throughput through one agent"):
                rows = throughput(tmp / "models", pki, args)
        if "discovery" in args.only:
            with console.status("advert to first request"):
                discovery = {"plaintext_ms": first_request_after_advert(tmp / "models", pki, False),
                             "tls_ms": first_request_after_advert(tmp / "models", pki, True)}
        if "kinds" in args.only:
            try:
                with console.status("a cloud-node and a Triton side by side"):
                    kinds = engines(tmp / "models", tmp / "repository", args)
            except PeerUnavailable as exc:
                console.print(f"Triton rows skipped: {exc}")
    tls_cost = {}
    if rows:
        table = Table(title=f"REMOTE mobilenet through one agent ({platform.node()}, {os.cpu_count()} CPUs, "
                            f"{args.clients} clients, {args.requests} requests)")
        for column in ("nodes", "TLS", "alone p50 ms", "req/s", "p50 ms", "p99 ms", "served by (requests)"):
            table.add_column(column, justify="right")
        for r in rows:
            table.add_row(str(r["nodes"]), "on" if r["tls"] else "off", f"{r['sequential_p50_ms']:.2f}",
                          f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.1f}",
                          f"{r['p99_ms']:.1f}", ", ".join(f"{n[-5:]}: {c}" for n, c in sorted(r["served_by"].items())))
        console.print(table)
        tls_cost = {n: next(r["sequential_p50_ms"] for r in rows if r["nodes"] == n and r["tls"])
                    - next(r["sequential_p50_ms"] for r in rows if r["nodes"] == n and not r["tls"]) for n in (1, 2, 3)}
        console.print("TLS cost per request (difference of one-at-a-time p50s): "
                      + ", ".join(f"{n} node(s) {ms:+.2f} ms" for n, ms in tls_cost.items()))
    if discovery:
        console.print(f"advert to first request: plaintext {discovery['plaintext_ms']:.0f} ms, TLS {discovery['tls_ms']:.0f} ms")
    if kinds:
        table = Table(title=f"mobilenet through one agent, by node kind ({args.clients} clients, {args.requests} requests)")
        for column in ("node", "plan", "alone p50 ms", "req/s", "p50 ms", "p99 ms", "served by (requests)"):
            table.add_column(column, justify="right")
        for r in kinds:
            table.add_row(r["node"], r["plan"], f"{r['sequential_p50_ms']:.2f}", f"{r['requests_per_s']:.1f}",
                          f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                          ", ".join(f"{n[-5:]}: {c}" for n, c in sorted(r["served_by"].items())))
        console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": {"node": platform.node(), "cpus": os.cpu_count()}, "throughput": rows,
                                     "tls_cost_p50_ms": tls_cost, "advert_to_first_request": discovery,
                                     "node_kinds": kinds}, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
