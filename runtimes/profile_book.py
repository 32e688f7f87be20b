"""Each model's profiles at the shapes it is really used at, and the rescaled view a request plans with.

A daemon profiles every model once at start-up, at its configured or declared
shapes (``partitioner.shapes``), and then learns from requests: the first
request of a shape bucket nobody has profiled is answered LOCAL while that
bucket is measured on a background thread, and later requests of the bucket
plan from it. A model that cannot be profiled at any shape is still served
(LOCAL only), and the book says why its plans are unavailable.

Both daemons use it: the node publishes its start-up profile; the agent also
rescales the node's profile to each request's shapes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from partitioner import shapes as shape_rules
from partitioner.planning import AtShape, CodecErrors, at_shape, profiled_shapes
from partitioner.profile import ModelProfile, TensorMeta
from partitioner.work import Machine, Work, concrete_shapes, node_work, segment_work
from protos import codec
from protos import tandem_pb2 as pb
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import (
    ProfilingError,
    all_tensor_metas,
    load_or_measure,
    load_or_measure_codec_errors,
    model_proto,
    profile_first_fitting,
    tensor_metas_at,
)

logger = logging.getLogger(__name__)

MAX_BUCKETS_PER_MODEL = 8   # shape buckets profiled per model; beyond, requests plan from the nearest
MAX_CACHED_SHAPES = 64      # per model: exact request shapes whose rescaled work is kept

# Default bound on one profiling run: a quarter of the device's RAM or of what is
# free here, and at most 1 GiB. Boards have 2-8 GB; one inference needing more than
# 1 GiB is not an edge workload, and a hostile file declaring a 16384x16384 input
# must not take gigabytes at start-up. --profile-memory-mb raises it.
PROFILE_MEMORY_SHARE = 0.25
PROFILE_MEMORY_CAP = 2**30

Predict = Callable[[OnnxModel, ModelProfile], ModelProfile]
CODEC_NEEDS_PROFILE = "codec errors need a profile first"


def memory_budget(configured_mb: float, device_bytes: int | None) -> int:
    """Bytes one profiling run (or the agent's requests together) may use: the
    configured figure, else the default above (they run on this host, and a
    board's RAM bounds what it could ever run)."""
    if configured_mb > 0:
        return int(configured_mb * 2**20)
    free = psutil.virtual_memory().available
    return int(min(PROFILE_MEMORY_SHARE * min(free, device_bytes or free), PROFILE_MEMORY_CAP))


def shape_specs(model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> list[pb.TensorSpec]:
    """Concrete input shapes as the wire states them (ListModels, explain)."""
    dtypes = {spec.name: spec.dtype for spec in model.inputs}
    return [pb.TensorSpec(name=n, dtype=codec.dtype_to_pb(dtypes[n]), shape=list(s)) for n, s in shapes.items()]


@dataclass(frozen=True)
class Measured:
    """One profile of a model: where it was measured, and the view the planner uses."""

    choice: shape_rules.ShapeChoice
    planned: ModelProfile       # as planned with: predicted for the board when planning for another one
    measured: ModelProfile      # as measured on this host


@dataclass
class _Model:
    entries: dict[tuple, Measured] = field(default_factory=dict)     # by shape bucket
    failed: dict[tuple, str] = field(default_factory=dict)           # bucket -> why it could not be profiled
    pending: dict[tuple, str] = field(default_factory=dict)          # buckets being profiled now -> their shapes, in words
    unavailable: str = ""                                            # why no plan exists yet (no entry at all)
    codec: CodecErrors | None = None                                 # output error per lossy encoding and cut
    codec_note: str = "codec errors not measured yet"                # why `codec` is None
    codec_pending: bool = False                                      # a measurement is queued or running
    works: OrderedDict = field(default_factory=OrderedDict)          # exact shapes -> segment works (None: unknown)
    tensors: OrderedDict = field(default_factory=OrderedDict)        # exact shapes -> (crossings, outputs) or None
    all_tensors: OrderedDict = field(default_factory=OrderedDict)    # exact shapes -> every tensor's meta


@dataclass(frozen=True)
class Unplanned:
    """No profile can plan this request yet: it runs LOCAL, and this says why."""

    reason: str


class ProfileBook:
    def __init__(self, models: Mapping[str, OnnxModel], *, machine: Machine, predict: Predict | None = None,
                 cache_dir: Path | None = None, budget_bytes: int | None = None,
                 configured: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self.models = models
        self.machine = machine                   # where the planned times are for (roofline ratios)
        self.predict = predict or (lambda model, profile: profile)
        self.cache_dir = cache_dir
        self.budget_bytes = budget_bytes
        self.configured = dict(configured or {})  # model -> profile_shapes from the policy
        self._state: dict[str, _Model] = {name: _Model() for name in models}
        # (model, exact shapes) -> (bucket, its entry, the view): reused while the entry is
        # the bucket's, so a request's view costs a lookup rather than a rescale
        self._views: OrderedDict[tuple, tuple[tuple, Measured, AtShape]] = OrderedDict()
        self._buckets: dict[tuple, tuple] = {}   # (model, exact shapes) -> its bucket
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profiler")

    # ------------------------------------------------------------ start-up --

    def profile_all(self, *, codec_errors: Iterable[str] = ()) -> None:
        """Profile every model at its first workable shape (blocking: run it in a
        thread); then, off the caller's path, measure the codec errors of the
        models named in ``codec_errors`` (see want_codec_errors)."""
        for name, model in self.models.items():
            self._profile_start(name, model)
        for name in codec_errors:
            self.want_codec_errors(name)

    def want_codec_errors(self, name: str) -> None:
        """Measure each lossy codec's output error at every cut of ``name``, off
        the caller's path (about one session per cut: seconds per model), unless
        done or under way. Only models whose policy chooses the codec need it."""
        with self._lock:
            state = self._state[name]
            if state.codec is not None or state.codec_pending:
                return
            state.codec_pending = True
        self._worker.submit(self._measure_codec, name, self.models[name])

    def _measure_codec(self, name: str, model: OnnxModel) -> None:
        try:
            self._measure_codec_now(name, model)
        finally:
            with self._lock:
                self._state[name].codec_pending = False

    def _measure_codec_now(self, name: str, model: OnnxModel) -> None:
        with self._lock:
            entries = list(self._state[name].entries.values())
        if not entries:
            with self._lock:
                self._state[name].codec_note = CODEC_NEEDS_PROFILE
            return
        try:
            errors = load_or_measure_codec_errors(model, entries[0].measured, cache_dir=self.cache_dir,
                                                  budget_bytes=self.budget_bytes)
        except Exception as exc:  # noqa: BLE001 -- without the figures, lossy codecs are simply not chosen
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("%s: codec errors not measured (%s); lossy codecs are not chosen for it", name, reason)
            with self._lock:
                self._state[name].codec_note = f"codec errors could not be measured: {reason}"
            return
        with self._lock:
            self._state[name].codec = errors
        logger.info("%s: codec output error at %s: %s", name, errors.shapes, ", ".join(
            f"{pb.Encoding.Name(e).removeprefix('ENCODING_').lower()} up to {max(v):.2g}" for e, v in errors.by_encoding.items()))

    def codec_errors(self, name: str) -> tuple[CodecErrors | None, str]:
        """The model's measured codec errors, or None and why not."""
        with self._lock:
            state = self._state[name]
            return state.codec, state.codec_note

    def _profile_start(self, name: str, model: OnnxModel) -> None:
        state = self._state[name]
        try:
            candidates = shape_rules.profile_candidates(model_proto(model), configured=self.configured.get(name))
            profile, chosen = profile_first_fitting(model, candidates, cache_dir=self.cache_dir,
                                                    budget_bytes=self.budget_bytes)
        except (ProfilingError, shape_rules.ShapeError) as exc:
            state.unavailable = f"plans unavailable, LOCAL only: {exc}"
            logger.error("%s: %s", name, state.unavailable)
            return
        except Exception as exc:  # noqa: BLE001 -- any failure to measure must leave the model served LOCAL
            state.unavailable = f"plans unavailable, LOCAL only: profiling failed: {exc}"
            logger.exception("%s: profiling failed", name)
            return
        self._add(name, model, chosen, profile)

    def _add(self, name: str, model: OnnxModel, chosen: shape_rules.ShapeChoice, profile: ModelProfile) -> Measured:
        # What planning at this shape needs, computed here (start-up or the profiling
        # thread) rather than on the first request or explain that asks for it.
        self.node_works(model, chosen.as_dict())
        self.tensor_metas(model, chosen.as_dict())
        planned = self.predict(model, profile)
        entry = Measured(chosen, planned, profile)
        with self._lock:
            state = self._state[name]
            first = not state.entries
            state.entries[self.bucket_of(model, chosen.as_dict())] = entry
            state.unavailable = ""
            codec_waiting = first and state.codec_note == CODEC_NEEDS_PROFILE
        logger.info("%s: profiled at %s (%s): %.1f ms per run here%s", name, chosen.describe(), chosen.source,
                    profile.whole_ms, "" if planned is profile else f", {planned.whole_ms:.1f} ms predicted")
        if codec_waiting:  # asked for before any profile existed (start-up could not profile the model)
            self.want_codec_errors(name)
        return entry

    # ------------------------------------------------------------- queries --

    def default(self, name: str) -> ModelProfile | None:
        """The profile published to agents: the first one measured."""
        with self._lock:
            entries = list(self._state[name].entries.values())
        return entries[0].planned if entries else None

    def measured_here(self, name: str) -> ModelProfile | None:
        """This host's first measured profile of ``name`` (not the board's
        prediction): what a node that publishes no profile is predicted from."""
        with self._lock:
            entries = list(self._state[name].entries.values()) if name in self._state else []
        return entries[0].measured if entries else None

    def unavailable(self, name: str) -> str:
        with self._lock:
            state = self._state[name]
            return "" if state.entries else state.unavailable

    def profiled(self, name: str) -> list[Measured]:
        with self._lock:
            return list(self._state[name].entries.values())

    def view(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]], *, learn: bool = True,
             nearest_ok: bool = False) -> AtShape | Unplanned:
        """The profile to plan a request of these shapes with, or why there is none.

        A request in a bucket nobody has profiled starts its profiling (when
        ``learn``) and is answered LOCAL meanwhile: planning it from a far-off
        shape is how 10-500x mispredictions happened. With ``nearest_ok`` (a
        pinned plan, an explain) the nearest measured shape, rescaled, stands in.
        """
        key = (model.name, shape_rules.key_of(shapes))
        with self._lock:
            state = self._state[model.name]
            known = self._views.get(key)
            if known is not None and state.entries.get(known[0]) is known[1]:
                return known[2]
        bucket = self.bucket_of(model, shapes)
        with self._lock:
            entry = state.entries.get(bucket)
            nearest = None
            if entry is None:
                room = len(state.entries) + len(state.pending) < MAX_BUCKETS_PER_MODEL
                unplanned = None
                if bucket in state.pending:
                    unplanned = Unplanned(f"{shape_rules.describe(shapes)} is being profiled; LOCAL until it is")
                elif learn and room and bucket not in state.failed:
                    state.pending[bucket] = shape_rules.describe(shapes)
                    self._worker.submit(self._learn, model, dict(shapes), bucket)
                    unplanned = Unplanned(f"first request at {shape_rules.describe(shapes)}: profiling that shape "
                                          "off the request path; LOCAL until it is measured")
                if unplanned is not None and not (nearest_ok and state.entries):
                    return unplanned
                if not state.entries:
                    return Unplanned(state.unavailable or f"{model.name} is being profiled")
                # this bucket cannot be profiled (or no more are): the nearest measured shape, rescaled
                nearest = self._nearest(state, shapes)
        if nearest is not None:  # outside the lock: rescaling takes it
            return self.rescale(model, nearest.planned, shapes)
        view = self.rescale(model, entry.planned, shapes)
        with self._lock:
            self._views[key] = (bucket, entry, view)
            while len(self._views) > MAX_CACHED_SHAPES * len(self._state):
                self._views.popitem(last=False)
        return view

    def rescale(self, model: OnnxModel, profile: ModelProfile, shapes: Mapping[str, tuple[int, ...]]) -> AtShape:
        """``profile`` (ours or a node's) at the request's shapes."""
        profiled = profiled_shapes(profile)
        if profiled == {name: tuple(shape) for name, shape in shapes.items()}:
            return AtShape(profile, 1.0, "measured", shape_rules.describe(profiled))
        return at_shape(profile, shapes, machine=self.machine, works_profiled=self._works(model, profiled),
                        works_requested=self._works(model, shapes), tensors=self._tensors(model, shapes))

    def background(self, name: str) -> list[str]:
        """What is being measured for ``name`` off the request path, in words."""
        with self._lock:
            state = self._state[name]
            work = [f"profiling {shapes}" for shapes in state.pending.values()]
            return work + ["measuring codec errors"] * state.codec_pending

    def model_info(self, model: OnnxModel, info: pb.ModelInfo) -> pb.ModelInfo:
        """``info`` with what the book knows: profiled shapes, or why plans are
        unavailable, and what it is measuring now."""
        info.plans_unavailable = self.unavailable(model.name)
        for entry in self.profiled(model.name):
            info.profiled.add(inputs=shape_specs(model, entry.choice.as_dict()), source=entry.choice.source)
        info.background.extend(self.background(model.name))
        return info

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ learning --

    def want_shapes(self, name: str, configured: Mapping[str, object]) -> str:
        """Profile ``name`` at newly configured shapes (a policy reload), off the
        caller's path; returns what happens, in words (ShapeError: they do not fit)."""
        model = self.models[name]
        declared = shape_rules.declared_inputs(model_proto(model))
        shapes = shape_rules.check_every_input(declared, configured, f"profile_shapes of {name}")
        bucket = self.bucket_of(model, shapes)
        with self._lock:
            state = self._state[name]
            self.configured[name] = dict(configured)
            if bucket in state.entries or bucket in state.pending:
                return f"{name}: {shape_rules.describe(shapes)} is profiled already"
            state.pending[bucket] = shape_rules.describe(shapes)
            state.failed.pop(bucket, None)
        self._worker.submit(self._learn, model, shapes, bucket, "config")
        return f"{name}: profiling {shape_rules.describe(shapes)}"

    def _learn(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]], bucket: tuple, source: str = "request") -> None:
        chosen = shape_rules.choice(shapes, source, [spec.name for spec in model.inputs])
        try:
            profile = load_or_measure(model, chosen.as_dict(), cache_dir=self.cache_dir, budget_bytes=self.budget_bytes)
            self._add(model.name, model, chosen, profile)
        except Exception as exc:  # noqa: BLE001 -- a shape that cannot be profiled is planned from the nearest one
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("%s: cannot profile at %s: %s", model.name, chosen.describe(), reason)
            with self._lock:
                self._state[model.name].failed[bucket] = reason
        finally:
            with self._lock:
                self._state[model.name].pending.pop(bucket, None)

    # ------------------------------------------------------------- helpers --

    def bucket_of(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> tuple:
        """The shape bucket a request falls in (one profile serves a bucket)."""
        key = (model.name, shape_rules.key_of(shapes))
        bucket = self._buckets.get(key)
        if bucket is None:
            declared = {spec.name: spec.shape for spec in model.inputs}
            bucket = shape_rules.bucket(shapes, declared)
            if len(self._buckets) > MAX_CACHED_SHAPES * len(self._state):
                self._buckets.clear()
            self._buckets[key] = bucket
        return bucket

    @staticmethod
    def _nearest(state: _Model, shapes: Mapping[str, tuple[int, ...]]) -> Measured:
        return min(state.entries.values(), key=lambda e: shape_rules.distance(shapes, e.choice.as_dict()))

    def _cached(self, cache: OrderedDict, key, compute):
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = compute()  # outside the lock: shape inference can take a while
        with self._lock:
            cache[key] = value
            while len(cache) > MAX_CACHED_SHAPES:
                cache.popitem(last=False)
        return value

    def prepared(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether planning at these exact shapes has what it needs cached (see prepare)."""
        key = shape_rules.describe(shapes)
        with self._lock:
            state = self._state[model.name]
            return model.graph is None or (key in state.works and key in state.tensors and key in state.all_tensors)

    def prepare(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Run the shape inference planning at these shapes needs (tens of ms on a
        detector): called in a thread, so the event loop never waits on it."""
        self.node_works(model, shapes)
        self._tensors(model, shapes)
        self.tensor_metas(model, shapes)

    def node_works(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Work] | None:
        """Every node's work at these input shapes (None: shape inference cannot reach them)."""
        if model.graph is None:
            return None
        key = shape_rules.describe(shapes)

        def compute() -> dict[str, Work] | None:
            try:
                return node_work(model.graph.model, concrete_shapes(model.graph.model, shapes))
            except ValueError as exc:
                logger.info("%s: no work model at %s: %s", model.name, key, exc)
                return None

        return self._cached(self._state[model.name].works, key, compute)

    def _works(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Work, ...] | None:
        per_node = self.node_works(model, shapes)
        return None if per_node is None else segment_work(model.graph, per_node)

    def tensor_metas(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorMeta]:
        """Every tensor whose size shape inference reaches at these input shapes (for DAG cuts)."""
        def compute() -> dict[str, TensorMeta]:
            try:
                return all_tensor_metas(model, shapes)
            except ValueError:
                return {}

        return self._cached(self._state[model.name].all_tensors, shape_rules.describe(shapes), compute)

    def _tensors(self, model: OnnxModel, shapes: Mapping[str, tuple[int, ...]]):
        key = shape_rules.describe(shapes)

        def compute():
            try:
                return tensor_metas_at(model, shapes)
            except ValueError:
                return None

        return self._cached(self._state[model.name].tensors, key, compute)
