"""One ONNX model on this host: the whole graph and its cut sub-graphs.

Both daemons use this class, so the edge's prefix and the node's suffix are
built and run by the same code. Sessions are created lazily and cached, since
a node may serve many cuts of one model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from devices.limits import cpu_quota
from partitioner.graph import (
    Cut,
    GraphError,
    ModelGraph,
    analyze,
    prefix_model,
    suffix_model,
)
from protos import codec

logger = logging.getLogger(__name__)

MAX_CACHED_SESSIONS = 8  # per side (prefix / suffix) per model

class InputError(ValueError):
    """The caller's tensors do not fit the model (names, dtypes, shapes)."""


class BadReply(ValueError):
    """A node's tensors are not what the model gives at the request's shapes."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None dims are dynamic; None shape: rank unknown


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def session_options(*, threads: int | None = None, level: ort.GraphOptimizationLevel | None = None,
                    spinning: bool | None = None) -> ort.SessionOptions:
    """``spinning`` None: decide from the CPU quota we can see."""
    options = ort.SessionOptions()
    quota = cpu_quota()
    if spinning is None:
        spinning = quota is None
    if not spinning:
        # Under a CPU quota, threads that spin-wait between kernels burn the
        # quota doing nothing and the run stalls until the next period.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quota is not None:
        threads = threads or max(1, math.floor(quota))  # no more threads than whole CPUs allowed
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings from onnxruntime are noise for our users
    return options


def _specs(values: list[ort.NodeArg]) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        dtype = _ort_type_to_numpy(value.type)
        shape = None if value.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        specs.append(TensorSpec(value.name, dtype, shape))
    return tuple(specs)


def _ort_type_to_numpy(type_name: str) -> np.dtype:
    # onnxruntime spells types "tensor(float)"; map through onnx's own table.
    inner = type_name.removeprefix("tensor(").removesuffix(")")
    names = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
    try:
        return np.dtype(names.get(inner, inner))
    except TypeError:
        raise GraphError(f"input type {type_name} is not a plain tensor; Tandem carries tensors only") from None


class OnnxModel:
    """A model file loaded once, with its cut analysis and cached sessions."""

    def __init__(self, name: str, path: Path, *, threads: int | None = None, spinning: bool | None = None) -> None:
        self.name = name
        self.path = Path(path)
        self.threads = threads
        self.spinning = spinning
        self.digest = file_digest(self.path)
        try:
            proto = onnx.load(str(self.path))
        except Exception as exc:  # onnx raises DecodeError, OSError, ...: all mean "not a model"
            raise GraphError(f"{self.path} is not a readable ONNX model: {exc}") from exc
        self.cut_error: str | None = None
        self.graph: ModelGraph | None = None
        try:
            self.graph = analyze(proto, name)
        except GraphError as exc:
            self.cut_error = str(exc)
            logger.warning("model %s runs whole only: %s", name, exc)
        self.param_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
        self._whole = self._session((self.graph.model if self.graph else proto).SerializeToString())
        self.inputs = _specs(self._whole.get_inputs())
        self.outputs = _specs(self._whole.get_outputs())
        for spec in (*self.inputs, *self.outputs):
            try:
                codec.dtype_to_pb(spec.dtype)
            except codec.CodecError:
                raise GraphError(f"{name}: tensor {spec.name!r} is {spec.dtype}, which Tandem's wire format cannot carry") from None
        # Sub-model sessions each hold their own copy of the weights they use,
        # so only the most recently used few are kept. Keyed by Cut.key: unique for
        # chain and general (DAG) cuts alike.
        self._prefix: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self._suffix: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_cuts(self) -> int:
        return len(self.graph.cuts) if self.graph else 0

    @property
    def num_segments(self) -> int:
        return len(self.graph.segments) if self.graph else 1

    def cut(self, index: int) -> Cut:
        return self._graph_or_raise().cut(index)

    def find_cut(self, tensors: list[str], *, edge_outputs: list[str] | None = None) -> Cut:
        return self._graph_or_raise().find_cut(tensors, edge_outputs=edge_outputs)

    def cut_of(self, edge_nodes: list[str]) -> Cut:
        return self._graph_or_raise().cut_of(edge_nodes)

    def _graph_or_raise(self) -> ModelGraph:
        if self.graph is None:
            raise GraphError(f"model {self.name} cannot be split: {self.cut_error}")
        return self.graph

    def _session(self, serialized: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(serialized, session_options(threads=self.threads, spinning=self.spinning), providers=["CPUExecutionProvider"])

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Refuse feeds that onnxruntime would reject with a cryptic message."""
        self._check_tensors(feeds, self.inputs, "input", InputError)

    def check_reply(self, outputs: Mapping[str, np.ndarray], names: Collection[str],
                    inferred: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse what a node sent as outputs ``names`` unless this model could
        have produced it: the same names and dtypes, each shape the one shape
        inference gives at the request's inputs (``inferred``, where it reaches)
        or else fitting the declared dims. A node is a peer, not a part of us."""
        self._check_tensors(outputs, [spec for spec in self.outputs if spec.name in names], "output", BadReply,
                            exact=inferred)

    def _check_tensors(self, arrays: Mapping[str, np.ndarray], specs: list[TensorSpec], kind: str,
                       error: type[ValueError], exact: Mapping[str, tuple[int, ...]] | None = None) -> None:
        expected = {spec.name: spec for spec in specs}
        missing = sorted(set(expected) - set(arrays))
        unknown = sorted(set(arrays) - set(expected))
        if missing or unknown:
            raise error(f"model {self.name} {'takes' if kind == 'input' else 'gives'} {kind}s {sorted(expected)}; "
                        f"missing {missing}, unknown {unknown}")
        for name, array in arrays.items():
            spec = expected[name]
            if array.dtype != spec.dtype:
                raise error(f"{kind} {name} of {self.name} must be {spec.dtype}, got {array.dtype}")
            want = (exact or {}).get(name)
            if want is not None:
                if tuple(array.shape) != tuple(want):
                    raise error(f"{kind} {name} of {self.name} must have shape {tuple(want)} here, got {array.shape}")
                continue
            if spec.shape is None:
                continue
            if array.ndim != len(spec.shape) or any(
                want is not None and want != got for want, got in zip(spec.shape, array.shape)
            ):
                shown = tuple("?" if d is None else d for d in spec.shape)
                raise error(f"{kind} {name} of {self.name} must have shape {shown}, got {array.shape}")

    def run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.outputs]
        return dict(zip(names, self._whole.run(names, feeds, options)))

    def run_prefix(self, cut: Cut, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
        """Edge side of a SPLIT: returns the cut's tensors (passthrough inputs
        included) and any graph outputs already computed on the edge."""
        session = self._cached(self._prefix, cut, prefix_model)
        names = [value.name for value in session.get_outputs()]
        needed = {value.name for value in session.get_inputs()}
        produced = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in needed}, options)))
        for name in cut.passthrough:
            produced[name] = feeds[name]
        return produced

    def prefix_ready(self, cut: Cut) -> bool:
        """Whether the prefix session of ``cut`` is built: its first run also builds it."""
        with self._lock:
            return cut.key in self._prefix

    def run_suffix(self, cut: Cut, tensors: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
        """Cloud side of a SPLIT (or the edge's fallback after one)."""
        session = self._cached(self._suffix, cut, suffix_model)
        expected = {value.name for value in session.get_inputs()}
        if set(tensors) != expected:
            raise InputError(f"cut {cut.key} of {self.name} takes {sorted(expected)}, got {sorted(tensors)}")
        names = [value.name for value in session.get_outputs()]
        return dict(zip(names, session.run(names, tensors, options)))

    def _cached(self, cache: OrderedDict[str, ort.InferenceSession], cut: Cut, build) -> ort.InferenceSession:
        key = cut.key
        with self._lock:
            session = cache.get(key)
            if session is not None:
                cache.move_to_end(key)
                return session
        # Built outside the lock: creating a session can take a while and
        # two threads building the same one only costs a little work.
        session = self._session(build(self._graph_or_raise(), cut).SerializeToString())
        with self._lock:
            session = cache.setdefault(key, session)
            while len(cache) > MAX_CACHED_SESSIONS:
                cache.popitem(last=False)
        return session
