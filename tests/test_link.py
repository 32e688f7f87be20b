"""The agent's live link estimate, fed with hand-made transfers."""

from __future__ import annotations

import pytest

from edge_agent.link import LinkEstimator


def test_a_slower_link_is_followed_within_a_few_transfers() -> None:
    est = LinkEstimator(uplink_mbps=100.0, downlink_mbps=100.0, rtt_ms=10.0)
    # 250 kB up, 4 kB down, now at 1 Mbit/s both ways: 2000 + 32 ms on the wire, plus the 10 ms RTT
    for _ in range(10):
        est.observe_transfer(up_bytes=250_000, down_bytes=4_000, network_ms=10.0 + 2032.0, now=0.0)
    assert est.uplink_mbps == pytest.approx(1.0, rel=0.05)


def test_probes_update_one_direction_and_noise_is_ignored() -> None:
    est = LinkEstimator(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=1.0)
    est.observe_one_way(uplink=True, size_bytes=125_000, transfer_ms=100.0)  # 10 Mbit/s replaces the prior
    est.observe_one_way(uplink=True, size_bytes=125_000, transfer_ms=200.0)  # 5 Mbit/s
    # time per bit smoothed with the probe weight 0.5: 1 / (1/10 + 0.5 * (1/5 - 1/10)) = 6.67 Mbit/s
    assert est.uplink_mbps == pytest.approx(6.667, rel=1e-3)
    assert est.downlink_mbps == 10.0
    est.observe_one_way(uplink=False, size_bytes=1000, transfer_ms=0.1)  # below timer noise
    assert est.downlink_mbps == 10.0 and est.samples == 2


def test_the_first_probe_replaces_the_prior() -> None:
    est = LinkEstimator(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=1.0)
    est.observe_one_way(uplink=True, size_bytes=1_250_000, transfer_ms=100.0)  # 100 Mbit/s
    assert est.uplink_mbps == pytest.approx(100.0)


def test_alternating_rates_average_in_time_per_bit() -> None:
    est = LinkEstimator(uplink_mbps=2.0, downlink_mbps=2.0, rtt_ms=0.0, measured_up=True)
    for i in range(200):
        est.observe_one_way(uplink=True, size_bytes=100_000, transfer_ms=800.0 if i % 2 else 8.0)  # 1 and 100 Mbit/s
    # bulk data over such a link averages ~2 Mbit/s (harmonic mean), nowhere near the arithmetic 50
    assert 1.2 < est.uplink_mbps < 3.0
