"""Measure a model's per-segment times with onnxruntime's own profiler.

Per-node kernel times come from a profiling session with graph optimisation
off, where every node keeps its name (even basic optimisation fuses some,
e.g. MatMul+Add, under new names; see DESIGN.md's measured facts). They are then scaled so that their sum plus the
run overhead equals the measured median of a real, fully optimised run: the
shape of the profile comes from the profiler, its size from reality.
Profiles are cached per model digest and host, since measuring takes seconds.
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
import onnxruntime as ort

from devices.limits import cpu_cgroup, cpu_quota
from partitioner.graph import expose_tensors
from partitioner.planning import CodecSpeed
from partitioner.profile import ModelProfile, TensorMeta
from protos import codec
from protos import tandem_pb2 as pb
from runtimes.onnx_exec import OnnxModel, TensorSpec, session_options

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem")) / "profiles"


def host_key(threads: int | None, spinning: bool | None = None) -> str:
    quota = cpu_quota()
    group = cpu_cgroup()
    limit = f"-q{quota:.3f}" if quota else ""
    if group != "/":
        limit += "-cg" + hashlib.sha256(group.encode()).hexdigest()[:8]
    spin = {None: "", True: "-spin", False: "-nospin"}[spinning]
    return f"{platform.node()}-{os.cpu_count()}cpu{limit}-t{threads or 0}{spin}-ort{ort.__version__}"


def sample_feeds(inputs: tuple[TensorSpec, ...], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for profiling; dynamic dimensions are taken as 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = tuple(1 if d is None else d for d in (spec.shape or ()))
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def _median_run_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _node_times_per_run(profile_file: str) -> list[dict[str, float]]:
    """Kernel time (ms) of each node in each run recorded by the profiler."""
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


def measure(model: OnnxModel, *, runs: int = 10, warmup: int = 2, on_progress=None) -> ModelProfile:
    """Profile ``model`` on this host (blocking, takes roughly 2 x (runs + warmup) model runs)."""
    graph = model.graph
    feeds = sample_feeds(model.inputs)
    if graph is None:
        return _measure_whole(model, feeds, runs=runs, warmup=warmup)
    serialized = graph.model.SerializeToString()

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=model.threads, spinning=model.spinning, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        profiling = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            profiling.run(None, feeds)
        profiled_ms = []
        for i in range(runs):
            start = time.perf_counter()
            profiling.run(None, feeds)
            profiled_ms.append((time.perf_counter() - start) * 1e3)
            if on_progress:
                on_progress(i + 1, 2 * runs)
        per_run = _node_times_per_run(profiling.end_profiling())[warmup:]

    segment_of = {node: i for i, names in enumerate(graph.segments) for node in names}
    per_segment = [[0.0] * len(graph.segments) for _ in per_run]
    for run_index, node_times in enumerate(per_run):
        for node, ms in node_times.items():
            # onnxruntime may add nodes of its own (casts, copies); they are
            # not ours to place, so they count as run overhead.
            if node in segment_of:
                per_segment[run_index][segment_of[node]] += ms
    plain_segments = [statistics.median(run[i] for run in per_segment) for i in range(len(graph.segments))]
    plain_overhead = max(statistics.median(profiled_ms) - sum(plain_segments), 0.0)

    optimised = ort.InferenceSession(serialized, session_options(threads=model.threads, spinning=model.spinning), providers=["CPUExecutionProvider"])
    _median_run_ms(optimised, feeds, warmup)
    whole_ms = _median_run_ms(optimised, feeds, runs)
    if on_progress:
        on_progress(2 * runs, 2 * runs)

    # Profiling itself slows kernels; rescale the profiled shape to the
    # unprofiled fully-optimised run.
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
    whole_ms = statistics.median(times)

    def metas(values: dict[str, np.ndarray]) -> tuple[TensorMeta, ...]:
        return tuple(TensorMeta(n, str(v.dtype), tuple(int(d) for d in v.shape)) for n, v in values.items())

    return ModelProfile(
        model=model.name, digest=model.digest, host=host_key(model.threads, model.spinning), segment_ms=(whole_ms,),
        run_overhead_ms=0.0, whole_ms=whole_ms, crossings=(metas(feeds),), outputs=metas(outputs),
        segment_param_bytes=(model.param_bytes,), runs=runs,
    )


def _tensor_metas(model: OnnxModel, feeds: dict[str, np.ndarray]) -> tuple[tuple[tuple[TensorMeta, ...], ...], tuple[TensorMeta, ...]]:
    """Real dtypes and shapes of every cut's tensors, from one run that exposes them."""
    graph = model.graph
    assert graph is not None  # measure() checked
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


def load_or_measure(model: OnnxModel, *, cache_dir: Path | None = None, runs: int = 10, on_progress=None) -> ModelProfile:
    """The cached profile of this exact model file on this host, measured if absent."""
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"{model.name}-{model.digest[:16]}-{host_key(model.threads, model.spinning)}-v{PROFILE_FORMAT}.json"
    if path.exists():
        try:
            profile = ModelProfile.from_json(path.read_text())
            if profile.digest == model.digest and profile.num_segments == model.num_segments:
                return profile
        except (ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable profile cache %s: %s", path, exc)
    logger.info("profiling %s (%d segments) on this host", model.name, model.num_segments)
    profile = measure(model, runs=runs, on_progress=on_progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename: a crash mid-write must not leave a corrupt cache.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile


def profile_store(store, *, cache_dir: Path | None = None) -> dict[str, ModelProfile]:
    """Profiles of every model in ``store``. A model that cannot run on
    sample inputs (say a dynamic dimension our guess of 1 does not fit) is
    removed from the store with the reason logged: one bad model must not take
    the daemon down, and a model we cannot measure we cannot plan for."""
    profiles = {}
    for name, model in list(store.models.items()):
        try:
            profiles[name] = load_or_measure(model, cache_dir=cache_dir)
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises many types; all mean "cannot measure"
            logger.error("not serving %s: profiling it on sample inputs failed: %s", name, exc)
            del store.models[name]
    return profiles


CODEC_PROBE_SHAPE = (1, 32, 112, 112)  # a typical early activation of an image model


def measure_codec_speed(runs: int = 5) -> dict[int, CodecSpeed]:
    """Encode/decode throughput of each encoding on this host, on float32 data."""
    tensor = np.random.default_rng(0).standard_normal(CODEC_PROBE_SHAPE).astype(np.float32)
    megabytes = tensor.nbytes / 1e6
    speeds = {}
    for encoding in (pb.ENCODING_RAW, pb.ENCODING_FP16, pb.ENCODING_INT8):
        enc, dec = [], []
        for _ in range(runs):
            start = time.perf_counter()
            message = codec.encode(tensor, "t", encoding)
            enc.append(time.perf_counter() - start)
            start = time.perf_counter()
            codec.decode(message)
            dec.append(time.perf_counter() - start)
        speeds[encoding] = CodecSpeed(megabytes / statistics.median(enc), megabytes / statistics.median(dec))
    return speeds


def predicted_for(device, model: OnnxModel, profile: ModelProfile) -> ModelProfile:
    """``profile`` (measured here) as it would be on ``device``: each segment's
    time scaled by its roofline ratio (FLOPs and bytes from the graph, this
    host's measured GFLOPS and bandwidth against the board's figures), so a
    laptop can plan for a Pi. Models that cannot be cut scale as one segment."""
    from devices.profiles import measure_host
    from partitioner.work import Machine, Work, concrete_shapes, node_work, predict_profile, segment_work

    measured = measure_host()
    host = Machine(measured.gflops_fp64, measured.mem_bandwidth_gbs, name="this host")
    target = Machine(device.cpu_gflops, device.mem_bandwidth_gbs, name=device.name)
    if model.graph is None:
        works: tuple[Work, ...] = (Work(0.0, 0.0, unknown=1),)
    else:
        per_node = node_work(model.graph.model, concrete_shapes(model.graph.model))
        works = segment_work(model.graph, per_node)
    return predict_profile(profile, works, host, target)
