"""Turn measured profiles into the cost model's inputs.

Pure: the agent gathers profiles, codec speeds, link estimates and node load;
this module turns them into ``ModelCosts`` and ``CloudOption`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.costmodel import CloudOption, Link, ModelCosts, Power, Transfer
from partitioner.profile import ModelProfile, TensorMeta
from protos.codec import wire_bytes


@dataclass(frozen=True)
class CodecSpeed:
    """Measured codec throughput on one host, MB of raw tensor per second."""

    encode_mb_s: float
    decode_mb_s: float


def transfer(tensors: tuple[TensorMeta, ...], encoding: int, speed: CodecSpeed) -> Transfer:
    raw = sum(meta.raw_bytes for meta in tensors)
    return Transfer(
        wire_bytes=sum(wire_bytes(meta.shape, meta.dtype, encoding) for meta in tensors),
        encode_ms=raw / 1e6 / speed.encode_mb_s * 1e3,
        decode_ms=raw / 1e6 / speed.decode_mb_s * 1e3,
    )


def edge_memory_bytes(profile: ModelProfile) -> tuple[int, ...]:
    """Estimated device memory to run k segments, k = 0..n.

    Weights of the segments run plus the largest activation crossing any
    point up to k (a lower bound of the working set: onnxruntime's arena adds
    to it, but the ranking between plans is what matters here).
    """
    n = profile.num_segments
    sizes = [sum(m.raw_bytes for m in crossing) for crossing in profile.crossings]
    sizes.append(sum(m.raw_bytes for m in profile.outputs))
    memory = []
    for k in range(n + 1):
        weights = sum(profile.segment_param_bytes[:k])
        memory.append(weights + (max(sizes[: k + 1]) if k else sizes[0]))
    return tuple(memory)


def model_costs(edge: ModelProfile, *, encoding: int, speed: CodecSpeed, output_encoding: int) -> ModelCosts:
    """``encoding`` for tensors sent to the node, ``output_encoding`` for results coming back."""
    return ModelCosts(
        edge_segment_ms=edge.segment_ms,
        edge_overhead_ms=edge.run_overhead_ms,
        crossings=tuple(transfer(c, encoding, speed) for c in edge.crossings),
        output=transfer(edge.outputs, output_encoding, speed),
        edge_memory_bytes=edge_memory_bytes(edge),
    )


def cloud_option(node: str, cloud: ModelProfile, *, link: Link, queue_ms: float) -> CloudOption:
    return CloudOption(node=node, link=link, queue_ms=queue_ms, segment_ms=cloud.segment_ms, overhead_ms=cloud.run_overhead_ms)


def power_of(device) -> Power:
    """The cost model's view of a ``devices.profiles.DeviceProfile``."""
    return Power(
        active_w=device.active_w,
        idle_w=device.idle_w,
        radio_alpha_w_per_mbps=device.radio.alpha_w_per_mbps,
        radio_beta_w=device.radio.beta_w,
    )
