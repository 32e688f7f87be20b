"""The agent's view of one cloud node: its channel, load, link and profiles."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc

from edge_agent.link import LinkEstimator
from partitioner.costmodel import Link
from partitioner.profile import ModelProfile
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.rpc import channel_options

logger = logging.getLogger(__name__)

PROBE_START_BYTES = 16 * 1024    # ~0.5 s on a 0.25 Mbit/s link
PROBE_MAX_BYTES = 4 << 20
PROBE_TARGET_MS = 60.0           # stop doubling once a transfer takes this long
PROBE_MIN_MS = 10.0              # shorter transfers are too short to time (or ride the shaper's burst)
PROBE_TIMEOUT_S = 10.0
IDLE_PROBE_S = 10.0  # probe a link that carried no request for this long
# A live node answers an empty probe in about one RTT. A hung one (stopped,
# deadlocked, its host swapping) keeps its TCP connection up and answers
# nothing, so a call to it waits out its whole budget unless the agent asks:
# the probe may take this many RTTs, plus the time the bytes this agent has
# in flight to the node need on the uplink (they are ahead of it), within
# these bounds (the floor: a busy board's scheduling noise, seen above 0.3 s
# with two processes spinning on both cores here).
LIVENESS_RTTS = 20
LIVENESS_MIN_S = 1.0
LIVENESS_MAX_S = 5.0
RELEASE_TIMEOUT_S = 5.0  # telling a draining node a handed-over state is not wanted


class NodeFailed(Exception):
    """A call the node could not run, or whose answer is no reply: the request retries or falls back."""


class NodeHung(NodeFailed):
    """The node answered neither a call nor an empty probe in time: it is marked down."""


@dataclass
class NodeState:
    """What the agent last learned about a node; replaced, never half-updated."""

    reachable: bool = False
    node_id: str = ""
    load: pb.NodeLoad = field(default_factory=pb.NodeLoad)
    models: dict[str, pb.ModelInfo] = field(default_factory=dict)   # name -> info (digest)
    llm: list[pb.LlmLoad] = field(default_factory=list)
    error: str = ""


class CloudNodeClient:
    """A ``tandem`` node (cloud-node). Other kinds (oip_node) keep this
    interface: the planner and the fallback see only what it reports."""

    kind = "tandem"
    probe_directions = (True, False)  # uplink, downlink: the node echoes and sends probe bytes

    def __init__(self, address: str, *, max_message_mb: int, link_override: Link | None = None,
                 idle_probe_s: float = IDLE_PROBE_S, credentials: grpc.ChannelCredentials | None = None,
                 node_name: str | None = None, discovered: bool = False) -> None:
        """``credentials`` for TLS; ``node_name`` is the name the node's
        certificate must carry when it differs from the address's host (a
        discovered node reached by IP)."""
        self.address = address
        self.idle_probe_s = idle_probe_s
        self.link_override = link_override
        self.discovered = discovered
        self._channel = self._open_channel(address, max_message_mb, credentials, node_name)
        self.stub = pb_grpc.CloudNodeStub(self._channel) if self._channel is not None else None
        self.state = NodeState()
        self.estimator: LinkEstimator | None = None
        self._last_probe = 0.0
        self._profiles: dict[str, ModelProfile] = {}  # digest -> profile measured on the node
        self._generation = 0  # bumped by mark_down, so a refresh in flight cannot undo it
        self.down_since: float | None = None  # monotonic time it was last found unreachable, None while reachable
        self.inflight = 0     # this agent's requests on the node now
        self.bytes_in_flight = 0  # their request bytes (ahead of any probe on the uplink)
        self._liveness: asyncio.Future[bool] | None = None  # the probe callers share while it runs
        self.last_sent = 0.0  # monotonic time of this agent's last request to it
        self.closed = False   # left the table: no more refreshes
        self.routed = True    # this host has a route to it (checked while it does not answer)
        self._background: set[asyncio.Task] = set()  # calls nobody awaits (release_state)

    @staticmethod
    def _open_channel(address: str, max_message_mb: int, credentials: grpc.ChannelCredentials | None,
                      node_name: str | None) -> grpc.aio.Channel | None:
        options = channel_options(max_message_mb)
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        if node_name:
            options.append(("grpc.ssl_target_name_override", node_name))
        return grpc.aio.secure_channel(address, credentials, options=options)

    @property
    def link(self) -> Link | None:
        """The link the planner should use: the operator's override, else the live estimate."""
        if self.link_override is not None:
            return self.link_override
        return self.estimator.link() if self.estimator else None

    def liveness_timeout_s(self) -> float:
        """How long an empty probe may take before the node counts as hung
        (LIVENESS_RTTS): from the measured link, not the operator's override,
        which says what to plan with rather than what the path does now."""
        link = self.estimator.link() if self.estimator else self.link_override
        if link is None:
            return LIVENESS_MAX_S
        ahead_s = self.bytes_in_flight * 8 / (link.uplink_mbps * 1e6)
        return min(max(LIVENESS_RTTS * link.rtt_ms / 1e3, LIVENESS_MIN_S), LIVENESS_MAX_S) + ahead_s

    async def answers(self) -> bool:
        """Whether the node answers an empty probe within liveness_timeout_s.
        Callers that ask while a probe runs share its answer."""
        if self._liveness is None or self._liveness.done():
            self._liveness = asyncio.ensure_future(self._alive(self.liveness_timeout_s()))
        return await asyncio.shield(self._liveness)

    async def _alive(self, timeout_s: float) -> bool:
        try:
            await self._probe(pb.ProbeRequest(), timeout_s)
            return True
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.CancelledError):
            return False

    async def unless_hung(self, call: asyncio.Future, check_after_s: float):
        """The result of ``call`` (an RPC to this node). Each time it has run
        ``check_after_s`` (doubling) without an answer the node is probed; one
        that answers no probe either is hung: it is marked down, the call
        cancelled and NodeHung raised, long before the call's own deadline."""
        waited_s = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=check_after_s)
                if done:
                    return call.result()
                waited_s += check_after_s
                probe_s = self.liveness_timeout_s()
                if not call.done() and not await self.answers():
                    reason = (f"hung: no reply to a call in {waited_s * 1e3:.0f} ms, "
                              f"nor to an empty probe in {probe_s * 1e3:.0f} ms")
                    self.mark_down(reason)
                    raise NodeHung(reason)
                check_after_s *= 2
        finally:
            call.cancel()  # no-op once done; otherwise nobody is waiting for it any more

    async def _probe(self, request: pb.ProbeRequest, timeout_s: float) -> None:
        await self.stub.Probe(request, timeout=timeout_s)

    async def _timed_probe(self, request: pb.ProbeRequest, timeout_s: float) -> float:
        start = time.perf_counter()
        await self._probe(request, timeout_s)
        return (time.perf_counter() - start) * 1e3

    def call(self, method: str, request, *, timeout_s: float, metadata) -> Awaitable[pb.RunReply]:
        """RunModel or RunPartition on the node (the pipeline's own messages)."""
        return getattr(self.stub, method)(request, timeout=timeout_s, metadata=metadata)

    async def fetch_state(self, handle: str, size: int, *, timeout_s: float) -> bytes:
        """A handed-over generation's KV state (cloud_node.handoff), exactly
        the ``size`` bytes the node offered; ValueError if it sends otherwise."""
        parts, received = [], 0
        async for chunk in self.stub.FetchState(pb.StateRequest(handle=handle, take=True), timeout=timeout_s):
            received += len(chunk.data)
            if received > size:
                raise ValueError(f"{self.address} sent more than the {size} bytes of state it offered")
            parts.append(chunk.data)
        if received != size:
            raise ValueError(f"{self.address} sent {received} of the {size} bytes of state it offered")
        return b"".join(parts)

    def release_state(self, handle: str) -> None:
        """Tell the node a handed-over state will not be fetched, so its drain
        need not wait for it (in the background; a failure only costs the
        node its drain time)."""
        async def release() -> None:
            with contextlib.suppress(grpc.RpcError):
                async for _ in self.stub.FetchState(pb.StateRequest(handle=handle, take=False), timeout=RELEASE_TIMEOUT_S):
                    pass

        task = asyncio.ensure_future(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def offered_cuts(self, model: str) -> frozenset[int] | None:
        """The chain cuts (0: the whole model) the node runs for ``model``; None: any."""
        return None

    def facts(self, model: str, digest: str) -> tuple[bool, str]:
        """Whether the node can plan ``model`` (this copy), and why not or whence its figures."""
        if not self.state.reachable:
            return False, f"unreachable: {self.state.error}"
        info = self.state.models.get(model)
        if info is None:
            return False, "does not serve it"
        if info.digest != digest:
            return False, "serves another copy of it (its digest differs from the device's)"
        if self.profile(model, digest) is None:
            return False, "has not published a profile of it yet"
        return True, "compute from the profile the node measured and published; queue as the node reports it; link probed"

    async def _probe_bandwidth(self) -> None:
        """Bandwidth each way from transfers of doubling size, 16 KiB up,
        until one takes PROBE_TARGET_MS, so the probe stays short on any link
        (a collapsed link is measured in a fraction of a second, not flooded
        by a probe sized for the old rate). The sample is the best rate among
        the transfers long enough to time (at least PROBE_MIN_MS beyond the
        RTT): per-call costs make small transfers look slow, and a shallow
        queue that drops a large burst makes large ones look slow."""
        assert self.estimator is not None
        try:
            for uplink in self.probe_directions:
                rates = []
                size = PROBE_START_BYTES
                while size <= PROBE_MAX_BYTES:
                    request = pb.ProbeRequest(payload=bytes(size)) if uplink else pb.ProbeRequest(reply_bytes=size)
                    wire_ms = await self._timed_probe(request, PROBE_TIMEOUT_S) - self.estimator.rtt_ms
                    if wire_ms >= PROBE_MIN_MS:
                        rates.append((size * 8 / (wire_ms * 1e3), size, wire_ms))
                    if wire_ms >= PROBE_TARGET_MS:
                        break
                    size *= 2
                if rates:
                    _, best_size, best_ms = max(rates)
                    self.estimator.observe_one_way(uplink=uplink, size_bytes=best_size, transfer_ms=best_ms)
                else:  # even the largest probe was too quick to time: the link is at least this fast
                    self.estimator.observe_one_way(uplink=uplink, size_bytes=size // 2, transfer_ms=max(wire_ms, 0.0),
                                                   at_least=True)
                    logger.debug("probe %s %s: %s", self.address, "up" if uplink else "down",
                                 ", ".join(f"{s} B in {t:.1f} ms" for _, s, t in rates))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            logger.info("bandwidth probe to %s timed out; keeping the estimate", self.address)
            return
        self._last_probe = time.monotonic()

    async def _rtt(self, timeout_s: float) -> float | None:
        """The fastest of a few empty round trips (slower ones carry scheduling
        noise, not the path); None when it answers none of them within its
        liveness time: hung, not slow, and marked down."""
        probe_s = self.liveness_timeout_s() if self.estimator is not None else timeout_s
        try:
            return min([await self._timed_probe(pb.ProbeRequest(), probe_s) for _ in range(3)])
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            self.mark_down(f"hung: no answer to an empty probe in {probe_s * 1e3:.0f} ms")
            return None

    async def _observe_link(self, rtt_ms: float, *, measure_link: bool) -> None:
        """The RTT into the estimate; bandwidth probed on the first call, when
        asked, or when the link carried nothing for idle_probe_s."""
        if self.estimator is None:
            self.estimator = LinkEstimator(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=rtt_ms)
            measure_link = True
        self.estimator.observe_rtt(rtt_ms)
        now = time.monotonic()
        idle = (self.estimator.last_transfer is None or now - self.estimator.last_transfer > self.idle_probe_s) \
            and now - self._last_probe > self.idle_probe_s
        if measure_link or idle:
            await self._probe_bandwidth()

    async def refresh(self, *, timeout_s: float = 2.0, measure_link: bool = False) -> NodeState:
        """What the node says of itself now (``_fetch``), or it marked down with the reason."""
        generation = self._generation
        if self.closed:
            return self.state
        try:
            fresh = await self._fetch(timeout_s, measure_link=measure_link)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.state.reachable:
                # It answered the probes: a slow link busy with a large request
                # delays the status call, that is not a dead node. Keep what we knew.
                logger.info("status of %s timed out; keeping its last state", self.address)
                return self.state
            self.mark_down(f"{exc.code().name}: {exc.details()}")
            return self.state
        except ValueError as exc:  # a profile we cannot read: plan without this node
            self.mark_down(f"unreadable reply: {exc}")
            return self.state
        if fresh is not None and generation == self._generation:
            self.down_since = None
            self.state = fresh
        return self.state

    async def _fetch(self, timeout_s: float, *, measure_link: bool) -> NodeState | None:
        """Status, RTT (empty probes), profiles of new models and, on the
        first call, when asked, or when the link has been idle, bandwidth;
        None when the node is hung (marked down)."""
        rtt_ms = await self._rtt(timeout_s)
        if rtt_ms is None:
            return None
        status = await self.stub.Status(pb.StatusRequest(), timeout=timeout_s)
        await self._observe_link(rtt_ms, measure_link=measure_link)
        for info in status.models:
            # A model the node serves without a profile (it could not be
            # measured there yet) is planned without this node until it has one.
            if info.kind == "onnx" and info.digest not in self._profiles and not info.plans_unavailable:
                reply = await self.stub.GetProfile(pb.ProfileRequest(model=info.name), timeout=timeout_s)
                self._profiles[info.digest] = ModelProfile.from_json(reply.json)
        return NodeState(reachable=True, node_id=status.node_id, load=status.load, llm=list(status.llm),
                         models={m.name: m for m in status.models})

    def observe_transfer(self, *, up_bytes: int, down_bytes: int, network_ms: float) -> None:
        if self.estimator is not None:
            self.estimator.observe_transfer(up_bytes=up_bytes, down_bytes=down_bytes, network_ms=network_ms,
                                            now=time.monotonic())

    def mark_down(self, reason: str) -> None:
        self._generation += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
        if self.state.reachable:
            logger.warning("cloud node %s unavailable: %s", self.address, reason)
        self.state = NodeState(reachable=False, error=reason)

    def update_load(self, load: pb.NodeLoad) -> None:
        self.state.load = load

    def profile(self, model: str, digest: str) -> ModelProfile | None:
        """The node's measured profile of ``model`` if its copy matches ``digest``
        (fetched by ``refresh``, never on a request's path)."""
        info = self.state.models.get(model)
        if info is None or info.digest != digest:
            return None
        return self._profiles.get(digest)

    async def close(self, grace_s: float | None = None) -> None:
        """Close the channel; calls still running get ``grace_s`` to finish
        (None: cancelled at once, as at the agent's own shutdown)."""
        self.closed = True
        await self._channel.close(grace=grace_s)


def has_route(address: str) -> bool:
    """Whether this host has a route to ``address``'s host (HOST:PORT or a
    URL). A UDP socket's connect picks a route without sending anything, and
    fails with ENETUNREACH or EHOSTUNREACH when there is none; a name that no
    longer resolves counts as no route too (no DNS, no uplink)."""
    parsed = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 0, type=socket.SOCK_DGRAM)
    except (OSError, ValueError):
        return False
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.connect(where)
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    return True  # a route exists; this error is something else
    return False


def parse_node_address(text: str) -> tuple[str, str]:
    """(kind, address) of a --cloud entry: HOST:PORT is a cloud-node (tandem),
    oip://HOST:PORT a KServe v2 gRPC server (Triton, KServe, MLServer),
    openai+http(s)://HOST:PORT/v1 an OpenAI-compatible server (its base URL)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "tandem", text
    if scheme in ("tandem", "oip") and rest:
        return scheme, rest
    if scheme in ("openai+http", "openai+https") and rest:
        return "openai", text.removeprefix("openai+")
    raise ValueError(f"cloud node {text!r}: write HOST:PORT (a cloud-node), oip://HOST:PORT (Triton, KServe, "
                     "MLServer) or openai+http://HOST:PORT/v1 (an OpenAI-compatible server)")


async def refresh_all(nodes: list[CloudNodeClient], **kwargs) -> None:
    await asyncio.gather(*(node.refresh(**kwargs) for node in nodes))
