"""Correct the measured profiles with what requests really took.

A profile is measured once, at start-up, in a tight loop of runs; requests
then run among gRPC calls, codec work and other programs, and under a CPU
quota the work around a run eats into the budget the run needs. Two
corrections are learned from every request the agent completes, whichever
plan it ran, so that what one plan teaches applies to all of them:

- ``edge_factor``: measured over predicted device compute, local runs and
  split prefixes alike. A board that heats up and slows its clock, or shares
  its CPU with another program, is followed.
- ``offload_ms``: the device's own cost of one cloud call beyond codec and
  wire time (handing work to threads, gRPC framing and copies), measured as
  the excess of the encode and decode stages over their prediction.

Both are smoothed and bounded, so one odd request moves them little. Pure:
the agent feeds in predictions and measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from partitioner.costmodel import ModelCosts, StagePrediction, Transfer

# Weight of the newest request in the moving averages.
SMOOTHING = 0.2
# Device compute shorter than this is timer noise and per-call cost, not speed.
MIN_EDGE_SAMPLE_MS = 1.0
# The correction stays within these bounds: beyond them the profile is wrong,
# not the conditions, and the agent should be re-profiled (say, restarted).
EDGE_FACTOR_BOUNDS = (0.25, 4.0)
MAX_OFFLOAD_MS = 1_000.0


class MeasuredStages(Protocol):
    edge_ms: float
    encode_ms: float
    decode_ms: float


@dataclass(frozen=True)
class Calibration:
    edge_factor: float = 1.0     # measured / profiled device compute
    offload_ms: float = 0.0      # device time per cloud call beyond codec and wire
    samples: int = 0             # requests learned from
    request_ms: float = 0.0      # device time per request outside every stage (request decode, reply encode), ms

    def observed(self, predicted: StagePrediction, measured: MeasuredStages, *, offloaded: bool,
                 used: Calibration | None = None, outside_ms: float | None = None) -> Calibration:
        """The calibration after a request that ran as planned (not one that
        fell back: its stages are not the plan's). ``predicted`` was made with
        ``used`` (default: this calibration); requests run concurrently, so
        that may be an older one. Each figure moves toward what this request
        showed of the uncalibrated profile, so late or simultaneous requests
        cannot push it past the truth. ``outside_ms``: the request's time in the
        agent outside every stage, measured directly (None: not known)."""
        used = used or self
        edge_factor, offload_ms = self.edge_factor, self.offload_ms
        if predicted.edge_ms >= MIN_EDGE_SAMPLE_MS and measured.edge_ms > 0:
            ratio = measured.edge_ms / (predicted.edge_ms / used.edge_factor)
            low, high = EDGE_FACTOR_BOUNDS
            edge_factor = min(max(edge_factor + SMOOTHING * (ratio - edge_factor), low), high)
        if offloaded:
            codec_ms = predicted.encode_ms + predicted.decode_ms - used.offload_ms
            excess = measured.encode_ms + measured.decode_ms - codec_ms
            offload_ms = min(max(offload_ms + SMOOTHING * (excess - offload_ms), 0.0), MAX_OFFLOAD_MS)
        request_ms = self.request_ms
        if outside_ms is not None:
            request_ms = min(max(request_ms + SMOOTHING * (outside_ms - request_ms), 0.0), MAX_OFFLOAD_MS)
        return Calibration(edge_factor=edge_factor, offload_ms=offload_ms, samples=self.samples + 1, request_ms=request_ms)

    def apply(self, costs: ModelCosts) -> ModelCosts:
        """``costs`` as this device runs them now: compute scaled, each cloud
        call's device-side cost added to the encoding of what it sends."""
        if self.edge_factor == 1.0 and self.offload_ms == 0.0 and self.request_ms == 0.0:
            return costs
        return replace(
            costs,
            request_ms=self.request_ms,
            edge_segment_ms=tuple(t * self.edge_factor for t in costs.edge_segment_ms),
            edge_overhead_ms=costs.edge_overhead_ms * self.edge_factor,
            crossings=self.sent(costs.crossings),
        )

    def sent(self, crossings: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        """``crossings`` with each cloud call's device-side cost added to the encoding
        of what it sends (a codec's crossings, as ``apply`` does the model's own)."""
        return tuple(Transfer(c.wire_bytes, c.encode_ms + self.offload_ms, c.decode_ms) for c in crossings)
