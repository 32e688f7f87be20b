"""What Tandem costs on top of bare onnxruntime, and what its codec costs.

    python -m bench.overhead [--runs 200] [--json bench/results/overhead.json] [--only planning]

For the chain model, median latency of (a) bare ``InferenceSession.run``,
(b) the agent's LOCAL plan through the SDK (over the socket, and through
shared memory), (c) SPLIT at the middle cut over
loopback, (d) REMOTE, (e) LOCAL through the Open Inference Protocol with
tritonclient (gRPC over the socket, gRPC with system shared memory, and
REST with binary tensors), and the gRPC transport floor (the same request
echoed with no compute), measured in one run in alternating rounds; then the agent's
planning time per request for every modelzoo model (the reply's plan_ms);
then codec encode/decode throughput per encoding on a 1x32x112x112 float32
tensor. Targets: (b) and (e) through shared memory within 5 % or 0.3 ms of
(a); planning under 0.1 ms. ``--only planning``: the planning times alone,
``--runs`` requests per model (JSON in bench/results/overhead_planning.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as triton_shm
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2 as oip_pb

from bench.plans import wait_until_measured
from edge_agent.sdk import EdgeClient, InferResult
from modelzoo.build import build_all
from partitioner.shapes import profile_candidates
from protos import codec
from protos import tandem_pb2 as pb
from runtimes import launch
from runtimes.profiler import CODEC_PROBE_SHAPE, measure_codec_speed

OIP_SOCKET = "OIP LOCAL, tritonclient gRPC (socket)"
OIP_SHM = "OIP LOCAL, tritonclient gRPC (system shared memory)"
MESSAGE_OPTIONS = [("grpc.max_send_message_length", 1 << 26), ("grpc.max_receive_message_length", 1 << 26)]


class EchoServer:
    """A gRPC server that answers any bytes with a fixed-size reply: the
    transport floor for moving a request of this size through grpcio."""

    def __init__(self, reply_bytes: int, options: list[tuple[str, int]] = MESSAGE_OPTIONS) -> None:
        reply = bytes(reply_bytes)
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)}
        )
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler], options=options)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=MESSAGE_OPTIONS)
        self.call = self.channel.unary_unary("/bench.Echo/Call")

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@contextlib.contextmanager
def measured_agent(models: Path, *extra: str) -> Iterator[tuple[launch.Daemon, EdgeClient]]:
    """A cloud node and an agent planning with it on loopback, once the agent has measured the node."""
    with launch.cloud_node(models) as node, launch.edge_agent(models, [node.address], *extra) as agent, \
            EdgeClient(agent.address) as client:
        wait_until_measured(client)
        yield agent, client


def planning_times(client: EdgeClient, paths: dict[str, Path], runs: int) -> list[dict]:
    """The agent's planning time per request for each model, at the shape its app sends."""
    counts = {m.name: m.num_cuts for m in client.models()}
    rows = []
    for name, path in paths.items():
        shapes = profile_candidates(onnx.load(str(path)))[0].as_dict()
        feeds = {i: np.random.default_rng(1).standard_normal(s).astype(np.float32) for i, s in shapes.items()}
        for _ in range(10):
            client.infer(name, feeds)
        wait_until_measured(client)  # what a new shape starts in the background would share the cores
        results = [client.infer(name, feeds) for _ in range(runs)]
        values = [r.measured["plan_ms"] for r in results]
        rows.append({"model": name, "cuts": counts.get(name, 0), "plan": results[-1].planned,
                     "median_ms": statistics.median(values), "p90_ms": percentile(values, 90)})
    return rows


class OipCalls:
    """LOCAL requests through the Open Inference Protocol as an app on the
    board makes them with tritonclient: over the gRPC socket, through system
    shared memory (the app writes its input into the region and reads the
    logits back out of one, each call), and over REST with binary tensors."""

    def __init__(self, agent: launch.Daemon, x: np.ndarray, logits_bytes: int) -> None:
        self.x = x
        self.grpc = triton_grpc.InferenceServerClient(agent.address)
        self.http = triton_http.InferenceServerClient(agent.ready["http"].removeprefix("http://"))
        self.names = (f"bench-in-{agent.ready['pid']}", f"bench-out-{agent.ready['pid']}")
        self.regions = [triton_shm.create_shared_memory_region(name, "/" + name, size)
                        for name, size in zip(self.names, (x.nbytes, logits_bytes))]
        for name, size in zip(self.names, (x.nbytes, logits_bytes)):
            self.grpc.register_system_shared_memory(name, "/" + name, size)
        self.params = {"tandem.plan": "local"}
        self.socket_input = self._input(triton_grpc)
        self.socket_input.set_data_from_numpy(x)
        self.http_input = self._input(triton_http)
        self.http_input.set_data_from_numpy(x, binary_data=True)
        self.shm_input = self._input(triton_grpc)
        self.shm_input.set_shared_memory(self.names[0], x.nbytes)
        self.shm_output = triton_grpc.InferRequestedOutput("logits")
        self.shm_output.set_shared_memory(self.names[1], logits_bytes)
        self.request_bytes = self._shared_memory_request(logits_bytes).SerializeToString()

    def _shared_memory_request(self, logits_bytes: int) -> oip_pb.ModelInferRequest:
        """What a shared-memory ModelInfer puts on the wire: names and sizes, no tensor bytes."""
        request = oip_pb.ModelInferRequest(model_name="mobilenet")
        request.parameters["tandem.plan"].string_param = "local"
        for tensor, name, size in ((request.inputs.add(name="input", datatype="FP32", shape=self.x.shape),
                                    self.names[0], self.x.nbytes),
                                   (request.outputs.add(name="logits"), self.names[1], logits_bytes)):
            tensor.parameters["shared_memory_region"].string_param = name
            tensor.parameters["shared_memory_byte_size"].int64_param = size
        return request

    def _input(self, module):
        return module.InferInput("input", list(self.x.shape), "FP32")

    def socket(self) -> np.ndarray:
        return self.grpc.infer("mobilenet", [self.socket_input], parameters=self.params).as_numpy("logits")

    def shared_memory(self) -> np.ndarray:
        triton_shm.set_shared_memory_region(self.regions[0], [self.x])
        self.grpc.infer("mobilenet", [self.shm_input], outputs=[self.shm_output], parameters=self.params)
        return triton_shm.get_contents_as_numpy(self.regions[1], np.float32, [1, 1000])

    def rest(self) -> np.ndarray:
        return self.http.infer("mobilenet", [self.http_input], parameters=self.params).as_numpy("logits")

    def close(self) -> None:
        self.grpc.unregister_system_shared_memory()
        for region in self.regions:
            triton_shm.destroy_shared_memory_region(region)
        self.grpc.close()
        self.http.close()


def codec_throughput(runs: int) -> list[dict]:
    """The agent's own codec measurement, reported in GB/s with wire sizes."""
    raw_bytes = math.prod(CODEC_PROBE_SHAPE) * 4
    rows = []
    speeds = measure_codec_speed(runs)
    for name, encoding in (("fp32", pb.ENCODING_RAW), ("fp16", pb.ENCODING_FP16), ("int8", pb.ENCODING_INT8)):
        speed = speeds[encoding]
        rows.append({
            "encoding": name, "raw_bytes": raw_bytes, "wire_bytes": codec.wire_bytes(CODEC_PROBE_SHAPE, "float32", encoding),
            "encode_gb_s": speed.encode_mb_s / 1e3, "decode_gb_s": speed.decode_mb_s / 1e3,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="timed requests per configuration")
    parser.add_argument("--json", type=Path, help="default bench/results/overhead.json (overhead_planning.json)")
    parser.add_argument("--only", choices=("planning",), help="only the agent's planning time per model")
    args = parser.parse_args()
    console = Console(width=120)
    if args.only == "planning":
        return planning_only(console, args.runs, args.json or Path("bench/results/overhead_planning.json"))
    args.json = args.json or Path("bench/results/overhead.json")

    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        models = Path(tmp)
        paths = build_all(models)
        bare = ort.InferenceSession(str(paths["mobilenet"]), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        request_bytes = pb.InferRequest(model="mobilenet", inputs=[codec.encode(x, "input")]).SerializeToString()
        echo = EchoServer(reply_bytes=4200)  # about an InferReply carrying 1000 float32 logits
        small_echo = EchoServer(reply_bytes=400)  # about a ModelInferResponse whose logits went to shared memory
        with measured_agent(models, "--http-listen", "127.0.0.1:0") as (agent, client), \
                EdgeClient(agent.address, shared_memory=True) as shared:
            oip = OipCalls(agent, x, logits_bytes=1000 * 4)
            cuts = next(m.num_cuts for m in client.models() if m.name == "mobilenet")
            middle = f"split:{(cuts + 1) // 2}"
            configs = {
                "bare onnxruntime": lambda: bare.run(None, {"input": x}),
                "gRPC echo of the same request (no compute)": lambda: echo.call(request_bytes, timeout=10),
                "gRPC echo of a shared-memory request (no compute)": lambda: small_echo.call(oip.request_bytes, timeout=10),
                "agent LOCAL (SDK)": lambda: client.infer("mobilenet", {"input": x}, plan="local"),
                "agent LOCAL (SDK, shared memory)": lambda: shared.infer("mobilenet", {"input": x}, plan="local"),
                f"agent SPLIT {middle} (loopback)": lambda: client.infer("mobilenet", {"input": x}, plan=middle),
                "agent REMOTE (loopback)": lambda: client.infer("mobilenet", {"input": x}, plan="remote"),
                OIP_SOCKET: oip.socket,
                OIP_SHM: oip.shared_memory,
                "OIP LOCAL, tritonclient REST (binary tensors)": oip.rest,
            }
            reference = bare.run(None, {"input": x})[0]
            for name in (OIP_SOCKET, OIP_SHM):  # a benchmark of wrong answers measures nothing
                np.testing.assert_allclose(configs[name](), reference, rtol=1e-5, atol=1e-5)
            times: dict[str, list[float]] = {name: [] for name in configs}
            inside: dict[str, list[dict[str, float]]] = {name: [] for name in configs}  # the agent's own stage timings
            for fn in configs.values():  # warm sessions and caches on both sides
                for _ in range(10):
                    fn()
            # Rounds of consecutive runs per configuration: strict interleaving
            # would let one process's spinning onnxruntime threads (the default)
            # steal the two cores from the next configuration.
            rounds = 4
            with console.status("timing ..."):
                for _ in range(rounds):
                    for name, fn in configs.items():
                        for _ in range(args.runs // rounds):
                            start = time.perf_counter()
                            result = fn()
                            times[name].append((time.perf_counter() - start) * 1e3)
                            if isinstance(result, InferResult):
                                inside[name].append(result.measured)
            with console.status("planning time per model ..."):
                planning = planning_times(client, paths, args.runs // 4)
            oip.close()
        echo.close()
        small_echo.close()

    base = statistics.median(times["bare onnxruntime"])
    latency_rows = []
    table = Table(title=f"mobilenet, {args.runs} runs each in 4 rounds ({platform.processor() or platform.machine()}, {platform.node()})")
    for column in ("configuration", "median ms", "p90 ms", "vs bare"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, values in times.items():
        median = statistics.median(values)
        row = {"configuration": name, "median_ms": median, "p90_ms": percentile(values, 90), "overhead_ms": median - base}
        if inside[name]:
            row["agent_stage_medians_ms"] = {stage: statistics.median(m[stage] for m in inside[name]) for stage in inside[name][0]}
        latency_rows.append(row)
        table.add_row(name, f"{median:.3f}", f"{row['p90_ms']:.3f}", f"{median - base:+.3f} ms ({(median / base - 1) * 100:+.1f} %)")
    console.print(table)
    stages = Table(title="inside the agent: median of each reply's measured stages (ms)")
    stage_names = ["edge_ms", "encode_ms", "network_ms", "cloud_ms", "decode_ms", "plan_ms", "total_ms"]
    stages.add_column("configuration")
    for stage in stage_names:
        stages.add_column(stage, justify="right")
    for row in latency_rows:
        if "agent_stage_medians_ms" in row:
            stages.add_row(row["configuration"], *(f"{row['agent_stage_medians_ms'][s]:.3f}" for s in stage_names))
    console.print(stages)

    local = statistics.median(times["agent LOCAL (SDK)"])
    target_met = local - base <= max(0.05 * base, 0.3)
    console.print(f"LOCAL overhead target (within 5 % or 0.3 ms of bare): {'met' if target_met else 'NOT met'} "
                  f"({local - base:+.3f} ms)")
    shared = statistics.median(times[OIP_SHM])
    shm_target_met = shared - base <= max(0.05 * base, 0.3)
    console.print(f"OIP shared-memory LOCAL target (within 5 % or 0.3 ms of bare): "
                  f"{'met' if shm_target_met else 'NOT met'} ({shared - base:+.3f} ms)")

    planning_met = print_planning(console, planning)

    codec_rows = codec_throughput(runs=50)
    codec_table = Table(title="codec on a 1x32x112x112 float32 tensor (1.6 MB)")
    for column in ("encoding", "wire bytes", "encode GB/s", "decode GB/s"):
        codec_table.add_column(column, justify="right")
    for row in codec_rows:
        codec_table.add_row(row["encoding"], f"{row['wire_bytes']:,}", f"{row['encode_gb_s']:.2f}", f"{row['decode_gb_s']:.2f}")
    console.print(codec_table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": machine(), "runs": args.runs, "latency": latency_rows, "local_target_met": target_met,
        "oip_shared_memory_target_met": shm_target_met, "codec": codec_rows,
        "planning": planning, "planning_target_met": planning_met,
    }, indent=2))
    console.print(f"wrote {args.json}")
    return 0


def print_planning(console: Console, planning: list[dict]) -> bool:
    plan_table = Table(title="planning one request inside the agent (the reply's measured plan_ms), unpinned")
    for column in ("model", "cut points", "plan", "median ms", "p90 ms"):
        plan_table.add_column(column, justify="left" if column in ("model", "plan") else "right")
    for row in planning:
        plan_table.add_row(row["model"], str(row["cuts"]), row["plan"], f"{row['median_ms']:.3f}", f"{row['p90_ms']:.3f}")
    console.print(plan_table)
    met = all(row["median_ms"] < 0.1 for row in planning)
    console.print(f"planning target (under 0.1 ms of the LOCAL overhead, every model): {'met' if met else 'NOT met'}")
    return met


def planning_only(console: Console, runs: int, out: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        models = Path(tmp)
        paths = build_all(models)
        with measured_agent(models) as (_, client):
            with console.status("planning time per model ..."):
                planning = planning_times(client, paths, runs)
    met = print_planning(console, planning)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "runs": runs, "planning": planning, "planning_target_met": met},
                              indent=2))
    console.print(f"wrote {out}")
    return 0


def machine() -> dict:
    return {"node": platform.node(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": ort.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
