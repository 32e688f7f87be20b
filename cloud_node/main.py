"""``cloud-node``: serve ONNX models to edge agents over gRPC."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cloud_node.advert import Advertiser, txt_records
from cloud_node.server import CloudNodeService
from devices.profiles import host_profile
from partitioner.work import Machine
from pki.certs import fingerprint, identity
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import config as config_loader
from runtimes import heap, tracing
from runtimes.daemon import (
    bind,
    check_log_settings,
    reload_settings,
    run_daemon,
    wait_for_shutdown,
    write_ready_file,
)
from runtimes.llm_serving import LlmStore
from runtimes.metrics import Metrics
from runtimes.model_store import ModelStore
from runtimes.profile_book import ProfileBook, memory_budget
from runtimes.rpc import add_health, add_reflection, add_service, server_options, set_serving
from runtimes.tls import TlsFiles, peer_identity, server_credentials, tls_from_config, warn_plaintext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    listen: str = field(default="127.0.0.1:50052", metadata={"help": "HOST:PORT to serve on (port 0: any free port)"})
    models: Path = field(default=Path("models"), metadata={"help": "directory of .onnx models to serve"})
    node_id: str = field(default="", metadata={"help": "name reported to agents (default: hostname:port)"})
    max_concurrency: int = field(default=2, metadata={"help": "requests computing at once"})
    max_queue: int = field(default=16, metadata={"help": "requests waiting beyond max_concurrency before RESOURCE_EXHAUSTED"})
    max_queue_per_device: int = field(default=0, metadata={"help": "of those, the most one device may hold, so a device "
                                                                   "flooding the node cannot starve another (0: half of "
                                                                   "max_queue, at least 1)"})
    threads: int = field(default=0, metadata={"help": "onnxruntime intra-op threads per session (0: onnxruntime default)"})
    ort_spinning: str = field(default="auto", metadata={"help": "onnxruntime threads spin between kernels: on, off, or auto "
                                                                "(off when a CPU quota is visible; say off under a quota /sys cannot show)"})
    max_message_mb: int = field(default=64, metadata={"help": "largest gRPC message accepted or sent, MiB"})
    profile_dir: Path | None = field(default=None, metadata={"help": "profile cache directory (default: $TANDEM_CACHE_DIR or ~/.cache/tandem)"})
    profile_memory_mb: float = field(default=0.0, metadata={"help": "largest estimated memory one profiling run may use, MiB "
                                                                    "(0: a quarter of what is free, at most 1024)"})
    llm: tuple[str, ...] = field(default=(), metadata={"help": "LLM to serve: 'smollm2' (packaged), a .gguf path, or NAME=PATH"})
    llm_slots: int = field(default=4, metadata={"help": "generations decoded together per LLM (continuous batching)"})
    llm_max_queue: int = field(default=16, metadata={"help": "generations waiting for a slot before RESOURCE_EXHAUSTED"})
    llm_ctx_per_seq: int = field(default=2048, metadata={"help": "context tokens per generation (prompt + output)"})
    llm_unified_kv: bool = field(default=False, metadata={"help": "share one KV cache between streams: faster batching, "
                                                                   "but greedy outputs may differ from a stream run alone"})
    llm_batched_verify: bool = field(default=False, metadata={
        "help": "check a device's draft in one decode call: fewer calls, but greedy near-ties may go another way "
                "than in a plain generation (default: one step per position, token for token the same)"})
    llm_threads: int = field(default=0, metadata={"help": "llama.cpp threads (0: every core)"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"})
    ready_file: Path | None = field(default=None, metadata={"help": "write {address, pid, metrics URL} JSON here once serving"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_format: str = field(default="text", metadata={"help": "log lines as text (for people) or json (one object per line)"})
    otlp_endpoint: str = field(default="", metadata={"help": "OpenTelemetry collector to send traces to over OTLP/gRPC: "
                                                          "http://HOST:4317 (plaintext) or https://HOST:4317 (empty: none)"})
    trace_file: Path | None = field(default=None, metadata={"help": "also write each finished span here, one JSON object per line"})
    metrics_listen: str = field(default="", metadata={"help": "HOST:PORT for the Prometheus /metrics endpoint "
                                                              "(port 0: any free port; empty: off)"})
    tls_ca: Path | None = field(default=None, metadata={"help": "the deployment CA certificate (PEM): only devices it signed are served"})
    tls_cert: Path | None = field(default=None, metadata={"help": "this node's certificate (PEM, from tandem-certs node)"})
    tls_key: Path | None = field(default=None, metadata={"help": "this node's private key (PEM)"})
    plaintext: bool = field(default=False, metadata={"help": "serve without TLS (lab use only; said loudly at start-up)"})
    deny: tuple[str, ...] = field(default=(), metadata={"help": "device ids or certificate serials (hex) refused; reloaded on SIGHUP"})
    advertise: bool = field(default=True, metadata={"help": "advertise this node over DNS-SD (_tandem._tcp.local.)"})
    advertise_interfaces: tuple[str, ...] = field(default=(), metadata={"help": "interfaces (names or IPv4 addresses) to advertise on (default: all; loopback-only when listening on loopback)"})

    def spinning(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.ort_spinning]

    def validate(self) -> None:
        if self.ort_spinning not in ("auto", "on", "off"):
            raise config_loader.ConfigError(f"ort_spinning must be auto, on or off, got {self.ort_spinning!r}")
        if self.max_concurrency < 1:
            raise config_loader.ConfigError("max_concurrency must be >= 1")
        if self.max_queue < 0 or self.max_queue_per_device < 0:
            raise config_loader.ConfigError("max_queue and max_queue_per_device must be >= 0")
        if self.max_message_mb < 1:
            raise config_loader.ConfigError("max_message_mb must be >= 1")
        if self.llm_slots < 1 or self.llm_max_queue < 0 or self.llm_ctx_per_seq < 16:
            raise config_loader.ConfigError("llm_slots must be >= 1, llm_max_queue >= 0, llm_ctx_per_seq >= 16")
        check_log_settings(self.log_level, self.log_format)
        if self.metrics_listen and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise config_loader.ConfigError(f"metrics_listen must be HOST:PORT, got {self.metrics_listen!r}")
        self.tls()

    def tls(self) -> TlsFiles | None:
        return tls_from_config(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, plaintext=self.plaintext,
                               daemon="cloud-node")


# Settings SIGHUP applies at once; the others need a restart (said in the log).
RELOADABLE = ("deny", "log_level")


class DenyList:
    """Devices refused by id or certificate serial, changeable while serving."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.set(entries)

    def set(self, entries: tuple[str, ...]) -> None:
        self.entries = frozenset(e.lower() for e in entries)

    def refusal(self, context: grpc.aio.ServicerContext) -> str | None:
        peer = peer_identity(context)
        if peer is None:
            return None  # plaintext: nobody to refuse by certificate
        device, serial = peer
        if device.lower() in self.entries or serial.lower() in self.entries:
            return f"device {device} (certificate serial {serial}) is revoked on this node"
        return None


async def serve(config: NodeConfig, load: Callable[[], NodeConfig] | None = None) -> None:
    tls = config.tls()
    heap.map_large_buffers()  # a request's memory goes back to the host when it is done
    traces = tracing.configure("cloud-node", otlp_endpoint=config.otlp_endpoint, trace_file=config.trace_file)
    store = ModelStore.from_dir(config.models, threads=config.threads or None, spinning=config.spinning())
    profile_dir = config.profile_dir / "profiles" if config.profile_dir else None
    server = grpc.aio.server(options=server_options(config.max_message_mb))
    ca_pem, cert_pem, key_pem = tls.load() if tls else (b"", b"", b"")
    address = bind(server, config.listen, server_credentials(cert_pem, key_pem, ca_pem) if tls else None)
    # Profile before serving: measuring while serving would skew both.
    host = host_profile()
    book = ProfileBook(store.models, machine=Machine(host.cpu_gflops, host.mem_bandwidth_gbs, name="this node"),
                       cache_dir=profile_dir, budget_bytes=memory_budget(config.profile_memory_mb, None))
    await asyncio.to_thread(book.profile_all)
    llms = await asyncio.to_thread(
        LlmStore.load, config.llm, slots=config.llm_slots, ctx_per_seq=config.llm_ctx_per_seq,
        threads=config.llm_threads or None, max_queue=config.llm_max_queue, unified_kv=config.llm_unified_kv,
        batched_verify=config.llm_batched_verify,
    )
    metrics = Metrics("cloud-node")
    # Under TLS the node is its certificate's name: agents verify that name.
    node_id = config.node_id or (identity(cert_pem)[0] if tls else f"{socket.gethostname()}:{address.rsplit(':', 1)[-1]}")
    service = CloudNodeService(store, book, llms, node_id=node_id, max_concurrency=config.max_concurrency,
                               max_queue=config.max_queue, metrics=metrics,
                               max_queue_per_device=config.max_queue_per_device or max(config.max_queue // 2, 1))
    service_name = pb.DESCRIPTOR.services_by_name["CloudNode"].full_name
    deny = DenyList(config.deny)
    # Agents are across a real link: gRPC's adaptive window keeps, so a queued call may
    # hold up to that window of its tensors (not a fixed 1 MiB, as on the agent).
    add_service(server, pb_grpc.add_CloudNodeServicer_to_server, service, gate=deny.refusal,
                read_when_admitted=("RunPartition", "RunModel"))
    health = add_health(server)
    add_reflection(server, [service_name])
    metrics_url = metrics.serve(config.metrics_listen) if config.metrics_listen else ""
    await server.start()
    if not tls:
        warn_plaintext("cloud-node", address)
        if config.deny:
            logger.warning("deny list ignored: without TLS there are no device certificates to refuse")
    set_serving(health, [service_name])
    advert = None
    if config.advertise:
        host, _, port = address.rpartition(":")
        # Agents verify a TLS node by the name its certificate carries: advertise that name.
        advertised_id = identity(cert_pem)[0] if tls else node_id
        txt = txt_records(node_id=advertised_id, models=[*store.models, *llms.engines], slots=config.max_concurrency,
                          queue=config.max_queue, fingerprint=fingerprint(cert_pem) if tls else "")
        advert = Advertiser(node_id=node_id, host=host, port=int(port), txt=txt, interfaces=config.advertise_interfaces)
        await advert.start()
    current = [config]
    if load is not None:
        def apply(fresh: NodeConfig) -> str:
            deny.set(fresh.deny)
            return f"deny list {len(deny.entries)} entries"

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_settings, current, load, RELOADABLE, apply)
    write_ready_file(config.ready_file, address, {"metrics": metrics_url} if metrics_url else None)
    logger.info("cloud node %s serving %d models on %s", service.node_id, len(store.models), address)
    if metrics_url:
        logger.info("metrics at %s", metrics_url)
    signame = await wait_for_shutdown()
    logger.info("%s: draining for up to %.1f s", signame, config.grace_s)
    if advert is not None:  # agents stop planning on this node first
        await advert.close()
    health.enter_graceful_shutdown()
    # Generations are handed over (their KV states kept for the devices to
    # fetch) before the server stops taking calls: FetchState is a new call.
    drain_ends = time.monotonic() + config.grace_s
    service.hand_off()
    if not await service.handed_over.settled(config.grace_s):
        logger.warning("drain: %d generations still running, %d bytes of handed-over state never fetched",
                       service.handed_over.generating, service.handed_over.kept_bytes)
    await server.stop(max(drain_ends - time.monotonic(), 0.0))  # tensor calls had the drain too
    service.close()
    metrics.stop()
    if traces is not None:
        traces.shutdown()  # sends what is still batched


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, prog="cloud-node", description=__doc__, config_cls=NodeConfig, env_prefix="TANDEM_NODE",
                      serve=serve)


if __name__ == "__main__":
    sys.exit(main())
