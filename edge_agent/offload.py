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
# A transfer faster than this is measurement noise (loopback, tiny payload):
# report this ceiling rather than a figure that makes the network look free.
MAX_PLAUSIBLE_MBPS = 40_000.0


@dataclass
class NodeState:
    """What the agent last learned about a node; replaced, never half-updated."""

    reachable: bool = False
    node_id: str = ""
    load: pb.NodeLoad = field(default_factory=pb.NodeLoad)
    models: dict[str, pb.ModelInfo] = field(default_factory=dict)   # name -> info (digest)
    llm: list[pb.LlmLoad] = field(default_factory=list)
    link: Link | None = None
    error: str = ""


def _mbps(size_bytes: int, seconds: float) -> float:
    if seconds <= 0:
        return MAX_PLAUSIBLE_MBPS
    return min(size_bytes * 8 / seconds / 1e6, MAX_PLAUSIBLE_MBPS)


class CloudNodeClient:
    def __init__(self, address: str, *, max_message_mb: int, link_override: Link | None = None) -> None:
        self.address = address
        self.link_override = link_override
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = pb_grpc.CloudNodeStub(self._channel)
        self.state = NodeState()
        self._profiles: dict[str, ModelProfile] = {}  # digest -> profile measured on the node
        self._generation = 0  # bumped by mark_down, so a refresh in flight cannot undo it

    async def _timed_probe(self, request: pb.ProbeRequest, timeout_s: float) -> float:
        start = time.perf_counter()
        await self.stub.Probe(request, timeout=timeout_s)
        return time.perf_counter() - start

    async def refresh(self, *, timeout_s: float = 2.0, measure_link: bool = False) -> NodeState:
        """Status, RTT (empty probes), profiles of new models and, when asked,
        bandwidth (the time a 1 MiB payload adds over an empty probe)."""
        generation = self._generation
        try:
            empty = pb.ProbeRequest()
            rtt_s = statistics.median([await self._timed_probe(empty, timeout_s) for _ in range(3)])
            status = await self.stub.Status(pb.StatusRequest(), timeout=timeout_s)
            link = self.state.link
            if measure_link or link is None:
                up_s = await self._timed_probe(pb.ProbeRequest(payload=bytes(PROBE_BYTES)), timeout_s) - rtt_s
                down_s = await self._timed_probe(pb.ProbeRequest(reply_bytes=PROBE_BYTES), timeout_s) - rtt_s
                link = Link(uplink_mbps=_mbps(PROBE_BYTES, up_s), downlink_mbps=_mbps(PROBE_BYTES, down_s), rtt_ms=rtt_s * 1e3)
            else:
                link = Link(link.uplink_mbps, link.downlink_mbps, rtt_s * 1e3)
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
            self.state = NodeState(
                reachable=True, node_id=status.node_id, load=status.load, llm=list(status.llm),
                models={m.name: m for m in status.models}, link=self.link_override or link,
            )
        return self.state

    def mark_down(self, reason: str) -> None:
        self._generation += 1
        if self.state.reachable:
            logger.warning("cloud node %s unavailable: %s", self.address, reason)
        self.state = NodeState(reachable=False, error=reason, link=self.state.link)

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
