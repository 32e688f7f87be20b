"""Measured facts about one model on one host, in a form the planner can read.

A profile is produced by ``runtimes.profiler`` (which runs onnxruntime) and
consumed here without any I/O, so the same profile can be measured on the
cloud node, shipped to the agent as JSON and planned with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str                  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]      # concrete shape seen while profiling

    @property
    def raw_bytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ModelProfile:
    model: str
    digest: str                                  # sha256 of the model file the profile belongs to
    host: str                                    # where it was measured
    segment_ms: tuple[float, ...]                # n per-segment times, calibrated to a real run
    run_overhead_ms: float                       # one session run's cost outside the kernels
    whole_ms: float                              # median measured whole-model run (= sum + overhead)
    crossings: tuple[tuple[TensorMeta, ...], ...]  # n entries: [0] model inputs, [k] tensors of cut k
    outputs: tuple[TensorMeta, ...]
    segment_param_bytes: tuple[int, ...]
    runs: int                                    # timed runs behind the figures
    method: str = "optimised"                    # whose kernels shaped it: "optimised", "unoptimised" or "whole"

    @property
    def num_segments(self) -> int:
        return len(self.segment_ms)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelProfile":
        raw = json.loads(text)

        def metas(items: list[dict]) -> tuple[TensorMeta, ...]:
            return tuple(TensorMeta(m["name"], m["dtype"], tuple(m["shape"])) for m in items)

        profile = cls(
            model=raw["model"],
            digest=raw["digest"],
            host=raw["host"],
            segment_ms=tuple(float(t) for t in raw["segment_ms"]),
            run_overhead_ms=float(raw["run_overhead_ms"]),
            whole_ms=float(raw["whole_ms"]),
            crossings=tuple(metas(c) for c in raw["crossings"]),
            outputs=metas(raw["outputs"]),
            segment_param_bytes=tuple(int(b) for b in raw["segment_param_bytes"]),
            runs=int(raw["runs"]),
            method=str(raw.get("method", "unoptimised")),
        )
        if len(profile.crossings) != profile.num_segments:
            raise ValueError(
                f"profile of {profile.model}: {len(profile.crossings)} crossings for "
                f"{profile.num_segments} segments (expected one per segment)"
            )
        return profile
