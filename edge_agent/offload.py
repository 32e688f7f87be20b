"""The agent's view of one cloud node: its channel, load, link and profiles."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field

import grpc

from partitioner.costmodel import Link
from partitioner.profile import ModelProfile
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.rpc import channel_options

logger = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20


@dataclass
class NodeState:
    """What the agent last learned about a node; replaced, never half-updated."""

    reachable: bool = False
    node_id: str = ""
    load: pb.NodeLoad = field(default_factory=pb.NodeLoad)
    models: dict[str, pb.ModelInfo] = field(default_factory=dict)   # name -> info (digest)
    link: Link | None = None
    error: str = ""


class CloudNodeClient:
    def __init__(self, address: str, *, max_message_mb: int, link_override: Link | None = None) -> None:
        self.address = address
        self.link_override = link_override
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = pb_grpc.CloudNodeStub(self._channel)
        self.state = NodeState()
        self._profiles: dict[str, ModelProfile] = {}  # digest -> profile measured on the node

    async def refresh(self, *, timeout_s: float = 2.0, measure_link: bool = False) -> NodeState:
        """Ask the node for its status (and the link for RTT/bandwidth)."""
        try:
            rtts = []
            for _ in range(3):
                start = time.perf_counter()
                status = await self.stub.Status(pb.StatusRequest(), timeout=timeout_s)
                rtts.append((time.perf_counter() - start) * 1e3)
            link = self.state.link
            if measure_link or link is None:
                link = await self._measure_link(statistics.median(rtts), timeout_s)
            else:
                link = Link(link.uplink_mbps, link.downlink_mbps, statistics.median(rtts))
            self.state = NodeState(
                reachable=True, node_id=status.node_id, load=status.load,
                models={m.name: m for m in status.models}, link=self.link_override or link,
            )
        except grpc.RpcError as exc:
            self.mark_down(f"{exc.code().name}: {exc.details()}")
        return self.state

    async def _measure_link(self, rtt_ms: float, timeout_s: float) -> Link:
        """One uplink and one downlink transfer of PROBE_BYTES, less the RTT."""
        start = time.perf_counter()
        await self.stub.Probe(pb.ProbeRequest(payload=bytes(PROBE_BYTES), reply_bytes=0), timeout=timeout_s)
        up_s = max((time.perf_counter() - start) * 1e3 - rtt_ms, 1e-3) / 1e3
        start = time.perf_counter()
        await self.stub.Probe(pb.ProbeRequest(reply_bytes=PROBE_BYTES), timeout=timeout_s)
        down_s = max((time.perf_counter() - start) * 1e3 - rtt_ms, 1e-3) / 1e3
        bits = PROBE_BYTES * 8
        return Link(uplink_mbps=bits / up_s / 1e6, downlink_mbps=bits / down_s / 1e6, rtt_ms=rtt_ms)

    def mark_down(self, reason: str) -> None:
        if self.state.reachable:
            logger.warning("cloud node %s unavailable: %s", self.address, reason)
        self.state = NodeState(reachable=False, error=reason, link=self.state.link)

    def update_load(self, load: pb.NodeLoad) -> None:
        self.state.load = load

    async def profile(self, model: str, digest: str, *, timeout_s: float = 120.0) -> ModelProfile | None:
        """The node's measured profile of ``model`` if its copy matches ``digest``."""
        info = self.state.models.get(model)
        if info is None or info.digest != digest:
            return None
        if digest not in self._profiles:
            reply = await self.stub.GetProfile(pb.ProfileRequest(model=model), timeout=timeout_s)
            self._profiles[digest] = ModelProfile.from_json(reply.json)
        return self._profiles[digest]

    async def close(self) -> None:
        await self._channel.close()


async def refresh_all(nodes: list[CloudNodeClient], **kwargs) -> None:
    await asyncio.gather(*(node.refresh(**kwargs) for node in nodes))
