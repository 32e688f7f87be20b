"""The agent's view of one cloud node: its channel, load, link and profiles."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from edge_agent.link import LinkEstimator
from partitioner.costmodel import Link
from partitioner.profile import ModelProfile
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.rpc import channel_options

logger = logging.getLogger(__name__)

# The first bandwidth probe is small enough to finish within seconds even on
# a 0.25 Mbit/s link; later probes are sized from the estimate.
FIRST_PROBE_BYTES = 32 * 1024
PROBE_TIMEOUT_S = 10.0
IDLE_PROBE_S = 10.0  # probe a link that carried no request for this long


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
    def __init__(self, address: str, *, max_message_mb: int, link_override: Link | None = None) -> None:
        self.address = address
        self.link_override = link_override
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = pb_grpc.CloudNodeStub(self._channel)
        self.state = NodeState()
        self.estimator: LinkEstimator | None = None
        self._last_probe = 0.0
        self._profiles: dict[str, ModelProfile] = {}  # digest -> profile measured on the node
        self._generation = 0  # bumped by mark_down, so a refresh in flight cannot undo it

    @property
    def link(self) -> Link | None:
        """The link the planner should use: the operator's override, else the live estimate."""
        if self.link_override is not None:
            return self.link_override
        return self.estimator.link() if self.estimator else None

    async def _timed_probe(self, request: pb.ProbeRequest, timeout_s: float) -> float:
        start = time.perf_counter()
        await self.stub.Probe(request, timeout=timeout_s)
        return (time.perf_counter() - start) * 1e3

    async def _probe_bandwidth(self, size: int) -> None:
        """Bandwidth each way from the difference between transfers of ``size``
        and ``2 * size`` bytes, fastest of two tries each: fixed costs (the
        RTT, per-call work, a CPU-quota stall on a busy board) cancel out
        instead of being charged to the link."""
        assert self.estimator is not None
        try:
            for uplink in (True, False):
                times = []
                for size_now in (size, 2 * size):
                    request = pb.ProbeRequest(payload=bytes(size_now)) if uplink else pb.ProbeRequest(reply_bytes=size_now)
                    times.append(min([await self._timed_probe(request, PROBE_TIMEOUT_S) for _ in range(2)]))
                self.estimator.observe_one_way(uplink=uplink, size_bytes=size, transfer_ms=times[1] - times[0])
                logger.debug("probe %s %s: %d vs %d bytes in %.2f vs %.2f ms", self.address, "up" if uplink else "down",
                             size, 2 * size, times[0], times[1])
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            logger.info("bandwidth probe of %d bytes to %s timed out; keeping the estimate", size, self.address)
            return
        self._last_probe = time.monotonic()

    async def refresh(self, *, timeout_s: float = 2.0, measure_link: bool = False) -> NodeState:
        """Status, RTT (empty probes), profiles of new models and, on the
        first call, when asked, or when the link has been idle, bandwidth."""
        generation = self._generation
        try:
            # The fastest of a few empty round trips: slower ones carry scheduling noise, not the path.
            rtt_ms = min([await self._timed_probe(pb.ProbeRequest(), timeout_s) for _ in range(3)])
            status = await self.stub.Status(pb.StatusRequest(), timeout=timeout_s)
            if self.estimator is None:
                self.estimator = LinkEstimator(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=rtt_ms)
                await self._probe_bandwidth(FIRST_PROBE_BYTES)
                measure_link = True
            self.estimator.observe_rtt(rtt_ms)
            now = time.monotonic()
            idle = (self.estimator.last_transfer is None or now - self.estimator.last_transfer > IDLE_PROBE_S) \
                and now - self._last_probe > IDLE_PROBE_S
            if measure_link or idle:
                await self._probe_bandwidth(self.estimator.probe_bytes())
            for info in status.models:
                if info.kind == "onnx" and info.digest not in self._profiles:
                    reply = await self.stub.GetProfile(pb.ProfileRequest(model=info.name), timeout=timeout_s)
                    self._profiles[info.digest] = ModelProfile.from_json(reply.json)
        except grpc.RpcError as exc:
            self.mark_down(f"{exc.code().name}: {exc.details()}")
            return self.state
        except ValueError as exc:  # a profile we cannot read: plan without this node
            self.mark_down(f"unreadable profile: {exc}")
            return self.state
        if generation == self._generation:
            self.state = NodeState(reachable=True, node_id=status.node_id, load=status.load, llm=list(status.llm),
                                   models={m.name: m for m in status.models})
        return self.state

    def observe_transfer(self, *, up_bytes: int, down_bytes: int, network_ms: float) -> None:
        if self.estimator is not None:
            self.estimator.observe_transfer(up_bytes=up_bytes, down_bytes=down_bytes, network_ms=network_ms,
                                            now=time.monotonic())

    def mark_down(self, reason: str) -> None:
        self._generation += 1
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

    async def close(self) -> None:
        await self._channel.close()


async def refresh_all(nodes: list[CloudNodeClient], **kwargs) -> None:
    await asyncio.gather(*(node.refresh(**kwargs) for node in nodes))
