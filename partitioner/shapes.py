"""Which input shapes a model is profiled at, and how a request's shapes map onto them.

A profile measured with every dynamic dimension set to 1 is useless: detector and
segmentation graphs fail at 1x1 (an upsampled feature map no longer matches its
lateral), and a classifier measured at 1x1 and scaled by element count was
predicted 200x off. So a model is profiled at shapes an app would send: the
deployment's configured ``profile_shapes``, else what the model declares (static
dims, ``tandem.profile_shapes`` metadata, a concrete shape recorded for an input in
its value_info), else conventional sizes tried in turn (an image's H and W at 224,
then 320, ...). Requests then teach the daemon the shapes really sent: each shape
*bucket* (dynamic dims rounded up to a power of two) is profiled once, and a request
is planned from the profile of its own bucket, scaled to its exact shape by the
per-node work model (``partitioner.work``).

Pure: onnx and numpy only, no I/O, no onnxruntime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import ModelProto

from partitioner.work import concrete_shapes

# Model metadata key under which a model may declare the shapes an app sends,
# as JSON: {"images": [1, 3, 320, 320]}.
METADATA_KEY = "tandem.profile_shapes"

# A declared dimension: an int when static, the symbolic name (or "") when dynamic.
Dim = int | str
Shapes = Mapping[str, tuple[int, ...]]

# Conventional sizes for a dynamic dimension, tried in turn until the model runs.
# Spatial dims of a rank-4 (NCHW) input start at 224, the ImageNet size, then go to
# multiples of 32 that detectors accept (their strides reach /32); other dims start
# small, as sequence lengths and feature counts vary too much to guess well.
SPATIAL_SIZES = (224, 320, 256, 416, 512, 640, 128, 64, 32)
OTHER_SIZES = (1, 8, 32, 128, 16, 4, 2, 64, 256)
# Symbolic names that mean batch: always profiled at 1.
BATCH_NAMES = frozenset({"n", "batch", "batch_size", "batchsize", "bs", "b", "none", "unk__0"})
FLOAT32_BYTES = 4  # activations whose element type the estimate does not know count as float32


class ShapeError(ValueError):
    """A configured or declared shape that does not fit the model; the message says why."""


@dataclass(frozen=True)
class ShapeChoice:
    """Concrete input shapes to profile at, and where they came from."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (input name, shape), in the model's input order
    source: str                                       # "config", "model", "request" or "default"

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def describe(self) -> str:
        return describe(self.as_dict())


def describe(shapes: Shapes) -> str:
    """'images[1,3,320,320]': shapes as messages show them."""
    return ", ".join(f"{name}[{','.join(map(str, shape))}]" for name, shape in shapes.items())


def key_of(shapes: Shapes) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Exact shapes, in order, as a dictionary key (what ``describe`` says, without the text)."""
    return tuple((name, tuple(shape)) for name, shape in shapes.items())


def choice(shapes: Shapes, source: str, order: Sequence[str] | None = None) -> ShapeChoice:
    names = list(order) if order is not None else list(shapes)
    return ShapeChoice(tuple((n, tuple(int(d) for d in shapes[n])) for n in names if n in shapes), source)


# --------------------------------------------------------------------------- what the model declares


def declared_inputs(model: ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    """Each real graph input's declared dims (None: rank unknown)."""
    initializers = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    declared: dict[str, tuple[Dim, ...] | None] = {}
    for vi in model.graph.input:
        if vi.name in initializers or vi.type.WhichOneof("value") != "tensor_type":
            continue
        tensor = vi.type.tensor_type
        if not tensor.HasField("shape"):
            declared[vi.name] = None
            continue
        declared[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
    return declared


def check_shapes(declared: Mapping[str, tuple[Dim, ...] | None], shapes: Mapping[str, object], where: str) -> dict[str, tuple[int, ...]]:
    """``shapes`` validated against the model's inputs (names, ranks, static dims); ShapeError says what is wrong."""
    unknown = sorted(set(shapes) - set(declared))
    if unknown:
        raise ShapeError(f"{where}: no input named {', '.join(map(repr, unknown))}; inputs are {list(declared)}")
    checked: dict[str, tuple[int, ...]] = {}
    for name, value in shapes.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
            raise ShapeError(f"{where}: shape of {name!r} must be a list of whole numbers, got {value!r}")
        shape = tuple(int(d) for d in value)
        if any(d <= 0 for d in shape):
            raise ShapeError(f"{where}: shape of {name!r} must have dims >= 1, got {list(shape)}")
        dims = declared[name]
        if dims is not None:
            if len(dims) != len(shape):
                raise ShapeError(f"{where}: {name!r} has rank {len(dims)}, got shape {list(shape)}")
            for i, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise ShapeError(f"{where}: {name!r} dim {i} is fixed at {want}, got {got}")
        checked[name] = shape
    return checked


def check_every_input(declared: Mapping[str, tuple[Dim, ...] | None], shapes: Mapping[str, object],
                      where: str) -> dict[str, tuple[int, ...]]:
    """``check_shapes``, and every input must be given: a whole request's shapes."""
    checked = check_shapes(declared, shapes, where)
    missing = sorted(set(declared) - set(checked))
    if missing:
        raise ShapeError(f"{where}: give a shape for every input; missing {missing}")
    return checked


def metadata_shapes(model: ModelProto) -> dict[str, object] | None:
    """The shapes the model's own ``tandem.profile_shapes`` metadata declares, unchecked (None: absent)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise ShapeError(f"metadata {METADATA_KEY} is not JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ShapeError(f"metadata {METADATA_KEY} must map input names to shapes, got {prop.value!r}")
            return value
    return None


def _value_info_hint(model: ModelProto, name: str) -> tuple[int, ...] | None:
    """A fully concrete shape some exporters record for an input in value_info."""
    for vi in model.graph.value_info:
        if vi.name == name and vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
                return tuple(d.dim_value for d in dims)
    return None


def _sizes_for(dims: tuple[Dim, ...], position: int) -> tuple[int, ...]:
    name = dims[position]
    if position == 0 or (isinstance(name, str) and name.lower() in BATCH_NAMES):
        return (1,)
    if len(dims) == 4 and position >= 2:
        return SPATIAL_SIZES
    return OTHER_SIZES


def profile_candidates(
    model: ModelProto, *, configured: Mapping[str, object] | None = None,
) -> list[ShapeChoice]:
    """Shapes to try profiling at, best first: configured, then declared by the model, then conventional.

    A configured or metadata shape that does not fit the model is a ShapeError (the
    deployment or the file is wrong, and guessing past it would hide that). Inputs
    the configured shapes leave out take the model's defaults.
    """
    declared = declared_inputs(model)
    order = list(declared)
    fixed: dict[str, tuple[int, ...]] = {}
    if configured:
        fixed.update(check_shapes(declared, configured, "profile_shapes"))
    meta = metadata_shapes(model)
    if meta:
        from_meta = check_shapes(declared, meta, f"metadata {METADATA_KEY}")
        fixed.update({k: v for k, v in from_meta.items() if k not in fixed})
    for name in order:
        if name not in fixed and (hint := _value_info_hint(model, name)) is not None:
            try:
                fixed.update(check_shapes(declared, {name: list(hint)}, "value_info"))
            except ShapeError:
                pass  # a stale value_info entry: the declared input wins

    # Inputs still open: static dims as declared, dynamic ones from conventional
    # sizes, the same symbolic name always taking the same value.
    open_inputs = [n for n in order if n not in fixed]
    for name in open_inputs:
        if declared[name] is None:
            raise ShapeError(f"input {name!r} has no declared rank; set profile_shapes for it")
    # Batch dims are always profiled at 1, which is no guess; any other open dim is.
    guessed = any(not (isinstance(d, int) and d > 0) and _sizes_for(declared[n], i) != (1,)
                  for n in open_inputs for i, d in enumerate(declared[n]))
    source = "config" if configured else ("default" if guessed else "model")
    attempts = max(len(SPATIAL_SIZES), len(OTHER_SIZES)) if guessed else 1
    seen: set[ShapeChoice] = set()
    result: list[ShapeChoice] = []
    for attempt in range(attempts):
        by_symbol: dict[str, int] = {}
        shapes = dict(fixed)
        for name in open_inputs:
            dims = declared[name]
            shape = []
            for position, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                    continue
                sizes = _sizes_for(dims, position)
                value = by_symbol.setdefault(d, sizes[attempt % len(sizes)]) if d else sizes[attempt % len(sizes)]
                shape.append(value)
            shapes[name] = tuple(shape)
        candidate = choice(shapes, source, order)
        if candidate not in seen:
            seen.add(candidate)
            result.append(candidate)
    return result


# --------------------------------------------------------------------------- buckets


def bucket(shapes: Shapes, declared: Mapping[str, tuple[Dim, ...] | None]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The shape bucket of a request: dynamic dims rounded up to a power of two.

    Requests in one bucket are planned from one profile scaled by the work model,
    so an app whose image sizes vary a little is profiled once, not per size.
    """
    key = []
    for name in sorted(shapes):
        dims = declared.get(name)
        rounded = tuple(
            d if dims is not None and i < len(dims) and isinstance(dims[i], int) and dims[i] > 0 else _pow2(d)
            for i, d in enumerate(shapes[name])
        )
        key.append((name, rounded))
    return tuple(key)


def _pow2(d: int) -> int:
    return 1 if d <= 1 else 1 << (int(d) - 1).bit_length()


def distance(a: Shapes, b: Shapes) -> float:
    """How far apart two sets of input shapes are: summed |log2| of dim ratios."""
    total = 0.0
    for name, shape in a.items():
        other = b.get(name)
        if other is None or len(other) != len(shape):
            return math.inf
        total += sum(abs(math.log2(max(x, 1) / max(y, 1))) for x, y in zip(shape, other))
    return total


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Footprint:
    """Estimated memory to run a model once at some shapes, bytes."""

    inputs: int          # the inputs themselves
    weights: int         # initializers
    largest_node: int    # the largest one node reads and writes at once (0 when shapes are unknown)
    known: bool          # every activation's shape was inferred

    @property
    def total(self) -> int:
        return self.inputs + self.weights + self.largest_node


def footprint(model: ModelProto, shapes: Shapes, input_itemsize: Mapping[str, int], *,
              stop_above: int | None = None) -> Footprint:
    """A lower-bound estimate of the memory one run needs: enough to refuse what cannot fit.

    Activations whose shape inference cannot reach count as unknown (``known`` False),
    so the estimate never invents a figure; they count as float32 when known. When the
    inputs and weights alone exceed ``stop_above``, activations are not inferred at all.
    """
    inputs = sum(math.prod(shape) * input_itemsize.get(name, FLOAT32_BYTES) for name, shape in shapes.items())
    weights = sum(_initializer_bytes(t) for t in model.graph.initializer)
    if stop_above is not None and inputs + weights > stop_above:
        return Footprint(inputs, weights, 0, False)
    try:
        known = concrete_shapes(model, shapes)
    except ValueError:
        return Footprint(inputs, weights, 0, False)
    largest = 0
    complete = True
    for node in model.graph.node:
        names = [n for n in (*node.input, *node.output) if n]
        if any(n not in known for n in names):
            complete = False
        size = sum(math.prod(known[n]) * FLOAT32_BYTES for n in dict.fromkeys(names) if n in known)
        largest = max(largest, size)
    return Footprint(inputs, weights, largest, complete)


def _initializer_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return math.prod(t.dims) * FLOAT32_BYTES
