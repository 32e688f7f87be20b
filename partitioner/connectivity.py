"""Online, degraded or offline: what the node table says of the cloud as a
whole, and why.

"No route to any node" (the board's uplink is down: a farm's LTE, a vehicle
in a tunnel) is told apart from "the nodes failed" (they are there but do
not answer): both leave no cloud plan to try, but only the first says that
every cloud call would wait out its timeout, and that the probes, not the
requests, should find the way back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Connectivity(str, Enum):
    ONLINE = "online"      # every node answers
    DEGRADED = "degraded"  # some do
    OFFLINE = "offline"    # none does: cloud plans are skipped, deferred work waits


@dataclass(frozen=True)
class NodeReach:
    reachable: bool   # answered its last probes
    routed: bool      # this host has a route to its address


@dataclass(frozen=True)
class CloudState:
    state: Connectivity
    reason: str
    reachable: int
    nodes: int

    @property
    def offline(self) -> bool:
        return self.state is Connectivity.OFFLINE


def cloud_state(nodes: Sequence[NodeReach]) -> CloudState:
    reachable = sum(n.reachable for n in nodes)
    if not nodes:
        return CloudState(Connectivity.OFFLINE, "no cloud node is configured or discovered", 0, 0)
    if reachable == len(nodes):
        return CloudState(Connectivity.ONLINE, f"all {len(nodes)} nodes answer", reachable, len(nodes))
    if reachable:
        return CloudState(Connectivity.DEGRADED, f"{reachable} of {len(nodes)} nodes answer", reachable, len(nodes))
    if not any(n.routed for n in nodes):
        return CloudState(Connectivity.OFFLINE, "no route to any node: this device's uplink is down", 0, len(nodes))
    return CloudState(Connectivity.OFFLINE, f"none of the {len(nodes)} nodes answers", 0, len(nodes))
