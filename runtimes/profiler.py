"""Measure a model's per-segment times with onnxruntime's own profiler.

Per-node kernel times come from profiling the fully optimised session, the
one that really runs: fusion changes the shape of a profile (an early layer
whose BatchNorm and activation fold into its Conv loses a third of its time),
so an unoptimised profile misplaces the cheap cuts. Optimised nodes keep their
original name or extend it (``conv1_relu_nchwc``); nodes onnxruntime adds
(layout reorders) are charged to the segment that ran just before them. If too
little of the time can be traced to our nodes (an onnxruntime version naming
fused nodes otherwise), the profile falls back to an unoptimised session,
where every node keeps its name. Either way per-segment times are scaled so
that their sum plus the run overhead equals the median of real, unprofiled
runs: the shape of the profile comes from the profiler, its size from reality.
Per-segment times are means over runs, not medians: under a CPU quota a run
stalls wherever the quota runs out, and only the mean charges those stalls to
segments in proportion to their work.
Profiles are measured at concrete input shapes (``partitioner.shapes`` says
which), refused before any allocation when their estimated memory exceeds the
budget, and cached per model digest, host and shape, since measuring takes
seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil

from devices.limits import cpu_cgroup, cpu_quota
from devices.profiles import cache_root
from partitioner import shapes as shape_rules
from partitioner.graph import expose_tensors, suffix_model
from partitioner.planning import CodecErrors, CodecSpeed
from partitioner.profile import ModelProfile, TensorMeta
from partitioner.work import concrete_shapes
from protos import codec
from protos import tandem_pb2 as pb
from runtimes.onnx_exec import OnnxModel, TensorSpec, session_options

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 5  # 5: whole-run time is the fastest run where no quota applies
# Below this share of kernel time traced to our nodes, the optimised profile
# is not trusted and an unoptimised one is taken instead.
MIN_TRACED_SHARE = 0.9


def default_cache_dir() -> Path:
    return cache_root() / "profiles"


def host_key(threads: int | None, spinning: bool | None = None) -> str:
    quota = cpu_quota()
    group = cpu_cgroup()
    limit = f"-q{quota:.3f}" if quota else ""
    if group != "/":
        limit += "-cg" + hashlib.sha256(group.encode()).hexdigest()[:8]
    spin = {None: "", True: "-spin", False: "-nospin"}[spinning]
    return f"{platform.node()}-{os.cpu_count()}cpu{limit}-t{threads or 0}{spin}-ort{ort.__version__}"


class ProfilingError(RuntimeError):
    """The model could not be measured at any shape tried; the message names each shape and why."""


def sample_feeds(inputs: tuple[TensorSpec, ...], shapes: shape_rules.Shapes, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of these shapes (every input must have one)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = tuple(shapes[spec.name])
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def _typical_run_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int, *, throttled: bool) -> float:
    """The run time to plan with: under a CPU quota the median (its stalls are
    the device's real speed), otherwise the fastest run, since other programs
    only ever slow a run down and a profile taken on a busy machine is cached
    and planned with long after the load has gone."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return _typical(times, throttled=throttled)


def _typical(times_ms: list[float], *, throttled: bool) -> float:
    return statistics.median(times_ms) if throttled else min(times_ms)


def throttled(model: OnnxModel) -> bool:
    """Whether this process runs under a CPU quota: one /sys shows, or one the
    operator declared by turning onnxruntime's spinning off (the documented
    setting where /sys hides the quota, as inside ``ip netns exec``)."""
    return cpu_quota() is not None or model.spinning is False


def _node_times_per_run(profile_file: str) -> list[dict[str, float]]:
    """Kernel time (ms) of each node in each run recorded by the profiler, in execution order."""
    with open(profile_file) as handle:
        events = json.load(handle)
    runs: list[dict[str, float]] = []
    current: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            current[node] = current.get(node, 0.0) + event["dur"] / 1e3
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs.append(current)
            current = {}
    return runs


def _traced_segment(name: str, segment_of: dict[str, int]) -> int | None:
    """The segment of an optimised node: its own name, or the longest of ours
    it extends at a separator (onnxruntime appends ``_nchwc`` and the like)."""
    if name in segment_of:
        return segment_of[name]
    for end in range(len(name) - 1, 0, -1):
        if name[end] in "_/:. -" and name[:end] in segment_of:
            return segment_of[name[:end]]
    return None


def attribute(node_order: list[str], segment_of: dict[str, int]) -> tuple[dict[str, int], set[str]]:
    """Segment of each profiled node and the names traced to ours; a node of
    onnxruntime's own goes with the segment that ran before it (the first
    ones with the segment after them): reorders belong to their neighbours."""
    traced = {name: seg for name in node_order if (seg := _traced_segment(name, segment_of)) is not None}
    placed: dict[str, int] = {}
    previous: int | None = None
    pending: list[str] = []
    for name in node_order:
        if name in traced:
            previous = traced[name]
            placed[name] = previous
            for early in pending:
                placed[early] = previous
            pending = []
        elif previous is not None:
            placed[name] = previous
        else:
            pending.append(name)
    return placed, set(traced)


def _profile_runs(model: OnnxModel, serialized: bytes, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel,
                  *, runs: int, warmup: int, on_progress) -> tuple[list[dict[str, float]], list[float]]:
    """Per-node times of ``runs`` profiled runs and their wall times, ms."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=model.threads, spinning=model.spinning, level=level)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        profiling = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            profiling.run(None, feeds)
        wall_ms = []
        for i in range(runs):
            start = time.perf_counter()
            profiling.run(None, feeds)
            wall_ms.append((time.perf_counter() - start) * 1e3)
            if on_progress:
                on_progress(i + 1, 2 * runs)
        return _node_times_per_run(profiling.end_profiling())[warmup:], wall_ms


def _segment_means(per_run: list[dict[str, float]], placed: dict[str, int], n: int) -> list[float]:
    totals = [0.0] * n
    for node_times in per_run:
        for node, ms in node_times.items():
            if node in placed:
                totals[placed[node]] += ms
    return [t / max(len(per_run), 1) for t in totals]


def measure(model: OnnxModel, shapes: shape_rules.Shapes | None = None, *, runs: int = 10, warmup: int = 2,
            on_progress=None) -> ModelProfile:
    """Profile ``model`` on this host at these input shapes (default: the first
    candidate ``partitioner.shapes`` gives); blocking, roughly 2 x (runs + warmup) model runs."""
    graph = model.graph
    shapes = shapes or default_shapes(model)
    feeds = sample_feeds(model.inputs, shapes)
    if graph is None:
        return _measure_whole(model, feeds, runs=runs, warmup=warmup)
    serialized = graph.model.SerializeToString()
    segment_of = {node: i for i, names in enumerate(graph.segments) for node in names}
    n = len(graph.segments)

    method = "optimised"
    per_run, profiled_ms = _profile_runs(model, serialized, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                         runs=runs, warmup=warmup, on_progress=on_progress)
    order = list(dict.fromkeys(node for run in per_run for node in run))
    placed, traced = attribute(order, segment_of)
    kernel_ms = sum(sum(run.values()) for run in per_run)
    traced_ms = sum(ms for run in per_run for node, ms in run.items() if node in traced)
    if kernel_ms <= 0 or traced_ms / kernel_ms < MIN_TRACED_SHARE:
        logger.info("%s: only %.0f%% of optimised kernel time traces to its nodes; profiling it unoptimised",
                    model.name, 100 * traced_ms / max(kernel_ms, 1e-9))
        per_run, profiled_ms = _profile_runs(model, serialized, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                             runs=runs, warmup=warmup, on_progress=None)
        placed = segment_of  # onnxruntime's own nodes (casts, copies) count as run overhead
        method = "unoptimised"
    plain_segments = _segment_means(per_run, placed, n)
    plain_overhead = max(statistics.mean(profiled_ms) - sum(plain_segments), 0.0)

    optimised = ort.InferenceSession(serialized, session_options(threads=model.threads, spinning=model.spinning), providers=["CPUExecutionProvider"])
    _typical_run_ms(optimised, feeds, warmup, throttled=throttled(model))
    whole_ms = _typical_run_ms(optimised, feeds, runs, throttled=throttled(model))
    if on_progress:
        on_progress(2 * runs, 2 * runs)

    # Profiling itself slows kernels; rescale the profiled shape to the
    # unprofiled run.
    scale = whole_ms / max(sum(plain_segments) + plain_overhead, 1e-9)
    segment_ms = tuple(t * scale for t in plain_segments)

    crossings, outputs = _tensor_metas(model, feeds)
    return ModelProfile(
        model=model.name,
        digest=model.digest,
        host=host_key(model.threads, model.spinning),
        segment_ms=segment_ms,
        run_overhead_ms=plain_overhead * scale,
        whole_ms=whole_ms,
        crossings=crossings,
        outputs=outputs,
        segment_param_bytes=graph.segment_param_bytes,
        runs=runs,
        method=method,
    )


def _measure_whole(model: OnnxModel, feeds: dict[str, np.ndarray], *, runs: int, warmup: int) -> ModelProfile:
    """A model that cannot be cut is one segment: it can still run LOCAL or REMOTE."""
    for _ in range(warmup):
        outputs = model.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        outputs = model.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    whole_ms = _typical(times, throttled=throttled(model))

    def metas(values: dict[str, np.ndarray]) -> tuple[TensorMeta, ...]:
        return tuple(TensorMeta(n, str(v.dtype), tuple(int(d) for d in v.shape)) for n, v in values.items())

    return ModelProfile(
        model=model.name, digest=model.digest, host=host_key(model.threads, model.spinning), segment_ms=(whole_ms,),
        run_overhead_ms=0.0, whole_ms=whole_ms, crossings=(metas(feeds),), outputs=metas(outputs),
        segment_param_bytes=(model.param_bytes,), runs=runs, method="whole",
    )


def _tensor_metas(model: OnnxModel, feeds: dict[str, np.ndarray]) -> tuple[tuple[tuple[TensorMeta, ...], ...], tuple[TensorMeta, ...]]:
    """Dtypes and shapes of every cut's tensors: from shape inference when it
    reaches them all, else from one run that exposes them (which holds every
    cut tensor in memory at once, so it is the fallback, not the rule)."""
    graph = model.graph
    assert graph is not None  # measure() checked
    inferred = tensor_metas_at(model, {name: array.shape for name, array in feeds.items()})
    if inferred is not None:
        return inferred
    inner = sorted({name for cut in graph.cuts for name in cut.tensors} - set(feeds))
    exposed = ort.InferenceSession(
        expose_tensors(graph, inner).SerializeToString(),
        session_options(threads=model.threads, spinning=model.spinning, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        providers=["CPUExecutionProvider"],
    )
    names = [value.name for value in exposed.get_outputs()]
    values = dict(zip(names, exposed.run(names, feeds)))
    values.update(feeds)

    def metas(tensor_names) -> tuple[TensorMeta, ...]:
        return tuple(TensorMeta(n, str(values[n].dtype), tuple(int(d) for d in values[n].shape)) for n in tensor_names)

    crossings = (metas(spec.name for spec in model.inputs),) + tuple(metas(cut.tensors) for cut in graph.cuts)
    return crossings, metas(spec.name for spec in model.outputs)


def all_tensor_metas(model: OnnxModel, shapes: shape_rules.Shapes) -> dict[str, TensorMeta]:
    """Every tensor of the graph whose shape inference reaches at these input
    shapes and whose element type numpy knows (a DAG cut may cross any of them)."""
    graph = model.graph
    if graph is None:
        return {}
    known = concrete_shapes(graph.model, shapes)
    metas = {}
    for name, t in graph._facts().types.items():
        if name not in known or t.WhichOneof("value") != "tensor_type":
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            continue
        metas[name] = TensorMeta(name, str(dtype), tuple(int(d) for d in known[name]))
    return metas


def tensor_metas_at(model: OnnxModel, shapes: shape_rules.Shapes) -> tuple[tuple[tuple[TensorMeta, ...], ...], tuple[TensorMeta, ...]] | None:
    """Every cut's tensors and the outputs at these input shapes, from shape
    inference alone; None when it cannot reach one of them. Element types come
    from the graph analysis (they do not change with shape)."""
    graph = model.graph
    if graph is None:
        return None
    known = concrete_shapes(graph.model, shapes)
    types = graph._facts().types
    dtypes = {spec.name: spec.dtype for spec in (*model.inputs, *model.outputs)}

    def meta(name: str) -> TensorMeta | None:
        if name not in known:
            return None
        dtype = dtypes.get(name)
        if dtype is None:
            t = types.get(name)
            if t is None or t.WhichOneof("value") != "tensor_type":
                return None
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))
            except (KeyError, TypeError, ValueError):
                return None
        return TensorMeta(name, str(np.dtype(dtype)), tuple(int(d) for d in known[name]))

    crossings = [tuple(meta(spec.name) for spec in model.inputs)]
    crossings += [tuple(meta(name) for name in cut.tensors) for cut in graph.cuts]
    outputs = tuple(meta(spec.name) for spec in model.outputs)
    if any(m is None for group in (*crossings, outputs) for m in group):
        return None
    return tuple(crossings), outputs


def model_proto(model: OnnxModel) -> onnx.ModelProto:
    """The model's graph: the analysed copy when it can be cut, else the file again."""
    return model.graph.model if model.graph is not None else onnx.load(str(model.path))


def default_shapes(model: OnnxModel) -> dict[str, tuple[int, ...]]:
    return shape_rules.profile_candidates(model_proto(model))[0].as_dict()


def check_memory(model: OnnxModel, shapes: shape_rules.Shapes, budget_bytes: int | None) -> None:
    """Refuse, before allocating anything, a shape whose run would not fit the budget."""
    if budget_bytes is None:
        return
    itemsizes = {spec.name: spec.dtype.itemsize for spec in model.inputs}
    need = shape_rules.footprint(model_proto(model), shapes, itemsizes, stop_above=budget_bytes)
    if need.total > budget_bytes:
        detail = f"inputs {need.inputs / 2**20:.0f} MiB, weights {need.weights / 2**20:.0f} MiB"
        if need.largest_node:
            detail += f", largest layer {need.largest_node / 2**20:.0f} MiB"
        raise ProfilingError(
            f"needs at least {need.total / 2**20:.0f} MiB ({detail}), more than the "
            f"{budget_bytes / 2**20:.0f} MiB profiling budget"
        )


def profile_path(model: OnnxModel, shapes: shape_rules.Shapes, cache_dir: Path) -> Path:
    shape_key = hashlib.sha256(shape_rules.describe(shapes).encode()).hexdigest()[:10]
    return cache_dir / (f"{model.name}-{model.digest[:16]}-{host_key(model.threads, model.spinning)}"
                        f"-s{shape_key}-v{PROFILE_FORMAT}.json")


def load_or_measure(model: OnnxModel, shapes: shape_rules.Shapes | None = None, *, cache_dir: Path | None = None,
                    runs: int = 10, budget_bytes: int | None = None, on_progress=None) -> ModelProfile:
    """The cached profile of this exact model file on this host at these input
    shapes (default: the model's first candidate), measured if absent; a shape
    over ``budget_bytes`` is refused before anything is allocated."""
    cache_dir = cache_dir or default_cache_dir()
    shapes = dict(shapes or default_shapes(model))
    path = profile_path(model, shapes, cache_dir)
    if path.exists():
        try:
            profile = ModelProfile.from_json(path.read_text())
            if profile.digest == model.digest and profile.num_segments == model.num_segments:
                return profile
        except (ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable profile cache %s: %s", path, exc)
    check_memory(model, shapes, budget_bytes)
    logger.info("profiling %s (%d segments) on this host at %s", model.name, model.num_segments, shape_rules.describe(shapes))
    with OthersLoad() as load:
        profile = measure(model, shapes, runs=runs, on_progress=on_progress)
    if load.share > MAX_OTHERS_SHARE and not throttled(model):
        # Used now, but not kept: a profile cached under load is planned with long after the load has gone.
        logger.warning("%s: profiled while other programs kept %.0f%% of the CPUs busy; using it for now, "
                       "not caching it (the next start measures again)", model.name, 100 * load.share)
        return profile
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename: a crash mid-write must not leave a corrupt cache.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile


# Above this share of the machine's CPU time taken by other programs while a
# profile is measured, the profile is not cached: the fastest of its runs still
# ran 3x slow with both cores busy (bench/host_stability).
MAX_OTHERS_SHARE = 0.5


class OthersLoad:
    """How busy other programs kept the CPUs while the block ran (psutil): their
    CPU time over what this process left free. Over the whole machine instead,
    spinners on both cores of two read under 0.5 while we profiled on one."""

    def __enter__(self) -> "OthersLoad":
        self._system = psutil.cpu_times()
        self._own = psutil.Process().cpu_times()
        self._start = time.perf_counter()
        self.share = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        system, own = psutil.cpu_times(), psutil.Process().cpu_times()
        wall = time.perf_counter() - self._start
        busy = (sum(system) - system.idle - getattr(system, "iowait", 0.0)) - (
            sum(self._system) - self._system.idle - getattr(self._system, "iowait", 0.0))
        mine = (own.user + own.system) - (self._own.user + self._own.system)
        capacity = wall * (psutil.cpu_count() or 1)
        left = max(capacity - mine, 0.25 * capacity)  # a run that used every CPU leaves little: floor it
        self.share = max(busy - mine, 0.0) / left if left > 0 else 0.0


def profile_first_fitting(model: OnnxModel, candidates: list[shape_rules.ShapeChoice], *,
                          cache_dir: Path | None = None, budget_bytes: int | None = None,
                          runs: int = 10, on_progress=None) -> tuple[ModelProfile, shape_rules.ShapeChoice]:
    """The profile at the first candidate shape the model runs at and that fits
    the budget. ProfilingError names every shape tried and why it failed."""
    failures = []
    for candidate in candidates:
        try:
            return load_or_measure(model, candidate.as_dict(), cache_dir=cache_dir, budget_bytes=budget_bytes,
                                   runs=runs, on_progress=on_progress), candidate
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises many types; each means "not at this shape"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failures.append(f"at {candidate.describe()}: {reason}")
            logger.info("%s: cannot profile %s", model.name, failures[-1])
    raise ProfilingError(f"{model.name} could not be profiled " + "; ".join(failures or ["(no shape to try)"]))


LOSSY_ENCODINGS = (pb.ENCODING_FP16, pb.ENCODING_INT8)


def measure_codec_errors(model: OnnxModel, profile: ModelProfile, *, budget_bytes: int | None = None,
                         seed: int = 1) -> CodecErrors:
    """The output error each lossy encoding adds at each cut (and at the inputs:
    REMOTE), at the profile's shapes: the cut's tensors from one run that exposes
    them all, encoded, decoded, and the rest of the model run on them. Blocking,
    about one suffix session per cut: run it off the request path."""
    shapes = {meta.name: tuple(meta.shape) for meta in profile.crossings[0]}
    feeds = sample_feeds(model.inputs, shapes, seed=seed)
    reference = model.run(feeds)
    errors: dict[int, list[float]] = {e: [] for e in LOSSY_ENCODINGS}

    def worst(outputs: dict[str, np.ndarray]) -> float:
        return max((_relative_error(outputs[name], reference[name]) for name in outputs), default=0.0)

    whole = ort.InferenceSession(model_proto(model).SerializeToString(), session_options(threads=model.threads,
                                 spinning=model.spinning), providers=["CPUExecutionProvider"])
    names = [o.name for o in whole.get_outputs()]
    for encoding in LOSSY_ENCODINGS:
        decoded = {name: _through(array, name, encoding) for name, array in feeds.items()}
        errors[encoding].append(worst(dict(zip(names, whole.run(names, decoded)))))
    graph = model.graph
    if graph is not None:
        crossing = sum(meta.raw_bytes for group in profile.crossings[1:] for meta in group)
        if budget_bytes is not None and crossing > budget_bytes:
            raise ProfilingError(f"holding every cut's tensors at once needs {crossing / 2**20:.0f} MiB, "
                                 f"more than the {budget_bytes / 2**20:.0f} MiB profiling budget")
        inner = sorted({name for cut in graph.cuts for name in cut.tensors} - set(feeds))
        exposed = ort.InferenceSession(
            expose_tensors(graph, inner).SerializeToString(),
            session_options(threads=model.threads, spinning=model.spinning, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
            providers=["CPUExecutionProvider"],
        )
        values = dict(zip([o.name for o in exposed.get_outputs()], exposed.run(None, feeds))) | feeds
        del exposed
        for cut in graph.cuts:
            suffix = ort.InferenceSession(suffix_model(graph, cut).SerializeToString(),
                                          session_options(threads=model.threads, spinning=model.spinning),
                                          providers=["CPUExecutionProvider"])
            out_names = [o.name for o in suffix.get_outputs()]
            for encoding in LOSSY_ENCODINGS:
                decoded = {name: _through(values[name], name, encoding) for name in cut.tensors}
                errors[encoding].append(worst(dict(zip(out_names, suffix.run(out_names, decoded)))))
    return CodecErrors({e: tuple(v) for e, v in errors.items()}, shape_rules.describe(shapes))


def load_or_measure_codec_errors(model: OnnxModel, profile: ModelProfile, *, cache_dir: Path | None = None,
                                 budget_bytes: int | None = None) -> CodecErrors:
    """``measure_codec_errors``, cached beside the profile it was measured at."""
    shapes = {meta.name: tuple(meta.shape) for meta in profile.crossings[0]}
    path = profile_path(model, shapes, cache_dir or default_cache_dir()).with_suffix(".codec.json")
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            errors = CodecErrors({int(e): tuple(float(x) for x in v) for e, v in raw["by_encoding"].items()}, raw["shapes"])
            if all(len(v) == model.num_segments for v in errors.by_encoding.values()):
                return errors
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable codec-error cache %s: %s", path, exc)
    errors = measure_codec_errors(model, profile, budget_bytes=budget_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"by_encoding": {str(e): list(v) for e, v in errors.by_encoding.items()},
                               "shapes": errors.shapes}))
    tmp.replace(path)
    return errors


def _through(array: np.ndarray, name: str, encoding: int) -> np.ndarray:
    return codec.decode(codec.encode(array, name, encoding))


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """max |value - reference| over the reference's range (1 for a constant or empty one)."""
    if reference.size == 0 or reference.dtype.kind not in "fc":
        return 0.0 if np.array_equal(value, reference) else 1.0
    span = float(np.ptp(reference)) or 1.0
    return float(np.max(np.abs(value.astype(np.float64) - reference))) / span


CODEC_PROBE_SHAPE = (1, 32, 112, 112)  # a typical early activation of an image model


CODEC_MIN_MEASURE_S = 0.1  # per encoding and direction: spans many CPU-quota periods


def measure_codec_speed(runs: int = 5, min_seconds: float = CODEC_MIN_MEASURE_S) -> dict[int, CodecSpeed]:
    """Encode/decode throughput of each encoding on this host, on float32 data.

    Total bytes over total time of at least ``runs`` repetitions and
    ``min_seconds``: under a CPU quota a short burst runs at full speed until
    the quota runs out, so a median of quick runs would promise a speed that
    a busy agent never sees.
    """
    tensor = np.random.default_rng(0).standard_normal(CODEC_PROBE_SHAPE).astype(np.float32)
    megabytes = tensor.nbytes / 1e6
    speeds = {}
    for encoding in (pb.ENCODING_RAW, pb.ENCODING_FP16, pb.ENCODING_INT8):
        message = codec.encode(tensor, "t", encoding)
        encode_s = _throughput_seconds(lambda: codec.encode(tensor, "t", encoding), runs, min_seconds)
        decode_s = _throughput_seconds(lambda: codec.decode(message), runs, min_seconds)
        speeds[encoding] = CodecSpeed(megabytes / encode_s, megabytes / decode_s)
    return speeds


def _throughput_seconds(work, runs: int, min_seconds: float) -> float:
    """Mean seconds per call of ``work`` over at least ``runs`` calls and ``min_seconds``."""
    calls = 0
    start = time.perf_counter()
    while calls < runs or time.perf_counter() - start < min_seconds:
        work()
        calls += 1
    return (time.perf_counter() - start) / calls


def predicted_for(device, model: OnnxModel, profile: ModelProfile) -> ModelProfile:
    """``profile`` (measured here) as it would be on ``device``: each segment's
    time scaled by its roofline ratio (FLOPs and bytes from the graph, this
    host's measured GFLOPS and bandwidth against the board's figures), so a
    laptop can plan for a Pi. Models that cannot be cut scale as one segment."""
    from devices.profiles import measure_host
    from partitioner.work import Machine, Work, concrete_shapes, node_work, predict_profile, segment_work

    measured = measure_host()
    host = Machine(measured.gflops_fp64, measured.mem_bandwidth_gbs, name="this host")
    # The floor under a prediction is the board's fp32 peak: inference runs in
    # fp32, and the fp64 HPL figure the ratios use would put it 2x too high.
    target = Machine(device.cpu_gflops, device.mem_bandwidth_gbs, name=device.name, peak_gflops=device.cpu_gflops_fp32)
    if model.graph is None:
        works: tuple[Work, ...] = (Work(0.0, 0.0, unknown=1),)
    else:
        shapes = {meta.name: tuple(meta.shape) for meta in profile.crossings[0]}  # where it was measured
        per_node = node_work(model.graph.model, concrete_shapes(model.graph.model, shapes))
        works = segment_work(model.graph, per_node)
    return predict_profile(profile, works, host, target)
