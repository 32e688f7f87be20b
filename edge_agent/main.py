"""``edge-agent``: serve apps on the device; run each request LOCAL, SPLIT or REMOTE."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import grpc

from devices.detect import detect_board
from devices.power_fit import PowerFit
from devices.profiles import cache_root, get_device
from edge_agent import oip
from edge_agent.deferred import DeferredStore, QueueLimits
from edge_agent.delivery import Deliveries
from edge_agent.discovery import Browser
from edge_agent.fleet import NodeTable, Trust
from edge_agent.generation import Generator, LlmSettings
from edge_agent.http_api import ApiKeys, HttpApi
from edge_agent.offload import CloudNodeClient, has_route, parse_node_address, refresh_all
from edge_agent.oip_node import OipNodeClient
from edge_agent.openai_node import OpenAiNodeClient
from edge_agent.power import PowerMonitor
from edge_agent.server import EdgeAgentService
from partitioner.connectivity import NodeReach, cloud_state
from partitioner.costmodel import Constraints, Link, Objective
from partitioner.planning import power_of
from partitioner.policy import LlmLimits, Policy, PolicyError, PolicySet, check_models, parse
from partitioner.quality import QualityPolicy
from partitioner.speculation import MAX_DRAFT_TOKENS
from partitioner.work import Machine
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import config as config_loader
from runtimes import heap, tracing
from runtimes.daemon import (
    bind,
    check_log_settings,
    reload_settings,
    run_daemon,
    unix_socket_path,
    wait_for_shutdown,
    write_ready_file,
)
from runtimes.llm_serving import LlmStore
from runtimes.metrics import Metrics
from runtimes.model_store import ModelStore
from runtimes.profile_book import ProfileBook, memory_budget
from runtimes.profiler import measure_codec_speed, predicted_for
from runtimes.rpc import APP_STREAM_WINDOW_BYTES, add_health, add_reflection, add_service, server_options, set_serving
from runtimes.tls import TlsFiles, channel_credentials, tls_from_config, warn_plaintext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSpec:
    """One [[nodes]] table: a cloud node of any kind, with its own TLS files and key."""

    address: str                      # HOST:PORT (cloud-node), oip://HOST:PORT or openai+http(s)://HOST:PORT/v1
    kind: str = ""                    # tandem, oip or openai, for an address written without its scheme
    tls_ca: Path | None = None        # the CA its certificate is signed by (default: the agent's tls_ca)
    tls_cert: Path | None = None      # this device's certificate for mutual TLS (with tls_key)
    tls_key: Path | None = None
    tls_name: str = ""                # the name in its certificate, when the address's host is not
    api_key_file: Path | None = None  # a file holding the bearer token it wants (first line)
    slots: int = 1                    # openai: generations the server runs at once (llama.cpp's server: 1)
    max_concurrency: int = 1          # oip: requests the server runs at once (its model instances)
    plaintext: bool = False           # without TLS although the agent has TLS files: nothing authenticates it

    def target(self) -> str:
        """The address in --cloud's form: the scheme from ``kind`` where the address has none."""
        prefixes = {"tandem": "", "oip": "oip://", "openai": "openai+"}
        if not self.kind:
            return self.address
        if self.kind not in prefixes:
            raise ValueError(f"node {self.address}: kind must be tandem, oip or openai, got {self.kind!r}")
        base_url = self.address.startswith(("http://", "https://"))  # an openai node's address without its prefix
        if "://" in self.address and not (self.kind == "openai" and base_url):
            said = parse_node_address(self.address)[0]
            if said != self.kind:
                raise ValueError(f"node {self.address}: its scheme says {said}, its kind {self.kind}")
            return self.address
        if self.kind == "openai" and not base_url:
            raise ValueError(f"node {self.address}: an openai node's address is its base URL, http(s)://HOST:PORT/v1")
        return prefixes[self.kind] + self.address

    def api_key(self) -> str | None:
        if self.api_key_file is None:
            return None
        try:
            lines = self.api_key_file.read_text().split()
        except OSError as exc:
            raise ValueError(f"node {self.address}: api_key_file {self.api_key_file}: {exc.strerror}") from None
        if not lines:
            raise ValueError(f"node {self.address}: api_key_file {self.api_key_file} is empty")
        return lines[0]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Its own TLS credentials (None: the agent's)."""
        if self.tls_ca is None:
            if self.tls_cert or self.tls_key:
                raise ValueError(f"node {self.address}: tls_cert and tls_key need its tls_ca")
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"node {self.address}: give tls_cert and tls_key together, or neither")
        read = [p.read_bytes() if p else None for p in (self.tls_ca, self.tls_cert, self.tls_key)]
        return grpc.ssl_channel_credentials(root_certificates=read[0], private_key=read[2], certificate_chain=read[1])


@dataclass(frozen=True)
class AgentConfig:
    listen: str = field(default="127.0.0.1:50051", metadata={"help": "HOST:PORT or unix:PATH for apps (port 0: any free port)"})
    models: Path = field(default=Path("models"), metadata={"help": "directory of .onnx models this device can run"})
    cloud: tuple[str, ...] = field(default=(), metadata={"help": "cloud node HOST:PORT (a cloud-node), oip://HOST:PORT "
                                                                 "(Triton, KServe, MLServer over KServe v2 gRPC) or "
                                                                 "openai+http://HOST:PORT/v1 (vLLM, llama.cpp server, "
                                                                 "Ollama: LLMs)"})
    device: str = field(default="host", metadata={"help": "device profile for power figures: host, pi4, pi5, jetson-nano, jetson-orin-nano"})
    objective: str = field(default="latency", metadata={"help": "default objective: latency, energy or weighted"})
    weight_latency: float = field(default=0.5, metadata={"help": "weighted objective: share of latency, 0..1"})
    slo_ms: float | None = field(default=None, metadata={"help": "latency SLO per request, ms (soft)"})
    energy_budget_j: float | None = field(default=None, metadata={"help": "device energy budget per request, J (soft)"})
    memory_limit_mb: float | None = field(default=None, metadata={"help": "device memory a plan may use, MiB (hard)"})
    privacy_min_local: int = field(default=0, metadata={"help": "segments that must run on the device (hard; >0 forbids REMOTE)"})
    encoding: str = field(default="raw", metadata={"help": "codec for tensors sent to nodes: raw, fp16 or int8"})
    hysteresis_margin: float = field(default=0.1, metadata={"help": "change plan only when the new one is predicted this much better (0.1 = 10 %)"})
    nodes: tuple[NodeSpec, ...] = field(default=(), metadata={
        "help": "a cloud node with its own settings: address (as --cloud), kind, tls_ca, tls_cert, tls_key, tls_name, "
                "api_key_file, slots (openai), max_concurrency (oip), plaintext"})
    cloud_timeout_s: float = field(default=10.0, metadata={"help": "longest wait for one cloud call before falling back, s"})
    uplink_mbps: float | None = field(default=None, metadata={"help": "assume this uplink instead of measuring it, Mbit/s"})
    downlink_mbps: float | None = field(default=None, metadata={"help": "assume this downlink instead of measuring it, Mbit/s"})
    rtt_ms: float | None = field(default=None, metadata={"help": "assume this round trip instead of measuring it, ms"})
    llm: tuple[str, ...] = field(default=(), metadata={"help": "LLM on this device: 'smollm2' (packaged), a .gguf path, or NAME=PATH"})
    llm_slots: int = field(default=1, metadata={"help": "local generations decoded together"})
    llm_max_queue: int = field(default=8, metadata={"help": "local generations waiting for a slot before RESOURCE_EXHAUSTED"})
    llm_ctx_per_seq: int = field(default=2048, metadata={"help": "context tokens per generation (prompt + output)"})
    llm_threads: int = field(default=0, metadata={"help": "llama.cpp threads (0: every core; match a CPU quota)"})
    llm_prefix_cache_mb: float = field(default=64.0, metadata={"help": "KV states of recent prompts and chats kept to "
                                                                       "start the next from, MiB (0: off)"})
    llm_remote_model: str = field(default="", metadata={"help": "the model id openai nodes run for this device's LLM, "
                                                                 "a bigger one if you like (default: the same name)"})
    llm_cloud_model: str = field(default="", metadata={"help": "the bigger LLM its nodes serve, for tier cloud and auto "
                                                                "(e.g. gemma3-270m)"})
    llm_quality_file: Path | None = field(default=None, metadata={
        "help": "when tier auto trusts the device's answer: the JSON offload-tune calibrate-llm writes"})
    llm_allow_remote: bool = field(default=True, metadata={"help": "false: prompts never leave the device"})
    llm_remote_tokens_per_hour: int | None = field(default=None, metadata={"help": "cap on tokens generated in the cloud per hour"})
    llm_stall_s: float = field(default=5.0, metadata={"help": "a cloud stream silent this long is finished on the device, s"})
    llm_failover_places: int = field(default=16, metadata={"help": "cloud streams at once, each sure of a place to finish on "
                                                                   "the device beyond llm_max_queue if its node fails"})
    llm_draft_tokens: int = field(default=0, metadata={"help": "tokens the device drafts per round for a node's model "
                                                               "(0: chosen each round from the RTT and measured acceptance)"})
    probe_idle_s: float = field(default=10.0, metadata={"help": "measure the bandwidth of a link idle this long, s"})
    sysfs_root: Path = field(default=Path("/"), metadata={"help": "where the board's /sys is mounted (a container given the host's at /host/sys: /host)"})
    power_window_s: float = field(default=1.0, metadata={"help": "power sensor sample window, s"})
    tls_ca: Path | None = field(default=None, metadata={"help": "the deployment CA certificate (PEM): only nodes it signed are used"})
    tls_cert: Path | None = field(default=None, metadata={"help": "this device's certificate (PEM, from tandem-certs device)"})
    tls_key: Path | None = field(default=None, metadata={"help": "this device's private key (PEM)"})
    plaintext: bool = field(default=False, metadata={"help": "talk to nodes without TLS (lab use only; said loudly at start-up)"})
    discovery: bool = field(default=True, metadata={"help": "find cloud nodes over DNS-SD (_tandem._tcp.local.), besides --cloud"})
    discover_plaintext: bool = field(default=False, metadata={"help": "use discovered nodes although this agent runs plaintext: "
                                                                      "anyone on the network can advertise one and be sent requests"})
    socket_mode: str = field(default="0660", metadata={"help": "permissions of a unix:PATH socket, octal: 0660 lets the "
                                                              "agent's group (the unit's Group=) connect, nobody else"})
    listen_anywhere: bool = field(default=False, metadata={"help": "allow a listen address other than loopback or a unix socket: "
                                                                   "the app port has no authentication"})
    http_listen: str = field(default="", metadata={"help": "HOST:PORT for the HTTP API: OpenAI-compatible /v1 and KServe v2 "
                                                        "/v2 (port 0: any free port; empty: off; loopback unless "
                                                        "listen_anywhere)"})
    http_api_keys_file: Path | None = field(default=None, metadata={"help": "bearer keys the HTTP API accepts, one per line "
                                                                         "(none: no authentication)"})
    discovery_interfaces: tuple[str, ...] = field(default=(), metadata={"help": "IPv4 addresses of the interfaces to browse on (default: all)"})
    forget_after_s: float = field(default=10.0, metadata={"help": "a discovered node unreachable this long leaves the table, s"})
    otlp_endpoint: str = field(default="", metadata={"help": "OpenTelemetry collector to send traces to over OTLP/gRPC: "
                                                          "http://HOST:4317 (plaintext) or https://HOST:4317 (empty: none)"})
    trace_file: Path | None = field(default=None, metadata={"help": "also write each finished span here, one JSON object per line"})
    metrics_listen: str = field(default="", metadata={"help": "HOST:PORT for the Prometheus /metrics endpoint (port 0: any; empty: off)"})
    log_format: str = field(default="text", metadata={"help": "log lines as text or json (one object per line)"})
    policy: Path | None = field(default=None, metadata={"help": "TOML policy file (offload-tune write-policy) over these flags; reloaded on SIGHUP"})
    refresh_s: float = field(default=2.0, metadata={"help": "how often node status (load, RTT) is refreshed, s"})
    max_concurrency: int = field(default=4, metadata={"help": "requests served at once"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond max_concurrency before RESOURCE_EXHAUSTED"})
    request_memory_mb: float = field(default=0.0, metadata={"help": "memory the tensor requests in the agent may hold at once, "
                                                                    "waiting and running, MiB; a request beyond it is refused "
                                                                    "unread (0: a quarter of the device's RAM or of what is free, "
                                                                    "whichever is less, at most 1024)"})
    threads: int = field(default=0, metadata={"help": "onnxruntime intra-op threads per session (0: onnxruntime default)"})
    ort_spinning: str = field(default="auto", metadata={"help": "onnxruntime threads spin between kernels: on, off, or auto "
                                                                "(off when a CPU quota is visible; say off under a quota /sys cannot show)"})
    max_message_mb: int = field(default=64, metadata={"help": "largest gRPC message accepted or sent, MiB"})
    profile_dir: Path | None = field(default=None, metadata={"help": "profile cache directory (default: $TANDEM_CACHE_DIR or ~/.cache/tandem)"})
    profile_memory_mb: float = field(default=0.0, metadata={"help": "largest estimated memory one profiling run may use, MiB; "
                                                                    "a shape needing more is refused by name (0: a quarter of the device's RAM or "
                                                                    "of what is free, whichever is less, at most 1024)"})
    queue_file: Path | None = field(default=None, metadata={"help": "the deferred requests' SQLite file (default: "
                                                                    "deferred.sqlite in $TANDEM_CACHE_DIR or ~/.cache/tandem)"})
    queue_max_requests: int = field(default=1000, metadata={"help": "deferred requests waiting at once"})
    queue_max_mb: float = field(default=256.0, metadata={"help": "their payloads together, MiB"})
    queue_max_wait_s: float = field(default=86400.0, metadata={"help": "the furthest deliver_by accepted, s from now"})
    queue_drain_share: float = field(default=0.2, metadata={
        "help": "while apps' requests run, deferred deliveries take at most this share of the time (1: no pacing)"})
    result_ttl_s: float = field(default=86400.0, metadata={"help": "an unfetched deferred result (or failure) is kept "
                                                                   "this long, s"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"})
    ready_file: Path | None = field(default=None, metadata={"help": "write {address, pid} JSON here once serving"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def spinning(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.ort_spinning]

    def quality_policy(self) -> QualityPolicy | None:
        if self.llm_quality_file is None:
            return None
        try:
            return QualityPolicy.from_json(self.llm_quality_file.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise config_loader.ConfigError(f"llm_quality_file {self.llm_quality_file}: not a quality policy "
                                            f"offload-tune calibrate-llm wrote: {exc}") from None

    def validate(self) -> None:
        self.tls()  # TLS files, or plaintext said out loud
        policy = self.quality_policy()
        if policy is not None and self.llm_cloud_model and policy.cloud_model != self.llm_cloud_model:
            raise config_loader.ConfigError(f"llm_quality_file was calibrated against {policy.cloud_model}, but "
                                            f"llm_cloud_model is {self.llm_cloud_model}")
        try:
            for address in (*self.cloud, *(n.target() for n in self.nodes)):
                parse_node_address(address)
        except ValueError as exc:
            raise config_loader.ConfigError(str(exc)) from None
        check_log_settings(self.log_level, self.log_format)
        if self.ort_spinning not in ("auto", "on", "off"):
            raise config_loader.ConfigError(f"ort_spinning must be auto, on or off, got {self.ort_spinning!r}")
        error = config_loader.ConfigError
        if self.objective not in {o.value for o in Objective}:
            raise error(f"objective must be latency, energy or weighted, got {self.objective!r}")
        if not 0.0 <= self.weight_latency <= 1.0:
            raise error(f"weight_latency must be within 0..1, got {self.weight_latency}")
        if not 0.0 < self.queue_drain_share <= 1.0:
            raise error(f"queue_drain_share must be within (0, 1], got {self.queue_drain_share}")
        if self.encoding not in codec.ENCODING_BY_NAME:
            raise error(f"encoding must be one of {sorted(codec.ENCODING_BY_NAME)}, got {self.encoding!r}")
        for name in ("slo_ms", "energy_budget_j", "memory_limit_mb", "uplink_mbps", "downlink_mbps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise error(f"{name} must be > 0, got {value}")
        link = (self.uplink_mbps, self.downlink_mbps, self.rtt_ms)
        if any(v is not None for v in link) and any(v is None for v in link):
            raise error("uplink_mbps, downlink_mbps and rtt_ms are given together or not at all")
        if self.hysteresis_margin < 0:
            raise error(f"hysteresis_margin must be >= 0, got {self.hysteresis_margin}")
        if self.privacy_min_local < 0 or self.max_concurrency < 1 or self.max_queue < 0 or self.request_memory_mb < 0:
            raise error("privacy_min_local, max_queue and request_memory_mb must be >= 0, max_concurrency >= 1")
        if (self.llm_slots < 1 or self.llm_max_queue < 0 or self.llm_ctx_per_seq < 16 or self.llm_stall_s <= 0
                or self.llm_failover_places < 0 or not 0 <= self.llm_draft_tokens <= MAX_DRAFT_TOKENS):
            raise error("llm_slots must be >= 1, llm_max_queue >= 0, llm_ctx_per_seq >= 16, llm_stall_s > 0, "
                        f"llm_failover_places >= 0, llm_draft_tokens within 0..{MAX_DRAFT_TOKENS}")
        if self.llm_remote_tokens_per_hour is not None and self.llm_remote_tokens_per_hour < 0:
            raise error("llm_remote_tokens_per_hour must be >= 0")
        if not (len(self.socket_mode) <= 4 and all(ch in "01234567" for ch in self.socket_mode) and self.socket_mode):
            raise error(f"socket_mode must be an octal mode such as 0660, got {self.socket_mode!r}")
        if not (self.listen_anywhere or is_local_listen(self.listen)):
            raise error(f"listen {self.listen} is reachable from other machines, and the app port has no authentication: "
                        "anyone who reaches it can run models and read their outputs. Listen on loopback or a unix socket, "
                        "or say listen_anywhere = true (--listen-anywhere)")
        if self.http_listen and not (self.listen_anywhere or is_local_listen(self.http_listen)):
            raise error(f"http_listen {self.http_listen} is reachable from other machines; listen on loopback, "
                        "or say listen_anywhere = true (with http_api_keys_file, and TLS in front)")
        if self.http_listen.startswith("unix:"):
            raise error("http_listen takes HOST:PORT")
        get_device(self.device)

    def queue(self) -> DeferredStore:
        path = self.queue_file or cache_root() / "deferred.sqlite"
        return DeferredStore(path, QueueLimits(max_requests=self.queue_max_requests, max_bytes=int(self.queue_max_mb * 2**20),
                                               max_wait_s=self.queue_max_wait_s, result_ttl_s=self.result_ttl_s))

    def tls(self) -> TlsFiles | None:
        return tls_from_config(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, plaintext=self.plaintext,
                               daemon="edge-agent")

    def base_policy(self) -> Policy:
        """The policy the flags and config say; a policy file overrides it key by key."""
        return Policy(
            objective=Objective(self.objective),
            weight_latency=self.weight_latency,
            constraints=Constraints(
                slo_ms=self.slo_ms,
                energy_budget_j=self.energy_budget_j,
                memory_limit_bytes=int(self.memory_limit_mb * 2**20) if self.memory_limit_mb else None,
                privacy_min_local=self.privacy_min_local,
            ),
            encoding=codec.ENCODING_BY_NAME[self.encoding],
            cloud_timeout_s=self.cloud_timeout_s,
            hysteresis_margin=self.hysteresis_margin,
        )

    def policies(self, segments: dict[str, int]) -> PolicySet:
        """The flags' policy with the policy file (if any) over it; PolicyError
        (naming the line) for a file the agent must not load."""
        base_llm = LlmLimits(allow_remote=self.llm_allow_remote, remote_tokens_per_hour=self.llm_remote_tokens_per_hour)
        if self.policy is None:
            return PolicySet(default=self.base_policy(), llm=base_llm)
        try:
            text = self.policy.read_text()
            policies = parse(text, self.base_policy(), base_llm)
            warnings = check_models(policies, text, segments)
        except OSError as exc:
            raise PolicyError(f"policy {self.policy}: cannot read it: {exc.strerror}") from None
        except PolicyError as exc:
            raise PolicyError(f"policy {self.policy}: {exc}") from None
        for warning in warnings:
            logger.warning("policy %s: %s", self.policy, warning)
        return policies

    def link_override(self) -> Link | None:
        if self.uplink_mbps is None:
            return None
        return Link(uplink_mbps=self.uplink_mbps, downlink_mbps=self.downlink_mbps, rtt_ms=self.rtt_ms)


async def refresh_loop(table: NodeTable, browser: Browser | None, every_s: float, metrics: Metrics,
                       service: EdgeAgentService) -> None:
    """Status and RTT of every node, health-checking discovered ones out of the table."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await refresh_all(list(table.nodes))
            await judge_cloud(table.nodes, service, metrics)
            for name in await table.prune():
                if browser is not None:
                    browser.forget(name)
            for node in table.nodes:
                if node.link is not None:
                    metrics.set_link(node.address, uplink_mbps=node.link.uplink_mbps,
                                     downlink_mbps=node.link.downlink_mbps, rtt_ms=node.link.rtt_ms)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # shutting down
            logger.info("a node left the table during a refresh")  # its channel closed under the call
        except Exception:  # noqa: BLE001 -- one bad round must not end the refreshing for good
            logger.exception("node refresh failed; trying again in %.1f s", every_s)


async def judge_cloud(nodes: list[CloudNodeClient], service: EdgeAgentService, metrics: Metrics) -> None:
    """The cloud's state after a refresh (online, degraded, offline, and whether
    the device has a route at all), logged when it changes; out of offline,
    the deferred queue is told to look for work."""
    for node in nodes:
        node.routed = node.state.reachable or await asyncio.to_thread(has_route, node.address)
    state = cloud_state([NodeReach(node.state.reachable, node.routed) for node in nodes])
    before = service.cloud
    service.cloud = state
    if state.state is not before.state:
        log = logger.warning if state.offline else logger.info
        log("cloud %s: %s", state.state.value, state.reason)
    metrics.set_cloud(state.state.value)
    if not state.offline:
        service.deliveries.wake()


# Settings SIGHUP applies at once: the policy (file and the flags under it)
# and the log level. The others need a restart (the log says which changed).
RELOADABLE = ("log_level", "policy", "objective", "weight_latency", "slo_ms", "energy_budget_j", "memory_limit_mb",
              "privacy_min_local", "encoding", "hysteresis_margin", "cloud_timeout_s", "llm_allow_remote",
              "llm_remote_tokens_per_hour")


def reload_policy(config: AgentConfig, segments: dict[str, int], service: EdgeAgentService) -> str:
    """The policy file and flags again; a policy that does not check out leaves the current one in force."""
    try:
        policies = config.policies(segments)
    except PolicyError as exc:
        logger.error("%s; rejected, keeping the previous one", exc)
        return "policy kept (rejected)"
    service.use_policies(policies)
    return f"policy {config.policy or '(flags only)'} reloaded"


async def serve(config: AgentConfig, load: Callable[[], AgentConfig] | None = None) -> None:
    heap.map_large_buffers()  # a request's memory goes back to the board when it is done
    traces = tracing.configure("edge-agent", otlp_endpoint=config.otlp_endpoint, trace_file=config.trace_file)
    keys = ApiKeys.load(config.http_api_keys_file)  # before the long start: a bad file stops it at once
    store = ModelStore.from_dir(config.models, threads=config.threads or None, spinning=config.spinning())
    segments = {name: model.num_segments for name, model in store.models.items()}
    policies = config.policies(segments)  # an invalid file stops the start, naming the line
    logger.info("policy %s: %s", config.policy or "(flags only)", describe_policy(policies))
    profile_dir = config.profile_dir / "profiles" if config.profile_dir else None
    device = get_device(config.device)
    board = detect_board()
    # Planning for another board than the one we run on: predict its times.
    other_board = device.name not in ("host", board)
    book = ProfileBook(
        store.models, machine=Machine(device.cpu_gflops, device.mem_bandwidth_gbs, name=device.name),
        predict=(lambda model, profile: predicted_for(device, model, profile)) if other_board else None,
        cache_dir=profile_dir, budget_bytes=memory_budget(config.profile_memory_mb, device.memory_bytes),
        configured={name: policies.for_model(name).profile_shapes for name in store.models
                    if policies.for_model(name).profile_shapes},
    )
    await asyncio.to_thread(book.profile_all, codec_errors=[
        name for name in store.models if policies.for_model(name).max_output_error is not None])
    trust = None
    if (tls := config.tls()) is not None:
        ca_pem, cert_pem, key_pem = tls.load()
        trust = Trust(ca_pem, cert_pem, key_pem, channel_credentials(ca_pem, cert_pem, key_pem))
    else:
        plain = [*config.cloud, *(n.address for n in config.nodes if n.tls_ca is None),
                 *(["discovered nodes"] if config.discovery and config.discover_plaintext else [])]
    if trust is not None and (plain_nodes := [n.address for n in config.nodes if n.plaintext]):
        warn_plaintext("edge-agent's link to these nodes", ", ".join(plain_nodes))
        if plain:
            warn_plaintext("edge-agent's link to cloud nodes", ", ".join(plain))
        if config.discovery and not config.discover_plaintext:
            logger.info("discovered nodes are not used: this agent runs plaintext, so they cannot be authenticated "
                        "(TLS files, or discover_plaintext = true in a lab)")

    llms = await asyncio.to_thread(LlmStore.load, config.llm, slots=config.llm_slots, ctx_per_seq=config.llm_ctx_per_seq,
                                   threads=config.llm_threads or None, max_queue=config.llm_max_queue,
                                   prefix_cache_bytes=int(config.llm_prefix_cache_mb * 2**20))
    # what openai nodes are asked to run for each device LLM
    remote_llms = {name: config.llm_remote_model or name for name in llms.engines}

    def make_client(address: str, *, node_name: str | None = None, discovered: bool = False,
                    spec: NodeSpec | None = None) -> CloudNodeClient:
        kind, address = parse_node_address(address)
        spec = spec or NodeSpec(address)
        common = dict(max_message_mb=config.max_message_mb, link_override=config.link_override(),
                      idle_probe_s=config.probe_idle_s, node_name=node_name or spec.tls_name or None,
                      credentials=None if spec.plaintext else spec.credentials() or (trust.credentials if trust else None),
                      discovered=discovered)
        if kind == "oip":
            return OipNodeClient(address, models=store.models, host_profile=book.measured_here, api_key=spec.api_key(),
                                 max_concurrency=spec.max_concurrency, **common)
        if kind == "openai":
            return OpenAiNodeClient(address, models=remote_llms, api_key=spec.api_key(), slots=spec.slots,
                                    ca_file=spec.tls_ca,
                                    client_cert=(spec.tls_cert, spec.tls_key) if spec.tls_cert else None, **common)
        return CloudNodeClient(address, **common)

    nodes = [make_client(a) for a in config.cloud] + [make_client(spec.target(), spec=spec) for spec in config.nodes]
    table = NodeTable(nodes, trust=trust, plaintext_ok=config.discover_plaintext, make_client=make_client, forget_after_s=config.forget_after_s,
                      drain_grace_s=config.cloud_timeout_s)
    await refresh_all(nodes, measure_link=True)
    for node in nodes:
        state = node.state
        if state.reachable:
            logger.info("cloud node %s (%s): models %s, link %s", node.address, state.node_id, sorted(state.models), node.link)
        else:
            logger.warning("cloud node %s unreachable at start (%s); will keep trying", node.address, state.error)

    generator = Generator(
        llms, nodes, power_of(device),
        LlmSettings(allow_remote=policies.llm.allow_remote, remote_tokens_per_hour=policies.llm.remote_tokens_per_hour,
                    slo_ms=config.slo_ms, stall_s=config.llm_stall_s, failover_places=config.llm_failover_places,
                    cloud_model=config.llm_cloud_model, quality=config.quality_policy(),
                    draft_tokens=config.llm_draft_tokens),
        weight_latency=policies.default.weight_latency,
    )
    metrics = Metrics("edge-agent")
    service = EdgeAgentService(
        store=store, book=book, nodes=nodes, power=power_of(device), metrics=metrics,
        power_figures=PowerFit().figures(device.idle_w, device.active_w, device.name), device_name=device.name,
        codec_speed=measure_codec_speed(), policies=policies,
        max_concurrency=config.max_concurrency, max_queue=config.max_queue, generator=generator,
        memory_bytes=memory_budget(config.request_memory_mb, device.memory_bytes),
    )
    queue = config.queue()
    service.deliveries = Deliveries(
        queue, nodes, infer=service.serve_tensors, generate=service.generation,
        serves_llm=lambda model: bool(generator.served_models().get(model)),  # the nodes serving it now
        onnx_digest=lambda model: store.models[model].digest if model in store.models else None,
        traffic=service.traffic, drain_share=config.queue_drain_share)

    def deferred_now() -> tuple[int, float]:
        stats = queue.stats()
        return stats.pending, stats.oldest_age_s

    metrics.watch_deferred(deferred_now)
    server = grpc.aio.server(options=server_options(config.max_message_mb, stream_window_bytes=APP_STREAM_WINDOW_BYTES))
    add_service(server, pb_grpc.add_EdgeAgentServicer_to_server, service, read_when_admitted=("Infer",))
    regions = service.regions
    add_service(server, oip.oip_grpc.add_GRPCInferenceServiceServicer_to_server,
                oip.InferenceService(service, regions, package_version("tandem")), read_when_admitted=("ModelInfer",))
    health = add_health(server)
    service_name = pb.DESCRIPTOR.services_by_name["EdgeAgent"].full_name
    add_reflection(server, [service_name, oip.SERVICE])
    address = bind(server, config.listen)  # apps on this device: loopback or a unix socket by default
    metrics_url = metrics.serve(config.metrics_listen) if config.metrics_listen else ""
    http = HttpApi(service, keys=keys, max_body_bytes=config.max_message_mb * 2**20, regions=regions,
                   version=package_version("tandem"))
    http_url = await http.start(config.http_listen) if config.http_listen else ""
    await server.start()
    socket = unix_socket_path(config.listen)
    if socket is not None:
        socket.chmod(int(config.socket_mode, 8))  # created under the umask: apps in the group could not connect
    set_serving(health, [service_name, oip.SERVICE])
    browser = None
    if config.discovery:
        browser = Browser(interfaces=config.discovery_interfaces, on_added=table.added, on_removed=table.removed)
        await browser.start()
    write_ready_file(config.ready_file, address, {key: url for key, url in (("metrics", metrics_url), ("http", http_url)) if url})
    if http_url:
        logger.info("HTTP API (OpenAI /v1, KServe v2 /v2) on %s%s", http_url, "" if http.keys.required else ", no API keys")
    logger.info("edge agent (%s) serving %d models on %s; requests may hold %.0f MiB at once", device.name,
                len(store.models), address, service.memory.limit_bytes / 2**20)
    await judge_cloud(table.nodes, service, metrics)
    refresher = asyncio.create_task(refresh_loop(table, browser, config.refresh_s, metrics, service))
    if load is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_settings, [config], load, RELOADABLE,
                                                      lambda fresh: reload_policy(fresh, segments, service))
    monitor = PowerMonitor(device, root=config.sysfs_root, window_s=config.power_window_s, apply=service.use_power)
    metering = asyncio.create_task(monitor.run())
    delivering = asyncio.create_task(service.deliveries.run())
    signame = await wait_for_shutdown()
    logger.info("%s: draining for up to %.1f s", signame, config.grace_s)
    for task in (refresher, metering, delivering):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if browser is not None:
        await browser.close()
    health.enter_graceful_shutdown()
    await asyncio.gather(server.stop(config.grace_s), http.stop())
    service.close()
    queue.close()
    metrics.stop()
    for node in nodes:
        await node.close()
    if traces is not None:
        traces.shutdown()  # sends what is still batched


def describe_policy(policies: PolicySet) -> str:
    """What the agent will plan by, in one log line."""
    default, c = policies.default, policies.default.constraints
    limits = [f"{name} {value}" for name, value in (("SLO ms", c.slo_ms), ("energy budget J", c.energy_budget_j),
                                                    ("memory limit bytes", c.memory_limit_bytes),
                                                    ("privacy floor", c.privacy_min_local or None),
                                                    ("allowed cuts", None if c.allowed_cuts is None else sorted(c.allowed_cuts)),
                                                    ("tensors to the cloud", None if c.allow_remote else "never"))
              if value is not None]
    own = f"; own policies for {', '.join(sorted(policies.models))}" if policies.models else ""
    remote = "allowed" if policies.llm.allow_remote else "never"
    return (f"objective {default.objective.value}, {', '.join(limits) or 'no limits'}; "
            f"LLM prompts to the cloud {remote}{own}")


def is_local_listen(listen: str) -> bool:
    """A unix socket, or a loopback HOST:PORT (localhost, 127.0.0.0/8, ::1)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname resolves to whatever it resolves to


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, prog="edge-agent", description=__doc__, config_cls=AgentConfig, env_prefix="TANDEM_AGENT",
                      serve=serve)


if __name__ == "__main__":
    sys.exit(main())
