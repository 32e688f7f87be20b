"""How much work each node of an ONNX graph does, and what that predicts on another board.

The planner measures per-segment times on the host it runs on, but has to plan for the
board it will run on (a laptop planning for a Pi). This module counts each node's FLOPs
and bytes moved from concrete tensor shapes, sums them per segment, and scales the
measured host times with a roofline model: a segment's time on the target is its host
time times roofline(target) / roofline(host), so how efficiently the host ran that kernel
carries over, and only the machine's limits change.

Counting conventions (the same as fvcore / thop, so numbers compare with papers):
- a multiply-add is 2 FLOPs; a comparison, select or conversion is 1 FLOP;
- a transcendental (exp, log, erf, sqrt, tanh's exp) counts as 1 FLOP, so activations
  built from them cost "a few" per element (table `_PER_OUTPUT` below, formula beside);
- bytes moved = every input read (weights included) + every output written, at the
  tensors' element sizes, each distinct tensor once per node; ops that only read part of
  a tensor (Gather, Slice) count the part read, and Shape/Size read no data at all.
These are upper-bound, no-cache figures: the roofline needs the ratio between two
machines far more than absolute accuracy.

Pure: onnx and numpy only, no onnxruntime, no I/O besides logging.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx
from onnx import ModelProto, NodeProto

from partitioner.graph import ModelGraph, itemsize
from partitioner.profile import ModelProfile

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Work:
    flops: float            # floating-point operations (multiply-add = 2)
    bytes: float            # bytes read and written, weights included
    unknown: int = 0        # nodes in this total whose work is unknown (a tensor shape was missing); not in flops/bytes
    fallback: int = 0       # nodes in this total with no formula for their op: 1 FLOP per output element

    def __add__(self, other: Work) -> Work:
        return Work(
            self.flops + other.flops, self.bytes + other.bytes,
            self.unknown + other.unknown, self.fallback + other.fallback,
        )

    @property
    def known(self) -> bool:
        """True if every node in this total had the shapes its work needs."""
        return self.unknown == 0


_ZERO = Work(0.0, 0.0)


@dataclass(frozen=True)
class Machine:
    gflops: float               # sustained compute, GFLOP/s (machines are compared by its ratio)
    mem_bandwidth_gbs: float    # sustained memory bandwidth, GB/s (1e9 bytes/s)
    name: str = ""              # what the figures describe, in predicted profiles' `host`
    peak_gflops: float | None = None  # compute ceiling at the work's precision, GFLOP/s; None: gflops

    def __post_init__(self) -> None:
        if not (self.gflops > 0 and self.mem_bandwidth_gbs > 0):
            raise ValueError(
                f"machine {self.name or '?'}: gflops and mem_bandwidth_gbs must be positive, "
                f"got {self.gflops} and {self.mem_bandwidth_gbs}"
            )
        if self.peak_gflops is not None and not self.peak_gflops >= self.gflops:
            raise ValueError(f"machine {self.name or '?'}: peak_gflops {self.peak_gflops} is below gflops {self.gflops}")

    @property
    def ceiling_gflops(self) -> float:
        """The compute no run on this machine can beat: `peak_gflops`, else `gflops`."""
        return self.peak_gflops if self.peak_gflops is not None else self.gflops


# --------------------------------------------------------------------------- shapes


def concrete_shapes(
    model: ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
    default_dim: int = 1,
) -> dict[str, Shape]:
    """Concrete shape of every tensor shape inference can reach, for these input shapes.

    Graph inputs named in `input_shapes` take that shape (its static dims must match the
    model's); other inputs get their symbolic dims from `dims` (by name, e.g. {"N": 2})
    or `default_dim`. Tensors whose shape stays unknown are left out, so node_work marks
    their nodes unknown instead of guessing.
    """
    input_shapes = dict(input_shapes or {})
    dims = dict(dims or {})
    if default_dim < 0 or any(v < 0 for v in dims.values()):
        raise ValueError(f"dims must be non-negative: default_dim={default_dim}, dims={dims}")
    fixed = ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in initializers]
    unknown_names = sorted(set(input_shapes) - {vi.name for vi in real_inputs})
    if unknown_names:
        raise ValueError(
            f"{model.graph.name}: no graph input named {', '.join(map(repr, unknown_names))}; "
            f"inputs are {[vi.name for vi in real_inputs]}"
        )
    for vi in real_inputs:
        if vi.type.WhichOneof("value") != "tensor_type":
            continue
        _fix_input(model.graph.name, vi, input_shapes.get(vi.name), dims, default_dim)

    # Stale symbolic annotations would be merged back into the inferred shapes.
    graph.ClearField("value_info")
    for vi in graph.output:
        if vi.type.WhichOneof("value") == "tensor_type":
            vi.type.tensor_type.ClearField("shape")

    inferred = fixed
    for data_prop in (True, False):  # data propagation resolves Shape->Gather->Reshape chains
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=data_prop)
            break
        except Exception as exc:  # noqa: BLE001 -- inference failing only means fewer known shapes
            logger.debug("shape inference (data_prop=%s) failed on %s: %s", data_prop, model.graph.name, exc)

    shapes: dict[str, Shape] = {t.name: tuple(int(d) for d in t.dims) for t in inferred.graph.initializer}
    for t in inferred.graph.sparse_initializer:
        shapes[t.values.name] = tuple(int(d) for d in t.dims)
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = _static_shape(vi.type)
        if shape is not None and vi.name not in shapes:
            shapes[vi.name] = shape
    return shapes


def _fix_input(
    model_name: str, vi: onnx.ValueInfoProto, given: Sequence[int] | None, dims: Mapping[str, int], default_dim: int,
) -> None:
    tensor_type = vi.type.tensor_type
    declared = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    if given is not None:
        given = tuple(int(d) for d in given)
        if any(d < 0 for d in given):
            raise ValueError(f"{model_name}: input {vi.name!r} shape {given} has a negative dim")
        if declared is not None:
            if len(declared) != len(given):
                raise ValueError(
                    f"{model_name}: input {vi.name!r} has rank {len(declared)}, given shape {given} has rank {len(given)}"
                )
            clash = [
                (i, d.dim_value, g) for i, (d, g) in enumerate(zip(declared, given))
                if d.HasField("dim_value") and d.dim_value != g
            ]
            if clash:
                i, want, got = clash[0]
                raise ValueError(f"{model_name}: input {vi.name!r} dim {i} is fixed at {want}, given {got}")
        tensor_type.ClearField("shape")
        for g in given:
            tensor_type.shape.dim.add().dim_value = g
        return
    if declared is None:
        return  # unknown rank: nothing to substitute; inference will leave its users unknown
    for d in tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            d.dim_value = dims.get(d.dim_param, default_dim)


def _static_shape(t: onnx.TypeProto) -> Shape | None:
    if t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


# --------------------------------------------------------------------------- per-op formulas

# Ops that only move or re-describe data: 0 FLOPs, bytes only.
_DATA_MOVEMENT = frozenset({
    "Reshape", "Flatten", "Transpose", "Shape", "Size", "Gather", "GatherElements", "GatherND", "Concat",
    "Slice", "Split", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Expand", "Tile", "Pad", "Constant",
    "ConstantOfShape", "DepthToSpace", "SpaceToDepth", "ScatterND", "ScatterElements", "Range", "Trilu",
})
# Ops whose first input is read only where the output comes from (output-sized), not whole.
_PARTIAL_READ = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})
# Ops that read only their inputs' metadata.
_METADATA_ONLY = frozenset({"Shape", "Size"})

# FLOPs per output element of element-wise ops and activations (1 FLOP per exp/erf/log).
_PER_OUTPUT: dict[str, float] = {
    **dict.fromkeys((
        "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Clip",
        "Abs", "Neg", "Sign", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Sin", "Cos", "Tan", "Floor", "Ceil",
        "Round", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
        "Where", "Cast", "CastLike", "IsNaN", "IsInf", "BitShift", "Hardmax", "Shrink",
    ), 1.0),
    "Sigmoid": 4.0,         # 1 / (1 + exp(-x)): neg, exp, add, div
    "HardSigmoid": 3.0,     # clip(alpha * x + beta, 0, 1): mul, add, clip
    "HardSwish": 4.0,       # x * hardsigmoid(x)
    "Tanh": 5.0,            # (exp(2x) - 1) / (exp(2x) + 1): mul, exp, sub, add, div
    "Elu": 3.0,             # x < 0 ? alpha * (exp(x) - 1) : x: compare, exp, sub-and-scale
    "Celu": 4.0,            # elu with x / alpha inside: one more div
    "Selu": 4.0,            # elu then scale
    "Softplus": 3.0,        # log(exp(x) + 1)
    "Softsign": 3.0,        # x / (1 + |x|)
    "Mish": 9.0,            # x * tanh(softplus(x)): 3 + 5 + 1
    "Gelu": 5.0,            # 0.5 * x * (1 + erf(x / sqrt 2)): div, erf, add, mul, mul (tanh form: 13, below)
    "Softmax": 5.0,         # per element: running max, sub, exp, sum, div
    "LogSoftmax": 5.0,      # per element: running max, sub, exp, sum, sub log-sum
    "DequantizeLinear": 2.0,  # (x - zero_point) * scale
    "QuantizeLinear": 3.0,    # round(x / scale) + zero_point, saturated
}
_GELU_TANH = 13.0           # 0.5x(1 + tanh(k(x + 0.044715x^3))): cubic 3, add 1, k 1, tanh 5, add 1, two muls
# Variadic element-wise ops: (inputs - 1) FLOPs per output element (Mean adds the divide).
_VARIADIC = frozenset({"Sum", "Max", "Min", "Mean"})
# Reductions: FLOPs per input element.
_PER_INPUT: dict[str, float] = {
    **dict.fromkeys((
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ArgMax", "ArgMin",
        "GlobalAveragePool", "GlobalMaxPool",
    ), 1.0),
    "ReduceSumSquare": 2.0, "ReduceL2": 2.0, "ReduceLogSum": 1.0, "ReduceLogSumExp": 2.0, "GlobalLpPool": 2.0,
}
# Normalisations, FLOPs per element: mean (add), subtract, square-accumulate (2), scale by
# 1/std (mul), gamma (mul), beta (add) = 7; per-row sqrt/div are negligible.
_NORMALISATION = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization"})
_NORM_PER_ELEMENT = 7.0
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})

_Formula = Callable[[NodeProto, list[Shape | None], list[Shape | None]], float]


def _numel(shape: Shape | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _conv(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    # W is (M, C/group, k...): each output element is a dot product over C/group * prod(k).
    w, y = ins[1], outs[0]
    bias = _numel(y) if len(ins) > 2 and ins[2] is not None else 0
    return 2.0 * _numel(y) * w[1] * math.prod(w[2:]) + bias


def _conv_transpose(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    # W is (C, M/group, k...): each input element is scattered into M/group * prod(k) outputs.
    x, w, y = ins[0], ins[1], outs[0]
    bias = _numel(y) if len(ins) > 2 and ins[2] is not None else 0
    return 2.0 * _numel(x) * w[1] * math.prod(w[2:]) + bias


def _gemm(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    a, y = ins[0], outs[0]
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    k = a[0] if trans_a else a[1]
    c = _numel(y) if len(ins) > 2 and ins[2] is not None else 0
    return 2.0 * _numel(y) * k + c


def _matmul(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    # The output already carries the broadcast batch dims; each element is a K-long dot product.
    a = ins[0]
    return 2.0 * _numel(outs[0]) * a[-1]


def _pool(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    kernel = next((list(attr.ints) for attr in node.attribute if attr.name == "kernel_shape"), [])
    return float(math.prod(kernel) * _numel(outs[0]))


def _gelu(node: NodeProto, ins: list[Shape | None], outs: list[Shape | None]) -> float:
    approx = next((attr.s.decode() for attr in node.attribute if attr.name == "approximate"), "none")
    return (_GELU_TANH if approx == "tanh" else _PER_OUTPUT["Gelu"]) * _numel(outs[0])


def _formula(op: str) -> _Formula | None:
    if op in ("Conv", "ConvInteger"):
        return _conv
    if op == "ConvTranspose":
        return _conv_transpose
    if op == "Gemm":
        return _gemm
    if op in ("MatMul", "MatMulInteger"):
        return _matmul
    if op in _POOLS:
        return _pool
    if op == "Gelu":
        return _gelu
    if op == "BatchNormalization":
        # Inference BN folds to y = x * a + b with per-channel a, b: one multiply-add.
        return lambda node, ins, outs: 2.0 * _numel(outs[0])
    if op in _NORMALISATION:
        return lambda node, ins, outs: _NORM_PER_ELEMENT * _numel(ins[0])
    if op in _DATA_MOVEMENT:
        return lambda node, ins, outs: 0.0
    if op in _PER_OUTPUT:
        per = _PER_OUTPUT[op]
        return lambda node, ins, outs: per * _numel(outs[0])
    if op in _VARIADIC:
        extra = 1 if op == "Mean" else 0
        return lambda node, ins, outs: max(len(ins) - 1 + extra, 1) * _numel(outs[0])
    if op in _PER_INPUT:
        per = _PER_INPUT[op]
        return lambda node, ins, outs: per * _numel(ins[0])
    return None


def _op_key(node: NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def unmodelled_ops(model: ModelProto) -> frozenset[str]:
    """Op types in `model` with no formula here (domain-qualified outside the default domain).

    Their nodes get 1 FLOP per output element, and their Work has `fallback` set.
    """
    return frozenset(
        _op_key(node) for node in model.graph.node
        if node.domain not in _DEFAULT_DOMAINS or _formula(node.op_type) is None
    )


# --------------------------------------------------------------------------- per node, per segment


def node_work(model: ModelProto, shapes: Mapping[str, Shape]) -> dict[str, Work]:
    """Work of every top-level node, by node name (give it `ModelGraph.model`: names are unique).

    A node missing the shape of any input or output gets Work(0, 0, unknown=1) rather than a
    guess; a node whose op has no formula gets 1 FLOP per output element and fallback=1
    (see unmodelled_ops).
    """
    itemsize = _itemsizes(model)
    result: dict[str, Work] = {}
    missing: list[str] = []
    for node in model.graph.node:
        name = node.name
        if not name or name in result:
            raise ValueError(
                f"{model.graph.name}: node names must be unique and non-empty "
                f"(got {name!r}); pass partitioner.graph.analyze(model).model"
            )
        ins = [shapes.get(n) if n else None for n in node.input]
        outs = [shapes.get(n) if n else None for n in node.output]
        absent = [n for n in (*node.input, *node.output) if n and n not in shapes]
        if absent:
            missing.append(name)
            result[name] = Work(0.0, 0.0, unknown=1)
            continue
        formula = _formula(node.op_type) if node.domain in _DEFAULT_DOMAINS else None
        if formula is None:
            flops, fallback = float(sum(_numel(s) for s in outs)), 1
        else:
            flops, fallback = float(formula(node, ins, outs)), 0
        result[name] = Work(flops, _bytes_moved(node, shapes, itemsize), fallback=fallback)
    unmodelled = unmodelled_ops(model)
    if unmodelled or missing:
        logger.info(
            "%s: %d node(s) with unknown shapes %s; op(s) with no formula (1 FLOP/element): %s",
            model.graph.name, len(missing), missing[:5], sorted(unmodelled),
        )
    return result


def _bytes_moved(node: NodeProto, shapes: Mapping[str, Shape], itemsize: Mapping[str, float]) -> float:
    op = node.op_type if node.domain in _DEFAULT_DOMAINS else ""
    outputs = [n for n in dict.fromkeys(node.output) if n]
    total = sum(_numel(shapes[n]) * itemsize.get(n, 4.0) for n in outputs)
    if op in _METADATA_ONLY:
        return float(total)
    for k, n in enumerate(dict.fromkeys(node.input)):
        if not n:
            continue
        if k == 0 and op in _PARTIAL_READ:
            total += _numel(shapes[outputs[0]]) * itemsize.get(n, 4.0)
        else:
            total += _numel(shapes[n]) * itemsize.get(n, 4.0)
    return float(total)


def _itemsizes(model: ModelProto) -> dict[str, float]:
    """Element size in bytes of every typed tensor; untyped ones default to 4 (float32) in _bytes_moved."""
    types: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    types |= {t.values.name: t.values.data_type for t in model.graph.sparse_initializer}

    def collect(m: ModelProto) -> None:
        for vi in (*m.graph.input, *m.graph.value_info, *m.graph.output):
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)

    collect(model)
    wanted = {n for node in model.graph.node for n in (*node.input, *node.output) if n}
    if wanted - set(types):
        try:
            collect(onnx.shape_inference.infer_shapes(model))
        except Exception as exc:  # noqa: BLE001 -- untyped tensors then count as float32
            logger.debug("type inference failed on %s: %s", model.graph.name, exc)
    return {name: itemsize(t, unknown=4.0) for name, t in types.items()}


def segment_work(graph: ModelGraph, per_node: Mapping[str, Work]) -> tuple[Work, ...]:
    """Work of each segment of `graph`; a node absent from `per_node` counts as unknown."""
    missing = Work(0.0, 0.0, unknown=1)
    return tuple(sum((per_node.get(name, missing) for name in seg), _ZERO) for seg in graph.segments)


# --------------------------------------------------------------------------- roofline


def roofline_ms(work: Work, machine: Machine) -> float:
    """Time of `work` at the machine's compute or bandwidth limit, whichever binds."""
    return max(work.flops / (machine.gflops * 1e9), work.bytes / (machine.mem_bandwidth_gbs * 1e9)) * 1e3


def floor_ms(work: Work, machine: Machine) -> float:
    """The least time `work` can take on the machine: its roofline at the compute ceiling.

    `Machine.peak_gflops` separates the two uses of a compute figure: ratios between
    machines hold whatever the precision (fp32 and fp64 peaks differ by the same 2x on
    NEON and AVX2), but an absolute bound on fp32 work needs the fp32 ceiling.
    """
    return max(work.flops / (machine.ceiling_gflops * 1e9), work.bytes / (machine.mem_bandwidth_gbs * 1e9)) * 1e3


def scaled_segment_ms(
    measured_ms: Sequence[float], works: Sequence[Work], host: Machine, target: Machine,
) -> tuple[float, ...]:
    """Each segment's host time scaled by roofline(target) / roofline(host), unbounded.

    A segment with no known work (zero roofline time, e.g. every node's shape unknown)
    scales by the whole model's ratio: the sum of the other segments' target rooflines
    over the sum of their host rooflines; with no known work anywhere, by the compute
    ratio host.gflops / target.gflops (kernels on small boards are mostly compute-bound).
    A segment with some unknown nodes scales by the ratio of the nodes it does know
    (`Work.unknown` says how many were left out).
    """
    if len(measured_ms) != len(works):
        raise ValueError(f"{len(measured_ms)} measured segment times for {len(works)} segment works")
    on_host = [roofline_ms(w, host) for w in works]
    on_target = [roofline_ms(w, target) for w in works]
    host_total = sum(on_host)
    whole = sum(on_target) / host_total if host_total > 0 else host.gflops / target.gflops
    return tuple(ms * (t / h if h > 0 else whole) for ms, h, t in zip(measured_ms, on_host, on_target))


def predict_segment_ms(
    measured_ms: Sequence[float], works: Sequence[Work], host: Machine, target: Machine,
) -> tuple[float, ...]:
    """Each segment's scaled host time (scaled_segment_ms), never below its floor on the
    target (floor_ms: FLOPs over the compute ceiling, bytes over the bandwidth).

    Without the floor, a host that ran a kernel faster than its own speed figure says
    (a figure that read low on a busy machine, or FLOPs over-counted) promises a board
    more than its peak. A segment with unknown nodes is floored by the nodes it knows.
    """
    scaled = scaled_segment_ms(measured_ms, works, host, target)
    return tuple(max(ms, floor_ms(w, target)) for ms, w in zip(scaled, works))


def predict_profile(
    profile: ModelProfile, works: Sequence[Work], host: Machine, target: Machine,
) -> ModelProfile:
    """The profile `profile` would have on `target`, from its measurement on `host`.

    Per-segment times scale by their roofline ratio, each floored on `target`
    (predict_segment_ms); the run overhead (session and framework code, not kernels) by
    the compute ratio host.gflops / target.gflops. The whole run then never beats the
    whole model's floor on `target` either: a sum of per-segment floors is at least the
    floor of the summed work.
    """
    if len(works) != profile.num_segments:
        raise ValueError(f"profile of {profile.model} has {profile.num_segments} segments, got {len(works)} works")
    segment_ms = predict_segment_ms(profile.segment_ms, works, host, target)
    overhead_ms = profile.run_overhead_ms * host.gflops / target.gflops
    return replace(
        profile,
        host=f"predicted for {target.name or 'target'} from {profile.host}",
        segment_ms=segment_ms,
        run_overhead_ms=overhead_ms,
        whole_ms=sum(segment_ms) + overhead_ms,
    )
