"""The cloud's state from the node table: online, degraded, offline, and why."""

from partitioner.connectivity import Connectivity, NodeReach, cloud_state


def test_states_and_their_reasons() -> None:
    up, down, unrouted = NodeReach(True, True), NodeReach(False, True), NodeReach(False, False)
    assert cloud_state([up, up]).state is Connectivity.ONLINE
    degraded = cloud_state([up, down, unrouted])
    assert (degraded.state, degraded.reachable, degraded.nodes) == (Connectivity.DEGRADED, 1, 3)
    failed = cloud_state([down, unrouted])
    assert failed.offline and "none of the 2 nodes answers" in failed.reason
    no_route = cloud_state([unrouted, unrouted])
    assert no_route.offline and "no route to any node" in no_route.reason
    assert cloud_state([]).offline and "no cloud node" in cloud_state([]).reason
