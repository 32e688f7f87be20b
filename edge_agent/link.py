"""The live estimate of the link to one cloud node.

Fed by every real transfer (split tensors and whole requests going up,
results coming down) and by small probes when the link has been idle; smoothed
so one slow packet does not swing the plan, quick enough that a changed link
is followed within a few requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.costmodel import Link

# Weight of the newest sample in the moving averages.
SMOOTHING = 0.3
# Transfers shorter than this (after the RTT is taken off) say more about
# timer noise and per-call costs than about bandwidth; they are not used.
MIN_SAMPLE_MS = 2.0
# Requests smaller than this are not used to correct the bandwidth either:
# their time is mostly per-call work, not bytes on the wire.
MIN_SAMPLE_BYTES = 32 * 1024
# Probes cancel fixed costs (two sizes), so they are trusted more than
# request timings.
PROBE_SMOOTHING = 0.5
# Ceiling for a bandwidth figure: above it the sample is noise (loopback).
MAX_MBPS = 40_000.0


@dataclass
class LinkEstimator:
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    samples: int = 0
    last_transfer: float | None = None   # monotonic time of the last real transfer
    measured_up: bool = False             # until then the rates are priors, replaced by the first sample
    measured_down: bool = False

    def link(self) -> Link:
        return Link(uplink_mbps=self.uplink_mbps, downlink_mbps=self.downlink_mbps, rtt_ms=self.rtt_ms)

    def observe_rtt(self, rtt_ms: float) -> None:
        self.rtt_ms += SMOOTHING * (max(rtt_ms, 0.0) - self.rtt_ms)

    def observe_one_way(self, *, uplink: bool, size_bytes: int, transfer_ms: float, at_least: bool = False) -> None:
        """A probe that moved ``size_bytes`` one way in ``transfer_ms`` beyond the RTT.
        ``at_least``: the transfer was too quick to time, so its rate (with
        the time floored at MIN_SAMPLE_MS) is a lower bound, taken as the
        estimate rather than keeping a prior that is surely too slow."""
        if size_bytes <= 0 or (transfer_ms < MIN_SAMPLE_MS and not at_least):
            return
        mbps = min(size_bytes * 8 / (max(transfer_ms, MIN_SAMPLE_MS) * 1e3), MAX_MBPS)
        if uplink:
            self.uplink_mbps = _smoothed_rate(self.uplink_mbps, mbps, PROBE_SMOOTHING) if self.measured_up else mbps
            self.measured_up = True
        else:
            self.downlink_mbps = _smoothed_rate(self.downlink_mbps, mbps, PROBE_SMOOTHING) if self.measured_down else mbps
            self.measured_down = True
        self.samples += 1

    def observe_transfer(self, *, up_bytes: int, down_bytes: int, network_ms: float, now: float) -> None:
        """A request/reply whose time on the wire (RTT included) was ``network_ms``.

        One round trip cannot tell uplink from downlink time, so the time
        beyond the RTT is shared out in proportion to what the current
        estimates predict for each direction, and both are corrected by the
        same factor. A transfer dominated by one direction (split tensors up,
        logits down) therefore mostly corrects that direction.
        """
        self.last_transfer = now
        wire_ms = network_ms - self.rtt_ms
        predicted_up = up_bytes * 8 / (self.uplink_mbps * 1e3)
        predicted_down = down_bytes * 8 / (self.downlink_mbps * 1e3)
        predicted = predicted_up + predicted_down
        if wire_ms < MIN_SAMPLE_MS or predicted <= 0 or up_bytes + down_bytes < MIN_SAMPLE_BYTES:
            return
        factor = predicted / wire_ms  # > 1: faster than we thought
        self.uplink_mbps = _smoothed_rate(self.uplink_mbps, min(self.uplink_mbps * factor, MAX_MBPS))
        self.downlink_mbps = _smoothed_rate(self.downlink_mbps, min(self.downlink_mbps * factor, MAX_MBPS))
        self.samples += 1


def _smoothed_rate(old: float, new: float, weight: float = SMOOTHING) -> float:
    """Average in time per bit, not bits per second: a link that alternates
    between 1 and 100 Mbit/s behaves like ~2 Mbit/s for bulk data, not 50."""
    return 1.0 / (1.0 / old + weight * (1.0 / new - 1.0 / old))
