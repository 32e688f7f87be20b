"""Where an ONNX model can be cut, and the two sub-models on either side of a cut.

Pure graph analysis over any valid ONNX model: no file I/O, no onnxruntime, no
randomness. The planner needs, for every candidate split, the exact set of tensors
that must travel edge -> cloud (a cut inside a residual block carries the skip too),
and the runtimes need a prefix and a suffix model that compose to the original.

Two kinds of cut. Chain cuts (index 1..n-1) are the useful positions in one fixed
topological order, found by analyze(). General cuts (index 0) are any downward-closed
set of input-dependent nodes on the edge (ModelGraph.cut_of), which is what a DAG
min-cut returns on branchy graphs; a general cut that equals a chain cut is that chain
cut. Either kind is identified by what crosses: its tensors and its edge outputs.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import (
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
    helper,
)

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")

# Ops that act element-by-element (or per channel) on one data input: cutting right
# before one ships the same bytes as cutting right after it, so the position before
# is never better and is merged into the following segment.
_FOLLOWER_OPS = frozenset({
    "BatchNormalization", "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid",
    "HardSwish", "Elu", "Selu", "Softplus", "Dropout", "Identity", "Cast",
})
# Binary ops that are followers only when the other operand is a constant (a bias, a scale).
_BINARY_FOLLOWER_OPS = frozenset({"Add", "Mul", "Sub", "Div"})
# Computing these on both sides would give different values, so they are never
# treated as constants even without inputs.
_NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
# Element types stored two per byte.
_HALF_BYTE_TYPES = frozenset(
    getattr(TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, t)
)


class GraphError(ValueError):
    """The model cannot be cut, or a cut is invalid; the message says why."""


class _Refused(Exception):
    """Why a set of tensors or nodes is not a cut; callers prefix what was asked."""


@dataclass(frozen=True)
class Cut:
    index: int                      # 1..n-1: number of segments that run on the edge; 0: a general cut
    tensors: tuple[str, ...]        # every tensor that must cross edge -> cloud (deterministic order)
    passthrough: tuple[str, ...]    # the subset of `tensors` that are graph inputs crossing unchanged
    edge_outputs: tuple[str, ...]   # graph outputs already produced on the edge side (they stay there)
    # General cuts only: the input-dependent nodes the edge runs, in topological order
    # (empty for chain cuts, whose edge side is their first `index` segments).
    nodes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Unique per cut of a model, stable across processes: for session caches and plan labels.

        A chain cut's key is its index; a general cut's is a digest of its tensors and edge
        outputs, which determine it (ModelGraph.find_cut rebuilds it from them).
        """
        if self.index:
            return str(self.index)
        text = "\0".join((*self.tensors, "", *self.edge_outputs))  # names are never empty: unambiguous
        return "g" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Analysis:
    """Facts about the normalised model that extraction needs; computed once by analyze()."""

    node_inputs: tuple[tuple[str, ...], ...]   # per node: explicit inputs then implicit (subgraph) ones
    producer: dict[str, int]                   # tensor -> index of the node producing it
    constant_nodes: frozenset[int]             # nodes depending on no graph input
    initializers: frozenset[str]               # dense and sparse initializer names
    types: dict[str, TypeProto]                # best known type of every value
    dynamic: tuple[int, ...]                   # input-dependent node indices, in topological order
    cut_positions: tuple[int, ...]             # cuts[i] splits `dynamic` before this position
    node_index: dict[str, int]                 # node name -> index
    consumers: dict[str, tuple[int, ...]]      # tensor -> indices of the nodes reading it
    live: frozenset[int]                       # nodes some graph output depends on
    initializer_bytes: dict[str, int]          # initializer name -> stored bytes
    crossable: frozenset[str]                  # inputs and node outputs a sub-model can declare at its boundary


@dataclass(frozen=True)
class ModelGraph:
    model: onnx.ModelProto          # normalised copy: unique non-empty node names, nodes topologically sorted
    inputs: tuple[str, ...]         # real graph inputs (not initializers)
    outputs: tuple[str, ...]
    segments: tuple[tuple[str, ...], ...]   # node names of each segment, n >= 1 segments, in order
    cuts: tuple[Cut, ...]           # n-1 cuts, cuts[i].index == i + 1
    segment_param_bytes: tuple[int, ...]    # initializer bytes used by each segment's nodes (shared ones count in each)
    name: str = ""                  # the model's name in messages
    _analysis: _Analysis | None = field(default=None, repr=False, compare=False)

    def cut(self, index: int) -> Cut:
        """The cut after `index` segments; GraphError names the valid range otherwise."""
        if not 1 <= index <= len(self.cuts):
            raise GraphError(f"cut {index} is out of range for {self.name}: valid cuts are 1..{len(self.cuts)}")
        return self.cuts[index - 1]

    def find_cut(self, tensors: Iterable[str], *, edge_outputs: Iterable[str] | None = None) -> Cut:
        """The cut that ships exactly this set of tensors (order does not matter).

        This is how the cloud side rebuilds the edge's cut from a PartitionRequest. A chain
        cut shipping these tensors wins; otherwise the general cut they imply: the cloud runs
        what the graph outputs need back to these tensors, the edge runs the rest. Without
        ``edge_outputs``, the edge's outputs are those the shipped tensors cannot produce
        (and shipped outputs); pass them when the edge keeps an output the cloud could also
        compute, since the tensors alone cannot say so.
        """
        wanted = frozenset(tensors)
        kept = None if edge_outputs is None else frozenset(edge_outputs)
        chain = self._chain_cut(wanted, kept)
        if chain is not None:
            return chain
        known = set(self.inputs) | set(self._facts().producer) | self._facts().initializers
        unknown = sorted(wanted - known)
        if unknown:
            why = f"no tensor named {', '.join(map(repr, unknown))} exists in the model"
            raise GraphError(f"{sorted(wanted)} is not a valid cut of {self.name}: {why}")
        try:
            return self._boundary_cut(wanted, kept)
        except _Refused as exc:
            sample = "; ".join(f"{c.index}: {list(c.tensors)}" for c in self.cuts[:5])
            more = f" (and {len(self.cuts) - 5} more)" if len(self.cuts) > 5 else ""
            raise GraphError(
                f"{sorted(wanted)} is not a valid cut of {self.name}: {exc}; chain cuts are {sample}{more}"
            ) from None

    def cut_of(self, edge_nodes: Iterable[str]) -> Cut:
        """The cut that runs exactly these nodes on the edge (a DAG min-cut's device side).

        The set must be downward-closed: every producer of an input of an edge node is on
        the edge too, or is a constant. Constant nodes may be listed or not: both sides
        compute the constants they need. A set equal to a chain cut's gives that chain cut.
        """
        a = self._facts()
        names = list(dict.fromkeys(edge_nodes))
        shown = names[:4] + (["..."] if len(names) > 4 else [])
        prefix = f"edge nodes {shown} are not a valid cut of {self.name}"
        unknown = [n for n in names if n not in a.node_index]
        if unknown:
            raise GraphError(f"{prefix}: no node named {', '.join(map(repr, unknown[:5]))} exists in the model")
        edge = {a.node_index[n] for n in names} - a.constant_nodes
        nodes = self.model.graph.node
        for i in sorted(edge):
            for tensor in a.node_inputs[i]:
                j = a.producer.get(tensor)
                if j is not None and j not in edge and j not in a.constant_nodes:
                    raise GraphError(
                        f"{prefix}: node {nodes[i].name!r} is on the edge but reads {tensor!r} from "
                        f"{nodes[j].name!r}, which is not; the edge side must be downward-closed "
                        f"(add {nodes[j].name!r} or leave {nodes[i].name!r} out)"
                    )
        graph_inputs = set(self.inputs)
        cloud = [i for i in a.dynamic if i not in edge and i in a.live]
        crossing = frozenset(
            t for i in cloud for t in a.node_inputs[i] if t in graph_inputs or a.producer.get(t) in edge
        )
        kept = frozenset(o for o in self.outputs if o in graph_inputs or a.producer.get(o) in edge)
        chain = self._chain_cut(crossing, kept)
        if chain is not None:
            return chain
        try:
            return self._boundary_cut(crossing, kept)
        except _Refused as exc:
            raise GraphError(f"{prefix}: {exc}") from None

    def edge_nodes(self, cut: Cut) -> tuple[str, ...]:
        """The input-dependent nodes the edge runs for `cut`, in topological order."""
        edge, _ = _sides(self, cut)
        return tuple(self.model.graph.node[i].name for i in sorted(edge))

    def edge_param_bytes(self, cut: Cut) -> int:
        """Initializer bytes the edge's prefix model holds (each shared one once), for memory limits."""
        a = self._facts()
        _, used_inits, _ = _prefix_parts(self, cut)
        return sum(a.initializer_bytes[n] for n in used_inits)

    def boundary(self, tensor: str) -> ValueInfoProto:
        """The type (and shape, where known) ``tensor`` has as a sub-model's input or output."""
        return _value_info(self, tensor, self.model.graph.input)

    def crossable(self, tensor: str) -> bool:
        """Whether `tensor` can be a sub-model boundary (a typed plain tensor), so it may cross a cut."""
        return tensor in self._facts().crossable

    def _chain_cut(self, wanted: frozenset[str], kept: frozenset[str] | None) -> Cut | None:
        for cut in self.cuts:
            if frozenset(cut.tensors) == wanted and (kept is None or frozenset(cut.edge_outputs) == kept):
                return cut
        return None

    def _boundary_cut(self, wanted: frozenset[str], kept: frozenset[str] | None) -> Cut:
        """The general cut shipping `wanted` with edge outputs `kept` (None: inferred); _Refused says why not."""
        a = self._facts()
        nodes = self.model.graph.node
        graph_inputs = set(self.inputs)
        if not wanted:
            raise _Refused("nothing crosses (everything on one side is LOCAL, not a cut)")
        for t in sorted(wanted):
            if t in a.initializers or a.producer.get(t) in a.constant_nodes:
                raise _Refused(f"{t!r} is a constant: both sides compute it, so it never crosses")

        def cloud_cone(output: str) -> tuple[set[int], str | None]:
            """Nodes the cloud runs for `output` from the shipped tensors, or the input it lacks."""
            needed: set[int] = set()
            stack, seen = [output], set()
            while stack:
                name = stack.pop()
                if name in seen or name in wanted or name in a.initializers:
                    continue
                seen.add(name)
                if name in graph_inputs:
                    return needed, name
                i = a.producer[name]
                if i not in a.constant_nodes:
                    needed.add(i)
                    stack.extend(a.node_inputs[i])
            return needed, None

        cloud: set[int] = set()
        edge_outputs: set[str] = set()
        lacking: dict[str, str] = {}  # edge output -> the unshipped input that keeps it off the cloud
        for output in self.outputs:
            on_edge_anyway = output in wanted or output in graph_inputs
            if kept is not None and output not in kept:
                if on_edge_anyway:
                    raise _Refused(f"graph output {output!r} is on the edge already (shipped or an input), "
                                   "so it must be one of the edge outputs")
                needed, missing = cloud_cone(output)
                if missing is not None:
                    raise _Refused(f"the cloud cannot compute graph output {output!r}: it needs {missing!r}, "
                                   "which is not shipped")
                cloud |= needed
                continue
            if kept is None and not on_edge_anyway:
                needed, missing = cloud_cone(output)
                if missing is None:
                    cloud |= needed
                    continue
                lacking[output] = missing
            edge_outputs.add(output)
        if kept is not None and kept - set(self.outputs):
            raise _Refused(f"{sorted(kept - set(self.outputs))} are not graph outputs")

        # The edge runs what the shipped tensors and its outputs need, back to the graph inputs.
        edge: set[int] = set()
        stack = [(t, "") for t in sorted((wanted | edge_outputs) - graph_inputs)]
        seen: set[str] = set()
        while stack:
            name, reader = stack.pop()
            if name in seen or name in graph_inputs or name in a.initializers:
                continue
            seen.add(name)
            i = a.producer[name]
            if i in a.constant_nodes:
                continue
            if i in cloud:
                why = f"node {reader!r} must run on the edge but reads" if reader else "the edge must produce"
                raise _Refused(
                    f"{why} {name!r}, which {nodes[i].name!r} computes on the cloud side "
                    "(from the shipped tensors): the edge side would not be downward-closed"
                )
            edge.add(i)
            stack.extend((n, nodes[i].name) for n in a.node_inputs[i])

        read_by_cloud = {t for i in cloud for t in a.node_inputs[i]}
        unread = sorted(wanted - read_by_cloud)
        if unread:
            why = "".join(f"; the edge computes {o!r} itself, as it needs {m!r}, which is not shipped"
                          for o, m in lacking.items())
            raise _Refused(f"nothing on the cloud side reads {', '.join(map(repr, unread))}{why}")
        if not edge:
            raise _Refused("the edge side computes nothing (that is REMOTE, not a cut)")
        if len(edge_outputs) == len(self.outputs):
            raise _Refused("every graph output is computed on the edge (that is LOCAL, not a cut)")
        crossing = tuple(sorted(wanted, key=lambda t: _rank(self, t)))
        blocked = _uncrossable(crossing, a.types)
        if blocked:
            reason, detail = blocked
            raise _Refused(f"{_NO_CUT_LABELS[reason]} ({detail})")
        return Cut(
            index=0,
            tensors=crossing,
            passthrough=tuple(t for t in crossing if t in graph_inputs),
            edge_outputs=tuple(o for o in self.outputs if o in edge_outputs),
            nodes=tuple(nodes[i].name for i in sorted(edge)),
        )

    def _facts(self) -> _Analysis:
        if self._analysis is None:
            raise GraphError(f"{self.name} was not built by analyze(); call analyze(model) first")
        return self._analysis


# --------------------------------------------------------------------------- helpers


def _subgraphs(node: NodeProto) -> list[GraphProto]:
    graphs: list[GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _free_names(graph: GraphProto) -> list[str]:
    """Outer-scope names a subgraph reads (in first-use order), nested subgraphs included."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for node in graph.node for o in node.output if o}
    free: dict[str, None] = {}
    for node in graph.node:
        for name in (*node.input, *_implicit_inputs(node)):
            if name and name not in defined:
                free.setdefault(name)
    for out in graph.output:
        if out.name not in defined:
            free.setdefault(out.name)
    return list(free)


def _implicit_inputs(node: NodeProto) -> tuple[str, ...]:
    """Outer-scope names an If/Loop/Scan body uses: real inputs of the node for cutting."""
    explicit = set(node.input)
    names: dict[str, None] = {}
    for sub in _subgraphs(node):
        for name in _free_names(sub):
            if name not in explicit:
                names.setdefault(name)
    return tuple(names)


def _is_default_domain(node: NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _known(t: TypeProto | None) -> bool:
    if t is None or t.WhichOneof("value") is None:
        return False
    if t.WhichOneof("value") == "tensor_type":
        return t.tensor_type.elem_type != TensorProto.UNDEFINED
    return True


def itemsize(elem_type: int, *, unknown: float = 0.0) -> float:
    """Bytes per element of an ONNX element type (0.5 for 4-bit types);
    ``unknown`` for types numpy cannot name."""
    if elem_type in _HALF_BYTE_TYPES:
        return 0.5
    if elem_type == TensorProto.STRING:
        return 0.0
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return unknown


def _tensor_bytes(t: TensorProto) -> int:
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    if t.raw_data:
        return len(t.raw_data)
    return math.ceil(math.prod(t.dims) * itemsize(t.data_type))


def _static_bytes(t: TypeProto | None) -> float | None:
    """Bytes of a tensor type with a fully static shape, else None."""
    if not _known(t) or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return math.prod(d.dim_value for d in dims) * itemsize(t.tensor_type.elem_type)


def _grows(before: TypeProto | None, after: TypeProto | None) -> bool:
    """True if the follower's output is known to be bigger than its input (broadcast, widening Cast)."""
    b, a = _static_bytes(before), _static_bytes(after)
    if a is not None and b is not None:
        return a > b
    if _known(before) and _known(after) and before.WhichOneof("value") == after.WhichOneof("value") == "tensor_type":
        # Symbolic shapes: same dims means only the element type can change the size.
        db, da = before.tensor_type.shape.dim, after.tensor_type.shape.dim
        if before.tensor_type.HasField("shape") and after.tensor_type.HasField("shape") and list(db) == list(da):
            return itemsize(after.tensor_type.elem_type) > itemsize(before.tensor_type.elem_type)
    return False


# --------------------------------------------------------------------------- normalisation


def _normalise(model: ModelProto) -> ModelProto:
    """Copy with unique node names and a deterministic topological order."""
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = [NodeProto() for _ in graph.node]
    for copy, node in zip(nodes, graph.node):
        copy.CopyFrom(node)

    taken = {n.name for n in nodes if n.name}
    used: set[str] = set()
    for i, node in enumerate(nodes):
        if not node.name or node.name in used:
            base = candidate = f"{node.op_type}_{i}"
            k = 1
            while candidate in taken or candidate in used:
                candidate, k = f"{base}_{k}", k + 1
            node.name = candidate
            taken.add(candidate)
        used.add(node.name)

    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available |= {t.values.name for t in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for o in node.output:
            if not o:
                continue
            if o in producer or o in available:
                raise GraphError(
                    f"tensor {o!r} is defined twice (by node {node.name!r} and earlier); the graph is not valid SSA"
                )
            producer[o] = i

    deps: list[set[int]] = []
    for node in nodes:
        mine: set[int] = set()
        for name in (*node.input, *_implicit_inputs(node)):
            if not name:
                continue
            if name in producer:
                mine.add(producer[name])
            elif name not in available:
                raise GraphError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r}, which no node, input or initializer provides"
                )
        deps.append(mine)
    for out_vi in graph.output:
        if out_vi.name not in producer and out_vi.name not in available:
            raise GraphError(f"graph output {out_vi.name!r} is produced by nothing")

    # Kahn's algorithm; among ready nodes the one earliest in the file goes first.
    users: list[list[int]] = [[] for _ in nodes]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name for i in range(len(nodes)) if pending[i] > 0][:5]
        raise GraphError(f"the graph has a cycle through nodes {stuck}")

    graph.ClearField("node")
    graph.node.extend(nodes[i] for i in order)
    return out


def _value_types(model: ModelProto) -> dict[str, TypeProto]:
    """Best known type of every value: declared types first, then shape inference."""
    inferred: ModelProto | None = None
    for data_prop in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
            break
        except Exception as exc:  # noqa: BLE001 -- any inference failure just means fewer known types
            logger.debug("shape inference (data_prop=%s) failed: %s", data_prop, exc)
    sources: list[Iterable[ValueInfoProto]] = [model.graph.input, model.graph.output, model.graph.value_info]
    if inferred is not None:
        sources += [inferred.graph.value_info, inferred.graph.output]
    types: dict[str, TypeProto] = {}
    for source in sources:
        for vi in source:
            if _known(vi.type) and not _known(types.get(vi.name)):
                types[vi.name] = vi.type
            elif vi.name not in types and vi.type.WhichOneof("value") is not None:
                types[vi.name] = vi.type
    return types


# --------------------------------------------------------------------------- analysis


def analyze(model: onnx.ModelProto, name: str = "") -> ModelGraph:
    """Find every useful cut of `model`; GraphError says why when there is none."""
    name = name or model.graph.name or "model"
    norm = _normalise(model)
    graph = norm.graph
    nodes = list(graph.node)
    initializers = frozenset({t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer})
    inputs = tuple(v.name for v in graph.input if v.name not in initializers)
    outputs = tuple(v.name for v in graph.output)
    node_inputs = tuple(
        tuple(dict.fromkeys(n for n in (*node.input, *_implicit_inputs(node)) if n)) for node in nodes
    )
    producer = {o: i for i, node in enumerate(nodes) for o in node.output if o}
    types = _value_types(norm)

    constant_values = set(initializers)
    constant_nodes: set[int] = set()
    for i, node in enumerate(nodes):
        random = _is_default_domain(node) and node.op_type in _NONDETERMINISTIC_OPS
        if not random and all(n in constant_values for n in node_inputs[i]):
            constant_nodes.add(i)
            constant_values.update(o for o in node.output if o)
    dynamic = tuple(i for i in range(len(nodes)) if i not in constant_nodes)
    if len(dynamic) < 2:
        what = "no node" if not dynamic else f"only one node ({nodes[dynamic[0]].name!r}, {nodes[dynamic[0]].op_type})"
        raise GraphError(f"{name} cannot be cut: {what} depends on the graph inputs; a cut needs at least two")

    kept, reasons = _scan_positions(
        nodes, dynamic, node_inputs, inputs=inputs, outputs=outputs, constant_values=constant_values, types=types,
    )
    if not kept:
        raise GraphError(f"{name} cannot be cut: {_why_no_cut(reasons)}")

    bounds = [0, *(p for p, _ in kept), len(dynamic)]
    segment_of = {dynamic[q]: s for s in range(len(bounds) - 1) for q in range(bounds[s], bounds[s + 1])}
    consumers: dict[str, list[int]] = {}
    for i, ins in enumerate(node_inputs):
        for n in ins:
            consumers.setdefault(n, []).append(i)
    last_segment = len(bounds) - 2
    for i in sorted(constant_nodes, reverse=True):
        # A constant node goes with its first user; users come later in topological
        # order, so walking backwards sees every user's segment first.
        users = [segment_of[u] for o in nodes[i].output if o for u in consumers.get(o, [])]
        segment_of[i] = min(users, default=last_segment)
    segments: list[list[str]] = [[] for _ in range(last_segment + 1)]
    segment_inits: list[set[str]] = [set() for _ in segments]
    for i, node in enumerate(nodes):
        segments[segment_of[i]].append(node.name)
        segment_inits[segment_of[i]].update(n for n in node_inputs[i] if n in initializers)
    init_bytes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    init_bytes |= {t.values.name: _tensor_bytes(t.values) + _tensor_bytes(t.indices) for t in graph.sparse_initializer}

    logger.debug("%s: %d input-dependent nodes, %d cuts", name, len(dynamic), len(kept))
    return ModelGraph(
        model=norm,
        inputs=inputs,
        outputs=outputs,
        segments=tuple(tuple(s) for s in segments),
        cuts=tuple(c for _, c in kept),
        segment_param_bytes=tuple(sum(init_bytes[n] for n in sorted(s)) for s in segment_inits),
        name=name,
        _analysis=_Analysis(
            node_inputs=node_inputs,
            producer=producer,
            constant_nodes=frozenset(constant_nodes),
            initializers=initializers,
            types=types,
            dynamic=dynamic,
            cut_positions=tuple(p for p, _ in kept),
            node_index={node.name: i for i, node in enumerate(nodes)},
            consumers={t: tuple(users) for t, users in consumers.items()},
            live=_ancestors(outputs, producer, node_inputs),
            initializer_bytes=init_bytes,
            crossable=frozenset(t for t in (*inputs, *producer) if _uncrossable((t,), types) is None),
        ),
    )


def _ancestors(names: Iterable[str], producer: dict[str, int], node_inputs: Sequence[Sequence[str]]) -> frozenset[int]:
    """Nodes that the given tensors depend on (their producers, transitively)."""
    found: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(producer[n] for n in node_inputs[i] if n in producer)
    return frozenset(found)


def _scan_positions(
    nodes: Sequence[NodeProto], dynamic: Sequence[int], node_inputs: Sequence[Sequence[str]], *,
    inputs: Sequence[str], outputs: Sequence[str], constant_values: set[str], types: dict[str, TypeProto],
) -> tuple[list[tuple[int, Cut]], dict[str, list[str]]]:
    """Walk the positions between input-dependent nodes; keep the useful ones as (position, Cut).

    Position p splits `dynamic` into [:p] (edge) and [p:] (cloud). Also returns, per
    reason, the positions dropped, so a model with no cut gets a precise message.
    """
    # Where each value is last read by an input-dependent node, and its shipping order
    # (graph inputs first, then by producer position and output slot).
    last_use: dict[str, int] = {}
    for p, i in enumerate(dynamic):
        for n in node_inputs[i]:
            if n not in constant_values:
                last_use[n] = p
    rank = {n: (-1, k) for k, n in enumerate(inputs)}
    for p, i in enumerate(dynamic):
        for k, o in enumerate(nodes[i].output):
            if o:
                rank[o] = (p, k)
    output_set = set(outputs)

    live = {n for n in inputs if n in last_use}
    edge_outputs = {o for o in outputs if o in inputs}
    reasons: dict[str, list[str]] = {"empty": [], "non-tensor": [], "untyped": [], "follower": [], "idle": []}
    kept: list[tuple[int, Cut]] = []
    for p in range(1, len(dynamic)):
        before, after = nodes[dynamic[p - 1]], nodes[dynamic[p]]
        live |= {o for o in before.output if o in last_use}
        live = {n for n in live if last_use[n] >= p}
        edge_outputs |= {o for o in before.output if o in output_set}
        crossing = tuple(sorted(live, key=rank.__getitem__))
        where = f"before {after.name!r}"
        if not crossing:
            reasons["empty"].append(where)
            continue
        blocked = _uncrossable(crossing, types)
        if blocked:
            reason, detail = blocked
            reasons[reason].append(f"{where} ({detail})")
            continue
        if _is_follower(after, crossing, p=p, last_use=last_use, constant_values=constant_values,
                        types=types, output_set=output_set):
            reasons["follower"].append(where)
            continue
        passthrough = tuple(n for n in crossing if n in inputs)
        kept_outputs = tuple(o for o in outputs if o in edge_outputs)
        if (len(passthrough) == len(crossing) and not kept_outputs) or len(kept_outputs) == len(outputs):
            reasons["idle"].append(where)
            continue
        kept.append((p, Cut(len(kept) + 1, crossing, passthrough, kept_outputs)))
    return kept, reasons


def _is_follower(
    node: NodeProto, crossing: Sequence[str], *, p: int, last_use: dict[str, int], constant_values: set[str],
    types: dict[str, TypeProto], output_set: set[str],
) -> bool:
    """Cutting before `node` can never ship fewer bytes than cutting right after it."""
    if len(crossing) != 1 or not _is_default_domain(node):
        return False
    (tensor,) = crossing
    if node.op_type in _FOLLOWER_OPS:
        if not node.input or node.input[0] != tensor:
            return False
    elif node.op_type in _BINARY_FOLLOWER_OPS:
        if len(node.input) != 2 or tensor not in node.input:
            return False
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other not in constant_values:
            return False
    else:
        return False
    if last_use.get(tensor) != p:
        return False  # the tensor is read later too, so after the follower two tensors would cross
    used = [o for o in node.output if o and (last_use.get(o, -1) > p or o in output_set)]
    if any(o != node.output[0] for o in used):
        return False  # e.g. a Dropout mask or BN training statistics that are read later
    return not _grows(types.get(tensor), types.get(node.output[0]))


def _uncrossable(crossing: Sequence[str], types: dict[str, TypeProto]) -> tuple[str, str] | None:
    """("non-tensor" | "untyped", detail) if some tensor cannot be a sub-model boundary, else None."""
    odd = [(n, types[n].WhichOneof("value").removesuffix("_type").replace("_", " ")) for n in crossing
           if n in types and types[n].WhichOneof("value") not in (None, "tensor_type")]
    if odd:
        return "non-tensor", ", ".join(f"{n!r} is a {kind}" for n, kind in odd)
    untyped = [n for n in crossing if not _known(types.get(n))]
    if untyped:
        return "untyped", repr(untyped[0])
    return None


_NO_CUT_LABELS = {
    "empty": "nothing crosses (disconnected parts)",
    "non-tensor": "a non-tensor value (sequence/map/optional/sparse) would cross",
    "untyped": "shape inference cannot type a crossing tensor (e.g. a custom-domain op's output), "
               "so no sub-model can declare it",
    "follower": "the next node is an element-wise follower of the single crossing tensor "
                "(cutting after it is never worse)",
    "idle": "the edge side would produce nothing the cloud side or the caller uses",
}


def _why_no_cut(reasons: dict[str, list[str]]) -> str:
    parts = []
    for key, label in _NO_CUT_LABELS.items():
        if reasons[key]:
            shown = ", ".join(reasons[key][:3]) + (" ..." if len(reasons[key]) > 3 else "")
            parts.append(f"{len(reasons[key])} position(s) where {label}: {shown}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- extraction


def _position(graph: ModelGraph, cut: Cut) -> int:
    if not 1 <= cut.index <= len(graph.cuts) or graph.cuts[cut.index - 1] != cut:
        raise GraphError(f"cut {cut.index} with tensors {list(cut.tensors)} does not belong to {graph.name}")
    return graph._facts().cut_positions[cut.index - 1]


def _rank(graph: ModelGraph, tensor: str) -> tuple[int, int]:
    """Shipping order: graph inputs first, then by producer (topological) and output slot."""
    if tensor in graph.inputs:
        return -1, graph.inputs.index(tensor)
    i = graph._facts().producer[tensor]
    return i, list(graph.model.graph.node[i].output).index(tensor)


def _sides(graph: ModelGraph, cut: Cut) -> tuple[set[int], set[int]]:
    """Input-dependent node indices on the edge and on the cloud side of `cut`."""
    a = graph._facts()
    if cut.index:
        p = _position(graph, cut)
        return set(a.dynamic[:p]), set(a.dynamic[p:])
    try:
        same = graph._boundary_cut(frozenset(cut.tensors), frozenset(cut.edge_outputs)) == cut
    except _Refused:
        same = False
    if not same:
        raise GraphError(f"general cut {cut.key} with tensors {list(cut.tensors)} does not belong to {graph.name}")
    edge = {a.node_index[n] for n in cut.nodes}
    return edge, set(a.dynamic) - edge


def _prefix_parts(graph: ModelGraph, cut: Cut) -> tuple[list[int], set[str], list[str]]:
    """The prefix's nodes, initializers and graph inputs (see _collect)."""
    edge, _ = _sides(graph, cut)
    return _collect(graph, allowed=edge | graph._facts().constant_nodes, boundary=graph.inputs,
                    outputs=_prefix_outputs(cut))


def _prefix_outputs(cut: Cut) -> list[str]:
    return list(dict.fromkeys([*(t for t in cut.tensors if t not in cut.passthrough), *cut.edge_outputs]))


def _value_info(graph: ModelGraph, name: str, declared: Sequence[ValueInfoProto] = ()) -> ValueInfoProto:
    """ValueInfo for a sub-model boundary: the declared one, else the inferred type (shape if known)."""
    for vi in declared:
        if vi.name == name and _known(vi.type):
            out = ValueInfoProto()
            out.CopyFrom(vi)
            return out
    t = graph._facts().types.get(name)
    if not _known(t):
        raise GraphError(
            f"{graph.name}: the type of tensor {name!r} is unknown (shape inference could not infer it), "
            "so it cannot be a sub-model input or output; add a value_info entry for it to the model"
        )
    out = ValueInfoProto(name=name)
    out.type.CopyFrom(t)
    return out


def _collect(
    graph: ModelGraph, *, allowed: set[int], boundary: Sequence[str], outputs: Sequence[str],
) -> tuple[list[int], set[str], list[str]]:
    """Walk back from `outputs` to `boundary`: the nodes needed, initializers used, graph inputs read."""
    a = graph._facts()
    boundary_set = set(boundary)
    needed: set[int] = set()
    used_inits: set[str] = set()
    inputs_read: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in boundary_set:
            inputs_read.add(name)
        elif name in a.initializers:
            used_inits.add(name)
        elif name in a.producer:
            i = a.producer[name]
            if i not in allowed:
                raise GraphError(f"{graph.name}: {name!r} is produced on the other side of the cut")
            if i not in needed:
                needed.add(i)
                stack.extend(a.node_inputs[i])
        else:
            raise GraphError(f"{graph.name}: {name!r} is neither a boundary tensor nor produced by a node")
    return sorted(needed), used_inits, [n for n in boundary if n in inputs_read]


def _build(
    graph: ModelGraph, *, nodes: Sequence[int], used_inits: set[str], inputs: Sequence[str],
    outputs: Sequence[str], graph_name: str,
) -> ModelProto:
    """A stand-alone model over these nodes with the original opsets, IR version and functions."""
    src = graph.model.graph
    node_protos = [src.node[i] for i in nodes]
    produced = {o for n in node_protos for o in n.output if o}
    io_names = set(inputs) | set(outputs)
    value_info = [vi for vi in src.value_info if vi.name in produced and vi.name not in io_names]
    inits = [t for t in src.initializer if t.name in used_inits]
    sparse = [t for t in src.sparse_initializer if t.values.name in used_inits]
    input_infos = [_value_info(graph, n, src.input) for n in inputs]
    if graph.model.ir_version < 4:
        # Before IR 4 every initializer had to be listed as a graph input too.
        input_infos += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    sub = helper.make_graph(
        node_protos, graph_name, input_infos,
        [_value_info(graph, n, src.output) for n in outputs],
        initializer=inits, value_info=value_info, sparse_initializer=sparse,
    )
    model = helper.make_model(
        sub, opset_imports=list(graph.model.opset_import), functions=list(graph.model.functions),
        producer_name=graph.model.producer_name, producer_version=graph.model.producer_version,
        domain=graph.model.domain, model_version=graph.model.model_version,
    )
    model.ir_version = graph.model.ir_version
    model.metadata_props.extend(graph.model.metadata_props)
    return model


def prefix_model(graph: ModelGraph, cut: Cut) -> onnx.ModelProto:
    """The edge side: from the graph inputs it needs to the shipped tensors and the edge outputs."""
    nodes, used_inits, read = _prefix_parts(graph, cut)
    return _build(
        graph, nodes=nodes, used_inits=used_inits, inputs=read, outputs=_prefix_outputs(cut),
        graph_name=f"{graph.model.graph.name}_prefix{cut.key}",
    )


def suffix_model(graph: ModelGraph, cut: Cut) -> onnx.ModelProto:
    """The cloud side: from exactly `cut.tensors` to the graph outputs the edge did not produce."""
    _, cloud = _sides(graph, cut)
    outputs = [o for o in graph.outputs if o not in cut.edge_outputs]
    nodes, used_inits, _ = _collect(
        graph, allowed=cloud | graph._facts().constant_nodes, boundary=cut.tensors, outputs=outputs,
    )
    return _build(
        graph, nodes=nodes, used_inits=used_inits, inputs=cut.tensors, outputs=outputs,
        graph_name=f"{graph.model.graph.name}_suffix{cut.key}",
    )


def expose_tensors(graph: ModelGraph, names: Iterable[str]) -> onnx.ModelProto:
    """The whole model with these tensors added as graph outputs, to measure their real sizes."""
    model = ModelProto()
    model.CopyFrom(graph.model)
    present = {o.name for o in model.graph.output}
    known = set(graph.inputs) | set(graph._facts().producer) | set(graph._facts().initializers)
    for name in dict.fromkeys(names):
        if name in present:
            continue
        if name not in known:
            raise GraphError(f"{graph.name} has no tensor named {name!r}")
        model.graph.output.append(_value_info(graph, name, graph.model.graph.input))
        present.add(name)
    return model
