"""Turn measured profiles into the cost model's inputs.

Pure: the agent gathers profiles, codec speeds, link estimates and node load;
this module turns them into ``ModelCosts`` and ``CloudOption`` values.

Profiles are measured at a few concrete input shapes (``partitioner.shapes``).
A request of another shape is planned from the nearest profile rescaled by
``at_shape``: each segment's time by the ratio of its roofline time at the
request's shapes to that at the profiled ones (per-node FLOPs and bytes from
``partitioner.work``), tensor sizes from shape inference at the request's
shapes. Only where shape inference cannot reach does it fall back to the
ratio of input element counts, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from partitioner.costmodel import CloudOption, Link, ModelCosts, Power, Transfer
from partitioner.profile import ModelProfile, TensorMeta
from partitioner.work import Machine, Work, roofline_ms
from protos.codec import ENCODING_BY_NAME, wire_bytes

RAW_ENCODING = ENCODING_BY_NAME["raw"]

# Headroom kept for a local fallback after a cloud attempt: the fallback's
# predicted time is multiplied by this before it is reserved.
FALLBACK_MARGIN = 1.2


@dataclass(frozen=True)
class CodecSpeed:
    """Measured codec throughput on one host, MB of raw tensor per second.

    Measured on float32 activations; integer tensors under a lossy encoding
    travel raw, so this slightly overstates their codec time.
    """

    encode_mb_s: float
    decode_mb_s: float


def element_ratio(profile: ModelProfile, shapes: Mapping[str, Sequence[int]]) -> float:
    """How many times more input elements this request has than the profiled run."""
    profiled = sum(math.prod(meta.shape) for meta in profile.crossings[0])
    requested = sum(math.prod(shape) for shape in shapes.values())
    return requested / profiled if profiled else 1.0


def profiled_shapes(profile: ModelProfile) -> dict[str, tuple[int, ...]]:
    """The input shapes a profile was measured at."""
    return {meta.name: tuple(meta.shape) for meta in profile.crossings[0]}


@dataclass(frozen=True)
class AtShape:
    """A profile as it would read at a request's shapes."""

    profile: ModelProfile   # segment times and tensor sizes at the request's shapes
    bytes_scale: float      # multiplies the tensor sizes above: 1.0 unless they could not be inferred
    method: str             # "measured", "work model" or "element count": how times were scaled
    basis: str = ""         # the measured shapes it was scaled from, as partitioner.shapes.describe writes them


def at_shape(
    profile: ModelProfile, shapes: Mapping[str, Sequence[int]], *, machine: Machine,
    works_profiled: Sequence[Work] | None, works_requested: Sequence[Work] | None,
    tensors: tuple[tuple[tuple[TensorMeta, ...], ...], tuple[TensorMeta, ...]] | None,
) -> AtShape:
    """``profile`` rescaled to ``shapes`` (see the module docstring).

    ``works_*`` are the segment works at the profiled and requested shapes
    (None: unknown); ``tensors`` the crossings and outputs at the requested
    shapes (None: shape inference could not reach them). ``machine`` is where
    the times are for: the ratio of roofline times depends on whether a layer
    is compute- or bandwidth-bound there.
    """
    wanted = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    basis = ", ".join(f"{n}[{','.join(map(str, s))}]" for n, s in profiled_shapes(profile).items())
    if wanted == profiled_shapes(profile):
        return AtShape(profile, 1.0, "measured", basis)
    elements = element_ratio(profile, wanted)
    segment_ms, method = _scaled_segments(profile, machine, works_profiled, works_requested, elements)
    crossings, outputs, bytes_scale = (*tensors, 1.0) if tensors is not None else (
        profile.crossings, profile.outputs, elements)
    scaled = replace(profile, segment_ms=segment_ms, whole_ms=sum(segment_ms) + profile.run_overhead_ms,
                     crossings=crossings, outputs=outputs)
    return AtShape(scaled, bytes_scale, method, basis)


def _scaled_segments(profile: ModelProfile, machine: Machine, before: Sequence[Work] | None,
                     after: Sequence[Work] | None, elements: float) -> tuple[tuple[float, ...], str]:
    """Per-segment roofline ratios; where a segment's work is unknown, the
    whole model's known ratio; with none known, the element ratio."""
    n = profile.num_segments
    if before is None or after is None or len(before) != n or len(after) != n:
        return tuple(t * elements for t in profile.segment_ms), "element count"
    old = [roofline_ms(w, machine) for w in before]
    new = [roofline_ms(w, machine) for w in after]
    known = [(o, m) for o, m, wb, wa in zip(old, new, before, after) if o > 0 and wb.known and wa.known]
    if not known:
        return tuple(t * elements for t in profile.segment_ms), "element count"
    whole = sum(m for _, m in known) / sum(o for o, _ in known)
    ratios = [m / o if o > 0 and wb.known and wa.known else whole
              for o, m, wb, wa in zip(old, new, before, after)]
    return tuple(t * r for t, r in zip(profile.segment_ms, ratios)), "work model"


@dataclass(frozen=True)
class CodecErrors:
    """Output error each lossy encoding adds at each point, measured once per model.

    ``by_encoding[e][k]`` is the largest |output - unsplit output| over the
    outputs, each divided by its own range (max - min), when the float tensors
    crossing at k (k = 0: the model's inputs, REMOTE) travel under encoding e
    and the rest of the model runs on what they decode to. Integer tensors
    always travel raw. Measured on seeded inputs at ``shapes``: an estimate
    for real data, not a bound.
    """

    by_encoding: Mapping[int, tuple[float, ...]]
    shapes: str = ""   # where it was measured, as partitioner.shapes.describe writes it

    def error(self, encoding: int, k: int) -> float:
        if encoding not in self.by_encoding:
            return 0.0  # raw: lossless
        return self.by_encoding[encoding][k]


def codec_limits(errors: CodecErrors | None, encoding: int, budget: float, n: int) -> tuple[frozenset[int], bool] | None:
    """(cuts where ``encoding`` keeps within ``budget``, whether REMOTE does), or
    None when nothing is measured for a lossy ``encoding`` (it must not be chosen)."""
    if encoding not in (errors.by_encoding if errors else {}):
        return None if encoding != RAW_ENCODING else (frozenset(range(1, n)), True)
    per_k = errors.by_encoding[encoding]
    return frozenset(k for k in range(1, n) if per_k[k] <= budget), per_k[0] <= budget


def transfer(tensors: tuple[TensorMeta, ...], encoding: int, speed: CodecSpeed, scale: float = 1.0) -> Transfer:
    """Bytes on the wire and codec time; both sides are assumed as fast as this host."""
    raw = sum(meta.raw_bytes for meta in tensors) * scale
    return Transfer(
        wire_bytes=round(sum(wire_bytes(meta.shape, meta.dtype, encoding) for meta in tensors) * scale),
        encode_ms=raw / 1e6 / speed.encode_mb_s * 1e3,
        decode_ms=raw / 1e6 / speed.decode_mb_s * 1e3,
    )


def edge_memory_bytes(profile: ModelProfile, scale: float = 1.0) -> tuple[int, ...]:
    """Estimated device memory to run k segments, k = 0..n.

    Weights of the segments run plus the largest activation crossing any
    point up to k (a lower bound of the working set: onnxruntime's arena adds
    to it, but the ranking between plans is what matters here).
    """
    n = profile.num_segments
    sizes = [sum(m.raw_bytes for m in crossing) * scale for crossing in profile.crossings]
    sizes.append(sum(m.raw_bytes for m in profile.outputs) * scale)
    memory = []
    for k in range(n + 1):
        weights = sum(profile.segment_param_bytes[:k])
        memory.append(round(weights + (max(sizes[: k + 1]) if k else sizes[0])))
    return tuple(memory)


def model_costs(edge: ModelProfile, *, encoding: int, speed: CodecSpeed, output_encoding: int, scale: float = 1.0) -> ModelCosts:
    """``encoding`` for tensors sent to the node, ``output_encoding`` for
    results coming back; ``scale`` multiplies tensor sizes (``AtShape.bytes_scale``)."""
    return ModelCosts(
        edge_segment_ms=edge.segment_ms,
        edge_overhead_ms=edge.run_overhead_ms,
        crossings=tuple(transfer(c, encoding, speed, scale) for c in edge.crossings),
        output=transfer(edge.outputs, output_encoding, speed, scale),
        edge_memory_bytes=edge_memory_bytes(edge, scale),
    )


def cloud_option(node: str, cloud: ModelProfile, *, link: Link, queue_ms: float) -> CloudOption:
    return CloudOption(node=node, link=link, queue_ms=queue_ms, segment_ms=cloud.segment_ms,
                       overhead_ms=cloud.run_overhead_ms)


def local_finish_ms(costs: ModelCosts, k: int) -> float:
    """Predicted edge time to run segments k..n after a cloud attempt failed."""
    return sum(costs.edge_segment_ms[k:]) + costs.edge_overhead_ms


def cloud_budget_s(*, timeout_s: float, remaining_s: float | None, local_finish_ms: float) -> float:
    """How long a cloud call may take and still leave time to finish locally
    before the caller's deadline (``remaining_s``; None: no deadline)."""
    if remaining_s is None:
        return timeout_s
    return min(timeout_s, remaining_s - local_finish_ms / 1e3 * FALLBACK_MARGIN)


def power_of(device) -> Power:
    """The cost model's view of a ``devices.profiles.DeviceProfile``."""
    return Power(
        active_w=device.active_w,
        idle_w=device.idle_w,
        radio_alpha_w_per_mbps=device.radio.alpha_w_per_mbps,
        radio_beta_w=device.radio.beta_w,
    )


def queue_wait_ms(*, reported_ms: float, in_flight: int, capacity: int, service_ms: float) -> float:
    """The wait a new request should expect at a node: what the node reports
    (a smoothed past wait, other agents included), or, when this agent alone
    already fills its ``capacity`` workers, its place behind its own requests,
    each taking about ``service_ms``."""
    capacity = max(capacity, 1)
    ahead = in_flight + 1 - capacity
    return max(reported_ms, ahead / capacity * service_ms if ahead > 0 else 0.0)
