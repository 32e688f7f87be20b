"""EdgeAgent gRPC service: plan each request, run it, fall back, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc
import numpy as np
from opentelemetry.trace import SpanKind

from devices.power_fit import PowerFigures
from edge_agent.generation import KIND, Generation, Generator
from edge_agent.offload import CloudNodeClient, NodeFailed
from edge_agent.power import with_figures
from partitioner.calibration import Calibration
from partitioner.connectivity import cloud_state
from partitioner.costmodel import (
    Candidate,
    CloudOption,
    CodecOption,
    DagCut,
    Link,
    ModelCosts,
    Objective,
    Power,
    StagePrediction,
)
from partitioner.dag_plan import best_cut, branches, node_times, price, terms
from partitioner.graph import Cut
from partitioner.hysteresis import hold_or_switch, share_load
from partitioner.plan_table import Calibrated, Decisions, NodeNow, NodeSegments, PlanTable, QuickDecision
from partitioner.planning import (
    AtShape,
    CodecErrors,
    CodecSpeed,
    cloud_budget_s,
    codec_limits,
    model_costs,
    queue_wait_ms,
)
from partitioner.policy import Policy, PolicySet
from partitioner.profile import ModelProfile
from partitioner.shapes import ShapeError, check_every_input, key_of
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import tracing
from runtimes.admission import Admission, Holding, LiveTraffic, MemoryBudget, Overloaded, large, run_cancellable
from runtimes.heap import Trimmer
from runtimes.llm_serving import operation_of, relay
from runtimes.metrics import Metrics
from runtimes.model_store import ModelStore, decode_all
from runtimes.onnx_exec import BadReply, InputError, OnnxModel
from runtimes.profile_book import ProfileBook, Unplanned, shape_specs
from runtimes.rpc import APP_STREAM_WINDOW_BYTES, NoFeasiblePlan, NoNodeLeft, Unread, abort_for
from runtimes.shared_memory import Lease, SharedMemory, peer_is_local

logger = logging.getLogger(__name__)

# What a request holds while it runs, per byte of it on the wire: the message,
# its parsed copy, the payload bytes its arrays view and onnxruntime's
# activations (allocated afresh for a large request, its arena being shrunk
# after each: admission.SHRINK_ARENA_ABOVE_BYTES). With 3, a flood of 27.6 MiB
# resnet requests under a 256 MiB budget peaked up to 311 MiB above the agent's
# idle RSS; with 5, 148-151 MiB in 3 runs (python -m bench.memory).
RUNNING_BYTES_PER_REQUEST_BYTE = 5
SHARED_ALIGNMENT = 64  # where each output starts in an app's output region: a cache line, as numpy and onnxruntime align
QUEUED_CALL_BYTES = APP_STREAM_WINDOW_BYTES  # a call waiting unread: what the server buffers of it
EXPECTED_DECAY = 0.8  # per request: one large request sets the room the next ones wait for, for a few

OBJECTIVES = {
    pb.OBJECTIVE_LATENCY: Objective.LATENCY,
    pb.OBJECTIVE_ENERGY: Objective.ENERGY,
    pb.OBJECTIVE_WEIGHTED: Objective.WEIGHTED,
}
OBJECTIVE_TO_PB = {v: k for k, v in OBJECTIVES.items()}
OBJECTIVE_BY_NAME = {objective.value: code for code, objective in OBJECTIVES.items()}  # as HTTP bodies and OIP parameters name them
KINDS = {"local": pb.PLAN_LOCAL, "split": pb.PLAN_SPLIT, "remote": pb.PLAN_REMOTE}
ENCODINGS = (pb.ENCODING_RAW, pb.ENCODING_FP16, pb.ENCODING_INT8)
LOSSY_ENCODINGS = (pb.ENCODING_FP16, pb.ENCODING_INT8)
ENCODING_NAMES = {pb.ENCODING_RAW: "raw", pb.ENCODING_FP16: "fp16", pb.ENCODING_INT8: "int8"}
ENCODING_BY_LABEL = {name: value for value, name in ENCODING_NAMES.items()}

# Below this much time left before the caller's deadline, a cloud attempt is
# not worth starting: there would be no time left to fall back.
MIN_CLOUD_BUDGET_S = 0.005
# Nodes one request may try before it finishes on the device: the planned one
# and the next best, so a node that vanishes costs one retry, never the request.
NODE_ATTEMPTS = 2
# A call to a node runs this many times its predicted network and cloud time
# before the agent asks whether the node still answers (CloudNodeClient.unless_hung).
WATCH_FACTOR = 3.0


# Longer than any plan label explain shows (a DAG cut key and a node address).
MAX_PLAN_CHARS = 256


class PlanError(InputError):
    """A pinned plan that does not exist for this model."""


@dataclass
class Stages:
    """Measured time per stage of one request, ms."""

    edge_ms: float = 0.0
    encode_ms: float = 0.0
    network_ms: float = 0.0   # after a fallback: the time lost on the failed cloud attempt
    cloud_ms: float = 0.0
    decode_ms: float = 0.0
    plan_ms: float = 0.0      # choosing the plan (part of no other stage)
    cold: bool = False        # a session was built on the way: a one-off, not the device's speed
    sent: tuple[tuple[str, int], ...] = ()  # (tensor, encoding applied) of what went to the node


@dataclass
class Ask:
    """One tensor request, whatever protocol brought it. ``feeds`` decodes
    its tensors for the model, once that is known to exist."""

    model: str
    feeds: Callable[[OnnxModel], dict[str, np.ndarray]]
    plan: str = ""
    objective: int = pb.OBJECTIVE_UNSPECIFIED
    encoding: int = pb.ENCODING_UNSPECIFIED


def tandem_ask(request: pb.InferRequest, lease: Lease) -> Ask:
    """Tandem's own Infer as an ``Ask``; tensors in shared memory are read out of the app's region."""
    if request.HasField("output_region"):  # held from now on, so it cannot go before the reply is written
        region = request.output_region
        lease.take(region.region, region.offset, region.byte_size, "the output region")

    def read_shared(tensor: pb.Tensor) -> np.ndarray:
        return lease.read(tensor.shared.region, tensor.shared.offset, tensor.shared.byte_size, f"input '{tensor.name}'")

    return Ask(request.model, lambda model: decode_all(request.inputs, read_shared), request.plan, request.objective,
               request.encoding)


def reply_tensors(outputs: dict[str, np.ndarray], region: pb.SharedBytes | None, lease: Lease) -> list[pb.Tensor]:
    """The outputs written into the app's region where they fit, in order at
    ``SHARED_ALIGNMENT``, and the rest inline (raw)."""
    tensors, end = [], 0
    for name, array in outputs.items():
        start = -(-end // SHARED_ALIGNMENT) * SHARED_ALIGNMENT
        if region is None or start + array.nbytes > region.byte_size:
            tensors.append(codec.encode(array, name, pb.ENCODING_RAW))
            continue
        lease.write(region.region, region.offset + start, array.nbytes, array, f"output '{name}'")
        tensors.append(pb.Tensor(name=name, dtype=codec.dtype_to_pb(array.dtype), shape=array.shape,
                                 encoding=pb.ENCODING_RAW, shared=pb.SharedBytes(
                                     region=region.region, offset=region.offset + start, byte_size=array.nbytes)))
        end = start + array.nbytes
    return tensors


def stage_times(stages: Stages | StagePrediction, total_ms: float, plan_ms: float = 0.0) -> pb.StageTimes:
    return pb.StageTimes(edge_ms=stages.edge_ms, encode_ms=stages.encode_ms, network_ms=stages.network_ms,
                         cloud_ms=stages.cloud_ms, decode_ms=stages.decode_ms, total_ms=total_ms, plan_ms=plan_ms)


def fallback_kind(reason: str) -> str:
    """A few stable label values for the fallback counter (the reason itself is logged)."""
    for status in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        if status in reason:
            return status.lower()
    if "deadline leaves" in reason:
        return "no_time"
    if "none is reachable" in reason or "no node" in reason:
        return "no_node"
    return "other"


# DAG cuts are recomputed when a figure they depend on moves by more than this
# factor (10 %): below it the same cut wins, and solving per request would cost
# more than the inference on large graphs.
DAG_RECOMPUTE_STEP = 1.1
# DAG cuts remembered for running and pinning (the cached decisions name them).
MAX_GENERAL_CUTS = 512


def _bucket(value: float) -> int:
    return round(math.log(max(value, 1e-12)) / math.log(DAG_RECOMPUTE_STEP))


@dataclass(frozen=True)
class _Table:
    """A model's PlanTable and what it was built from (checked by identity on each request)."""

    plans: PlanTable
    profiles: dict[str, ModelProfile]    # node -> the published profile its row came from
    errors: CodecErrors | None           # the codec errors its codec options came from
    service_ms: dict[str, float]         # node -> its whole-model time at these shapes (queue estimates)
    cuts: dict[str, frozenset[int] | None]  # node -> the chain cuts it offers (None: any)


@dataclass(frozen=True)
class _Standing:
    """The last decision made on a table, reused (refreshed) while it stands (QuickDecision.stands)."""

    plans: PlanTable
    dags: Sequence[DagCut]
    power: Power
    decision: QuickDecision


class NotPlanned(Exception):
    """No profile can plan this request yet (see ProfileBook.view): it runs LOCAL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CloudFailed(RuntimeError):
    """A cloud call failed; the request continues locally."""


def plan_message(candidate: Candidate, cut: Cut | None, encoding: int) -> pb.Plan:
    """``encoding``: the decision's codec, unless the candidate chose its own."""
    return pb.Plan(kind=KINDS[candidate.kind], cut_index=candidate.k, cut=cut.tensors if cut else (),
                   node=candidate.node or "", label=candidate.label, output_error=candidate.output_error,
                   encoding=(candidate.encoding or encoding) if candidate.node else pb.ENCODING_UNSPECIFIED)


def parse_pinned(label: str) -> tuple[str, int | str | None, str]:
    """("local" | "remote" | "split", k or a DAG cut's key, node) from "local", "remote",
    "split:<k>" or "split:<key>" (a DAG cut explain showed), each optionally "@HOST:PORT"."""
    if len(label) > MAX_PLAN_CHARS:
        raise PlanError(f"a plan of {len(label):,} characters: plans are at most {MAX_PLAN_CHARS}")
    wanted, _, node = label.strip().partition("@")
    kind, _, index = wanted.partition(":")
    dag_key = index.startswith("g") and len(index) > 1 and all(ch in "0123456789abcdef" for ch in index[1:])
    chain_cut = index.isascii() and index.isdigit()  # str.isdigit alone admits "²", which int() refuses
    if kind not in KINDS or (kind == "split") != (chain_cut or dag_key) or (kind != "split" and index):
        raise PlanError(f"plan {label!r} is not one of 'local', 'remote', 'split:<k>', 'split:<DAG cut key>' "
                        "(optionally '@HOST:PORT')")
    return kind, (int(index) if chain_cut else index) if index else None, node


def split_codec(plan: str, encoding: int) -> tuple[str, int]:
    """A pinned label as explain shows it ("split:5+int8") as the plan and the
    codec it pins; a codec named both ways must agree."""
    base, plus, name = plan.partition("+")
    if not plus:
        return plan, encoding
    node = ""
    if "@" in name:
        name, _, node = name.partition("@")
    codec_value = ENCODING_BY_LABEL.get(name)
    if codec_value is None:
        raise PlanError(f"plan {plan!r}: {name!r} is not a codec; use raw, fp16 or int8")
    if encoding and encoding != codec_value:
        raise PlanError(f"plan {plan!r} pins {name}, the request asks for encoding {encoding}")
    return base + (f"@{node}" if node else ""), codec_value


def find_pinned(decision: Decisions, kind: str, k: int | str | None, node: str) -> Candidate | None:
    """The pinned plan on its best node (any node unless ``node`` names one)."""
    return min(decision.matching(kind, k, node), key=lambda c: (c.hard_violation, c.score), default=None)


def request_options(objective: int, encoding: int, policy: Policy) -> tuple[Objective, int, bool]:
    """The request's objective and codec, the policy's where unspecified, and
    whether the codec is chosen per plan (the policy sets an error budget and
    the request names no codec: the base codec is then raw)."""
    if objective and objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective}; use latency, energy or weighted")
    if encoding and encoding not in ENCODINGS:
        raise InputError(f"unknown encoding {encoding}; use raw, fp16 or int8")
    adaptive = not encoding and policy.max_output_error is not None
    return OBJECTIVES.get(objective, policy.objective), pb.ENCODING_RAW if adaptive else encoding or policy.encoding, adaptive


def encode_all(tensors: dict[str, np.ndarray], encoding: int) -> list[pb.Tensor]:
    return [codec.encode(array, name, encoding) for name, array in tensors.items()]


class EdgeAgentService(pb_grpc.EdgeAgentServicer):
    def __init__(self, *, store: ModelStore, book: ProfileBook, nodes: list[CloudNodeClient],
                 power: Power, metrics: Metrics, power_figures: PowerFigures, device_name: str, codec_speed: dict[int, CodecSpeed], policies: PolicySet,
                 max_concurrency: int, max_queue: int, generator: Generator, memory_bytes: int) -> None:
        self.store = store
        self.regions = SharedMemory()  # what apps on this board registered, for Infer and OIP alike
        self.deliveries = None  # the deferred queue (edge_agent.delivery.Deliveries), set once the service exists
        self.cloud = cloud_state([])  # online, degraded or offline, judged after each refresh of the nodes
        self.generator = generator
        self.book = book
        self.nodes = nodes
        self.power = power
        self.metrics = metrics
        self.power_figures = power_figures
        self.device_name = device_name
        self.codec_speed = codec_speed
        self.policies = policies
        self.trimmer = Trimmer()
        self.admission = Admission(max_concurrency=max_concurrency, max_queue=max_queue,
                                   on_idle=lambda: self.trimmer.when_idle(self.admission.idle))
        self.memory = MemoryBudget(memory_bytes, retry_after_ms=lambda: self.admission.hold_ms)
        self.traffic = LiveTraffic()  # apps' requests, which the deferred queue's drain yields to
        self._expected_running_bytes = 0  # what the recent requests held running, decaying
        metrics.set_queue("onnx", lambda: self.admission.queued)
        metrics.watch_llms(generator.llms.engines)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="edge-compute")
        self._costs: dict[tuple[str, int, str, str], ModelCosts] = {}  # profiles are immutable: build once per shape
        self._tables: dict[tuple, _Table] = {}  # what planning needs that no request changes, per model, shape and policy
        self._standing: dict[tuple, _Standing] = {}  # per table, objective and held plan
        self._current: dict[tuple[str, Objective, int, bool], str] = {}  # plan label per model/objective/codec/adaptive
        self._branchy: dict[str, bool] = {}  # model -> its graph branches (a chain has no DAG cut worth solving)
        self._dag_cache: dict[tuple, list[DagCut]] = {}  # priced min-cuts per model, shape, nodes and rounded figures
        self._dag_last: dict[str, tuple] = {}  # per model: (table, figures, cuts) of its last request
        # (model, cut key) -> a DAG cut planned before, least recently used first
        self._general_cuts: OrderedDict[tuple[str, str], Cut] = OrderedDict()
        # What completed requests taught about each profile: per model and shape bucket,
        # since profiles err differently (a global factor learned on one model, or at one
        # shape, mispredicted the others).
        self._calibration: dict[tuple, Calibration] = {}

    # ------------------------------------------------------------ planning --

    def _model_costs(self, model: OnnxModel, encoding: int, view: AtShape, shapes: dict[str, tuple[int, ...]]) -> ModelCosts:
        # the measured profile it came from (a rescaled view's crossings hold the request's shapes)
        key = (model.name, encoding, key_of(shapes), view.basis, view.method)
        if key not in self._costs:
            if len(self._costs) > 256:  # request sizes vary: keep the cache bounded
                self._costs.clear()
            self._costs[key] = model_costs(view.profile, encoding=encoding, speed=self.codec_speed[encoding],
                                           output_encoding=pb.ENCODING_RAW, scale=view.bytes_scale)
        return self._costs[key]

    def calibration(self, model: OnnxModel, shapes: dict[str, tuple[int, ...]]) -> Calibration:
        return self._calibration.get(self._calibration_key(model, shapes)) or Calibration()

    def _calibration_key(self, model: OnnxModel, shapes: dict[str, tuple[int, ...]]) -> tuple:
        return model.name, self.book.bucket_of(model, shapes)

    def _cut(self, model: OnnxModel, candidate: Candidate) -> Cut | None:
        """The cut a SPLIT candidate runs: a chain cut by index, a DAG cut by the key it was planned under."""
        if candidate.kind != "split":
            return None
        if candidate.cut_key:
            self._general_cuts.move_to_end((model.name, candidate.cut_key))
            return self._general_cuts[(model.name, candidate.cut_key)]
        return model.cut(candidate.k)

    def _plan(self, candidate: Candidate, model: OnnxModel, encoding: int) -> pb.Plan:
        return plan_message(candidate, self._cut(model, candidate), encoding)

    def _planned_nodes(self, policy: Policy) -> list[CloudNodeClient]:
        """The policy's preferred nodes while one is reachable, else every node."""
        preferred = [n for n in self.nodes if n.address in policy.preferred_nodes and n.state.reachable]
        return preferred or self.nodes

    def default_shapes(self, model: OnnxModel) -> dict[str, tuple[int, ...]]:
        """What explain plans for when the caller names no shape: the first profiled one."""
        profiled = self.book.profiled(model.name)
        if not profiled:
            raise NotPlanned(self.book.unavailable(model.name) or f"{model.name} is being profiled")
        return profiled[0].choice.as_dict()

    def decide(self, model: OnnxModel, objective: Objective, encoding: int, *, shapes: dict[str, tuple[int, ...]],
               link: Link | None = None, learn: bool = True, nearest_ok: bool = False,
               adaptive: bool = False, pinned: str = "", current: str | None = None,
               calibration: Calibration | None = None, reuse: bool = False) -> tuple[QuickDecision, ModelCosts]:
        """The decision for a request of these input shapes, priced at
        ``calibration``, and the model's costs it was made from (as profiled,
        before calibration); NotPlanned when no profile can plan it yet (the
        request then runs LOCAL).
        ``nearest_ok``: plan from the nearest measured shape rather than not at all.
        ``adaptive``: the codec is chosen per plan within the policy's
        max_output_error (``encoding`` is then raw, the lossless base).
        ``calibration``: the one the caller looked up (default: this model's and shape's now).
        ``reuse``: the last decision on these costs stands while nothing moved
        enough to change it (QuickDecision.stands): then nothing is scored, and
        only the candidates asked for are priced at the request's inputs.

        Per request this is O(nodes) Python and whole-array numpy over the
        cuts: what only a new profile, codec figure or policy changes is in a
        PlanTable built once (see partitioner.plan_table)."""
        view = self.book.view(model, shapes, learn=learn, nearest_ok=nearest_ok)
        if isinstance(view, Unplanned):
            raise NotPlanned(view.reason)
        policy = self.policies.for_model(model.name)
        calibration = calibration or self.calibration(model, shapes)
        # Least busy (then least recently used) first: among nodes predicted
        # equal the first wins, so equal nodes take turns.
        planned = sorted((n for n in self._planned_nodes(policy) if n.state.reachable), key=lambda n: (n.inflight, n.last_sent))
        published = [(node, node.profile(model.name, model.digest)) for node in planned]
        table = self._plan_table(model, encoding, view, shapes, policy, adaptive, published,
                                 {node.address: node.offered_cuts(model.name) for node, _ in published})
        nodes = []
        for node, profile in published:
            service_ms = table.service_ms.get(node.address)
            if profile is None or service_ms is None:  # no profile of this copy, or of another segmentation
                continue
            load = node.state.load
            queue_ms = queue_wait_ms(reported_ms=load.queue_delay_ms, in_flight=node.inflight,
                                     capacity=load.max_concurrency, service_ms=service_ms)
            nodes.append(NodeNow(node.address, link or node.link, queue_ms))
        held = current.partition("+")[0] if current and current.startswith("split:g") else ""
        dags = self._dag_cuts(model, shapes, table.plans, calibration, nodes, objective, policy, encoding, pinned or held) \
            if policy.dag_cuts and nodes else ()
        calibrated = Calibrated(calibration.edge_factor, calibration.offload_ms, calibration.request_ms)
        # per DAG cuts too: rounded figures on a bucket's edge swap them back and forth
        key = (id(table.plans), id(dags), objective, policy.weight_latency, policy.dag_min_gain, current)
        standing = self._standing.get(key) if reuse else None
        if standing is not None and standing.plans is table.plans and standing.dags is dags and standing.power == self.power:
            stood = standing.decision.at(calibrated, nodes, hysteresis_margin=policy.hysteresis_margin)
            if stood is not None:
                return stood, table.plans.costs
        decision = table.plans.choose(
            calibrated, nodes, self.power, objective=objective, weight_latency=policy.weight_latency, dag_cuts=dags,
            dag_min_gain=policy.dag_min_gain, keep=frozenset({current}) if current else frozenset())
        if reuse:
            if len(self._standing) > 256:
                self._standing.clear()
            self._standing[key] = _Standing(table.plans, dags, self.power, decision)
        return decision, table.plans.costs

    def _plan_table(self, model: OnnxModel, encoding: int, view: AtShape, shapes: dict[str, tuple[int, ...]],
                    policy: Policy, adaptive: bool, published: list, cuts: dict[str, frozenset[int] | None]) -> _Table:
        """The model's PlanTable for these shapes, codec and policy over the
        nodes' published profiles and the cuts each offers: built again only
        when one of them changes."""
        errors = self.book.codec_errors(model.name)[0] if adaptive else None
        key = (model.name, encoding, key_of(shapes), view.basis, view.method, adaptive, policy.constraints,
               policy.max_output_error)
        known = self._tables.get(key)
        profiles = {node.address: profile for node, profile in published if profile is not None}
        if known is None or known.errors is not errors or any(
                known.profiles.get(address) is not profile for address, profile in profiles.items()) or any(
                known.cuts.get(address) != cuts.get(address) for address in profiles):
            if len(self._tables) > 256:  # request sizes vary: keep the cache bounded
                self._tables.clear()
            known = self._tables[key] = self._build_table(model, encoding, view, shapes, policy, errors,
                                                          {**(known.profiles if known else {}), **profiles},
                                                          {**(known.cuts if known else {}), **cuts})
        return known

    def _build_table(self, model: OnnxModel, encoding: int, view: AtShape, shapes: dict[str, tuple[int, ...]],
                     policy: Policy, errors: CodecErrors | None, profiles: dict[str, ModelProfile],
                     cuts: dict[str, frozenset[int] | None]) -> _Table:
        costs = self._model_costs(model, encoding, view, shapes)
        segments, service_ms = [], {}
        for address, published in profiles.items():
            if published.num_segments != view.profile.num_segments:
                continue
            cloud_profile = self.book.rescale(model, published, shapes).profile
            segments.append(NodeSegments(address, cloud_profile.segment_ms, cloud_profile.run_overhead_ms,
                                         cuts.get(address)))
            service_ms[address] = cloud_profile.whole_ms
        codecs = self._codec_options(model, view, shapes, errors, costs.n, policy) if errors is not None else ()
        return _Table(PlanTable(costs, segments, policy.constraints, codecs), profiles, errors, service_ms, cuts)

    def _codec_options(self, model: OnnxModel, view: AtShape, shapes: dict[str, tuple[int, ...]],
                       errors: CodecErrors, n: int, policy: Policy) -> list[CodecOption]:
        """fp16 and int8 where their measured output error fits the budget (as
        profiled: the request's calibration is added when it is planned)."""
        options = []
        for encoding in LOSSY_ENCODINGS:
            limits = codec_limits(errors, encoding, policy.max_output_error, n)
            if limits is None or len(errors.by_encoding[encoding]) != n:
                continue
            cuts, remote_ok = limits
            options.append(CodecOption(name=ENCODING_NAMES[encoding], encoding=encoding,
                                       crossings=self._model_costs(model, encoding, view, shapes).crossings,
                                       output_error=errors.by_encoding[encoding],
                                       usable=frozenset(cuts) | ({0} if remote_ok else set())))
        return options

    def _dag_cuts(self, model: OnnxModel, shapes: dict[str, tuple[int, ...]], table: PlanTable, calibration: Calibration,
                  nodes: list[NodeNow], objective: Objective, policy: Policy, encoding: int,
                  pinned: str = "") -> Sequence[DagCut]:
        """The minimum s-t cut on each node's link, when it is not a chain cut, and
        a DAG cut the caller pinned, priced. Solved and priced again only when a
        figure they depend on moves by DAG_RECOMPUTE_STEP: per request this is a
        dictionary lookup, and the same object while none moved."""
        graph = model.graph
        if graph is None or policy.constraints.allowed_cuts is not None:
            return ()
        if model.name not in self._branchy:
            self._branchy[model.name] = branches(graph)
        if not self._branchy[model.name]:
            return ()
        wanted = pinned.partition("@")[0].partition(":")[2]
        # the same figures as the last request's (the common case) find its cuts without rounding them again
        inputs = (objective, policy.weight_latency, wanted, calibration.edge_factor, calibration.offload_ms,
                  None if objective is Objective.LATENCY else self.power, tuple((now.node, now.link) for now in nodes))
        last = self._dag_last.get(model.name)
        if last is not None and last[0] is table and last[1] == inputs:
            return last[2]
        key = (model.name, key_of(shapes), objective, policy.weight_latency, encoding, policy.constraints.privacy_min_local,
               wanted, _bucket(calibration.edge_factor), _bucket(calibration.offload_ms + 1.0),
               _bucket(table.edge_ms(table.n) * calibration.edge_factor or 1.0),
               # the watts only weigh energy: under LATENCY a power reading must not re-solve the cut
               None if objective is Objective.LATENCY else (_bucket(self.power.active_w), _bucket(self.power.idle_w or 1.0)),
               tuple((now.node, _bucket(now.link.uplink_mbps), _bucket(now.link.downlink_mbps),
                      _bucket(table.cloud_ms(now.node) or 1.0)) for now in nodes))
        if key not in self._dag_cache:
            if len(self._dag_cache) > 256:  # shapes and links vary: keep both caches bounded
                self._dag_cache.clear()
            clouds = [CloudOption(now.node, now.link, now.queue_ms, table.segments(now.node).segment_ms,
                                  table.segments(now.node).overhead_ms) for now in nodes
                      if table.segments(now.node).cuts is None]  # a node hosting chosen suffixes runs no DAG cut
            self._dag_cache[key] = self._solve_dag_cuts(model, shapes, calibration.apply(table.costs), clouds, objective,
                                                        policy, encoding, wanted, offload_ms=calibration.offload_ms)
        self._dag_last[model.name] = (table, inputs, self._dag_cache[key])
        return self._dag_cache[key]

    def _solve_dag_cuts(self, model: OnnxModel, shapes: dict[str, tuple[int, ...]], costs: ModelCosts, clouds: list,
                        objective: Objective, policy: Policy, encoding: int, wanted: str, *,
                        offload_ms: float) -> list[DagCut]:
        graph = model.graph
        works = self.book.node_works(model, shapes)
        tensors = self.book.tensor_metas(model, shapes)
        if works is None or not tensors:
            return []
        device_ms = node_times(graph, costs.edge_segment_ms, works, self.book.machine)
        cloud_ms = {c.node: node_times(graph, c.segment_ms, works, self.book.machine) for c in clouds}
        local_ms = sum(costs.edge_segment_ms) + costs.edge_overhead_ms
        speed = self.codec_speed[encoding]
        found: dict[str, Cut] = {}
        for cloud in clouds:
            weights = terms(objective, policy.weight_latency, self.power, cloud.link,
                            local_total_ms=max(local_ms, 1e-9), local_energy_j=max(self.power.active_w * local_ms / 1e3, 1e-12))
            cut = best_cut(graph, device_ms=device_ms, cloud_ms=cloud_ms[cloud.node], tensors=tensors, weights=weights,
                           link=cloud.link, encoding=encoding, speed=speed,
                           privacy_min_local=policy.constraints.privacy_min_local)
            if cut is not None:
                found[cut.key] = cut
                self._general_cuts[(model.name, cut.key)] = cut
                self._general_cuts.move_to_end((model.name, cut.key))
                if len(self._general_cuts) > MAX_GENERAL_CUTS:
                    self._general_cuts.popitem(last=False)
                    self._dag_cache.clear()  # no cached decision may name a cut that is gone
                    self._dag_last.clear()
        if (model.name, wanted) in self._general_cuts:
            found[wanted] = self._general_cuts[(model.name, wanted)]
        inputs = sum(tensors[spec.name].raw_bytes for spec in model.inputs if spec.name in tensors)
        priced = [price(graph, cut, device_ms=device_ms, cloud_ms_by_node=cloud_ms, tensors=tensors, encoding=encoding,
                        speed=speed, input_bytes=inputs) for cut in found.values()]
        # each crossing carries the device's own cost of a cloud call (offload_ms), as chain cuts do
        return [replace(dag, pinned=dag.key == wanted,
                        crossing=replace(dag.crossing, encode_ms=dag.crossing.encode_ms + offload_ms))
                for dag in priced if dag is not None]

    def use_policies(self, policies: PolicySet) -> None:
        """Plan by ``policies`` from the next request on (a SIGHUP reload)."""
        self.policies = policies
        for name in self.store.models:
            policy = policies.for_model(name)
            if policy.max_output_error is not None:
                self.book.want_codec_errors(name)  # a budget set by this reload needs the figures
            if policy.profile_shapes:
                try:
                    logger.info("%s", self.book.want_shapes(name, policy.profile_shapes))
                except ShapeError as exc:
                    logger.error("policy: %s; plans keep the shapes profiled so far", exc)
        self.generator.use_limits(policies.llm, weight_latency=policies.default.weight_latency)

    def use_power(self, figures: PowerFigures) -> None:
        """Plan with these board watts from now on (tensor models and LLMs alike)."""
        self.power_figures = figures
        self.power = with_figures(self.power, figures)
        self.generator.power = with_figures(self.generator.power, figures)

    # ----------------------------------------------------------- execution --

    async def _cloud_call(self, node: CloudNodeClient, method: str, request, timeout_s: float,
                          expected_ms: float) -> pb.RunReply:
        """One call to ``node``; past WATCH_FACTOR times its ``expected_ms``
        (the plan's predicted network and cloud time) the node is probed, and
        one that is hung fails the call then rather than at ``timeout_s``."""
        start = time.perf_counter()
        size = request.ByteSize()
        node.inflight += 1
        node.bytes_in_flight += size
        node.last_sent = time.monotonic()
        try:
            with tracing.span("network", kind=SpanKind.CLIENT, **{"rpc.method": method, "server.address": node.address}):
                call = asyncio.ensure_future(node.call(method, request, timeout_s=timeout_s, metadata=tracing.outgoing()))
                check_after_s = max(expected_ms * WATCH_FACTOR / 1e3, node.liveness_timeout_s())
                reply = await node.unless_hung(call, check_after_s)
        except NodeFailed as exc:
            raise CloudFailed(f"{node.address} {method}: {exc}") from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # our own caller went away: nothing to finish
            # the node left the table and its channel closed under the call
            raise CloudFailed(f"{node.address} {method}: the node left the table mid-call") from None
        except grpc.aio.UsageError as exc:
            raise CloudFailed(f"{node.address} {method}: the node left the table ({exc})") from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The request was still on the wire (or queued) when time ran
                # out: its elapsed time is a lower bound on the transfer, and
                # without it a link that collapsed would never be noticed.
                node.observe_transfer(up_bytes=size, down_bytes=0, network_ms=(time.perf_counter() - start) * 1e3)
            # Only a node we cannot reach is taken out of planning; a missed
            # deadline or a full queue shows up in its reported load instead.
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                node.mark_down(f"{exc.code().name}: {exc.details()}")
            raise CloudFailed(f"{node.address} {method}: {exc.code().name}: {exc.details()}") from exc
        finally:
            node.inflight -= 1
            node.bytes_in_flight -= size
        node.update_load(reply.load)
        return reply

    def _attempts(self, candidate: Candidate, decision: Decisions | None) -> list[CloudNodeClient]:
        """The planned node, then the best other node offering the same plan
        (none when ``decision`` is None): a node that fails costs one retry
        before the request falls back."""
        others = sorted((c for c in (decision.plans(candidate.label) if decision else ())
                         if c.node != candidate.node and c.feasible), key=lambda c: c.score)
        nodes = {node.address: node for node in self.nodes}
        planned = [nodes.get(c.node) for c in (candidate, *others)]
        return [node for node in planned if node is not None][:NODE_ATTEMPTS]

    async def _offload(self, time_remaining: Callable[[], float | None], model: OnnxModel, candidate: Candidate,
                       decision: Decisions | None, costs: ModelCosts, feeds: dict[str, np.ndarray], encoding: int,
                       stages: Stages, *, fall_back: bool = True) -> tuple[dict[str, np.ndarray], str | None, str]:
        """Run a SPLIT or REMOTE plan, on another node if the first fails, else
        finish locally (without ``fall_back``: raise NoNodeLeft). Returns the
        outputs, the fallback reason (None if a node answered) and the node
        that answered."""
        split = candidate.kind == "split"
        cut = self._cut(model, candidate)
        encoding = candidate.encoding or encoding
        local_outputs: dict[str, np.ndarray] = {}
        to_send = feeds
        if split:
            stages.cold = not model.prefix_ready(cut)
            start = time.perf_counter()
            produced = await run_cancellable(self._pool, model.run_prefix, cut, feeds, shrink_arena=large(feeds))
            stages.edge_ms += tracing.record("prefix", start, **{"tandem.cut": candidate.label})
            local_outputs = {name: produced[name] for name in cut.edge_outputs}
            to_send = {name: produced[name] for name in cut.tensors}
        attempt = time.perf_counter()
        failures: list[str] = []
        try:
            tensors = await self._in_pool(encode_all, to_send, encoding)
            stages.encode_ms += tracing.record("encode", attempt)
            stages.sent = tuple((t.name, t.encoding) for t in tensors)
            if split:
                method, request = "RunPartition", pb.PartitionRequest(
                    model=model.name, model_digest=model.digest, cut=list(cut.tensors), tensors=tensors,
                    reply_encoding=pb.ENCODING_RAW, edge_outputs=list(cut.edge_outputs), has_edge_outputs=True)
            else:
                method, request = "RunModel", pb.ModelRequest(model=model.name, model_digest=model.digest, inputs=tensors,
                                                              reply_encoding=pb.ENCODING_RAW)
            remote_outputs = {spec.name for spec in model.outputs} - set(local_outputs)
            # the shapes its outputs must have, where shape inference reaches them (cached by book.prepare)
            metas = self.book.tensor_metas(model, {name: tuple(a.shape) for name, a in feeds.items()}) if model.graph else {}
            inferred = {name: metas[name].shape for name in remote_outputs if name in metas}
            for node in self._attempts(candidate, decision):
                budget_s = cloud_budget_s(timeout_s=self.policies.for_model(model.name).cloud_timeout_s,
                                          remaining_s=time_remaining(),
                                          local_finish_ms=candidate.rest_ms)
                if budget_s < MIN_CLOUD_BUDGET_S:
                    failures.append(f"the deadline leaves {budget_s * 1e3:.1f} ms for the cloud: not enough to try")
                    break
                start = time.perf_counter()
                try:
                    reply = await self._cloud_call(node, method, request, budget_s,
                                                   candidate.stages.network_ms + candidate.stages.cloud_ms)
                    rpc_ms = (time.perf_counter() - start) * 1e3
                    start = time.perf_counter()
                    outputs = await self._reply_outputs(node, method, model, reply, remote_outputs, inferred)
                except CloudFailed as exc:
                    failures.append(str(exc))
                    logger.warning("%s %s: %s", model.name, candidate.label, exc)
                    continue
                stages.decode_ms += tracing.record("decode", start)
                stages.cloud_ms = reply.queue_ms + reply.compute_ms + reply.decode_ms + reply.encode_ms
                stages.network_ms = max(rpc_ms - stages.cloud_ms, 0.0)
                node.observe_transfer(up_bytes=request.ByteSize(), down_bytes=reply.ByteSize(), network_ms=stages.network_ms)
                if failures:
                    stages.cold = True  # the time includes a failed attempt: nothing to learn from it
                return {**local_outputs, **outputs}, None, node.address
            failures = failures or [f"no node serving {model.name} is left in the table"]
        except (codec.CodecError, InputError) as exc:
            failures.append(str(exc))
        reason = "; ".join(failures)
        if not fall_back:
            raise NoNodeLeft(reason)
        stages.encode_ms = stages.cloud_ms = stages.decode_ms = 0.0
        stages.network_ms = (time.perf_counter() - attempt) * 1e3
        logger.warning("%s %s falling back to LOCAL: %s", model.name, candidate.label, reason)
        start = time.perf_counter()
        if split:  # the prefix already ran: finish from its tensors
            outputs = await run_cancellable(self._pool, model.run_suffix, cut, to_send, shrink_arena=large(feeds))
        else:
            outputs = await run_cancellable(self._pool, model.run, feeds, shrink_arena=large(feeds))
        stages.edge_ms += tracing.record("edge", start, **{"tandem.fallback": reason})
        return {**local_outputs, **outputs}, reason, ""

    async def _reply_outputs(self, node: CloudNodeClient, method: str, model: OnnxModel, reply: pb.RunReply,
                             names: set[str], inferred: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """A node's outputs, decoded and checked (OnnxModel.check_reply). What is
        not this model's answer fails that node (marked down), never the request."""
        try:
            outputs = await self._in_pool(decode_all, reply.outputs)
            model.check_reply(outputs, names, inferred)
        except (codec.CodecError, BadReply) as exc:
            reason = f"{node.address} {method}: a reply that is not {model.name}'s: {exc}"
            node.mark_down(reason)
            raise CloudFailed(reason) from exc
        return outputs

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---------------------------------------------------------------- rpcs --

    async def Infer(self, call: Unread[pb.InferRequest], context: grpc.aio.ServicerContext) -> pb.InferReply:
        try:
            with self.regions.lease(local=peer_is_local(context.peer())) as lease:
                asked: list[pb.InferRequest] = []

                def ask_of(request: pb.InferRequest) -> Ask:
                    asked.append(request)
                    return tandem_ask(request, lease)

                outputs, reply = await self.serve_tensors("tandem.EdgeAgent/Infer", call, ask_of,
                                                          context.time_remaining, context.invocation_metadata())
                region = asked[0].output_region if asked[0].HasField("output_region") else None
                reply.outputs.extend(reply_tensors(outputs, region, lease))
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status; the agent stays up
            await abort_for(context, exc)
        return reply

    async def serve_tensors(self, method: str, call: Unread, ask_of: Callable[[object], Ask],
                            time_remaining: Callable[[], float | None], metadata: Sequence[tuple[str, str]] | None,
                            *, label: str | None = None, deferred: bool = False
                            ) -> tuple[dict[str, np.ndarray], pb.InferReply]:
        """One tensor request by any protocol (Tandem's Infer, OIP's ModelInfer
        over gRPC or REST): admitted, read, planned and run the same way.
        ``ask_of`` turns the protocol's message into an ``Ask``; ``time_remaining``
        gives the caller's deadline (seconds left, None for none); ``label``
        names the method in the metrics (by default the gRPC method's own
        name: Infer, ModelInfer). A ``deferred`` request's delivery is not
        live traffic (the queue's drain yields to that), and a cloud plan of
        one that no node runs fails with NoNodeLeft instead of running on the
        device: it goes back to wait for a node. Returns the outputs and the reply without
        them, for the protocol to encode."""
        label = label or method.rpartition("/")[2]
        try:
            with tracing.serving(method, metadata) as span, self.metrics.in_flight(), \
                    self.traffic.running(counted=not deferred):
                arrived = time.perf_counter()
                async with self.memory.hold(QUEUED_CALL_BYTES) as held, self.admission.slot() as queued_ms:
                    tracing.record("queue", arrived)
                    model, feeds, (objective, encoding, adaptive), pinned = await self._read(call, held, ask_of)
                    outputs, reply = await self._infer(time_remaining, model, feeds, objective, encoding, pinned,
                                                       arrived, adaptive=adaptive, queued_ms=queued_ms,
                                                       fall_back=not deferred)
                span.set_attributes({"tandem.model": model.name, "tandem.plan": reply.plan.label,
                                     "tandem.planned": reply.planned.label, "tandem.fell_back": reply.fell_back,
                                     "tandem.node": reply.node})
        except Exception as exc:
            self.metrics.observe_request(label, "", "rejected" if isinstance(exc, Overloaded) else "error")
            raise
        self._observe(label, reply)
        return outputs, reply

    async def _read(self, call: Unread, held: Holding, ask_of: Callable[[object], Ask]
                    ) -> tuple[OnnxModel, dict[str, np.ndarray], tuple[Objective, int, bool], str]:
        """What an admitted call asks for, read off the wire once the memory
        budget can hold it running, and checked. The parsed message is dropped
        on return: the decoded arrays alone keep its payload."""
        # Room for one like the recent ones before reading it: a call waiting
        # for room after it was read would hold its message uncounted.
        await held.grow_to(min(self._expected_running_bytes, self.memory.limit_bytes))
        request = await call.read()
        running_bytes = call.size * RUNNING_BYTES_PER_REQUEST_BYTE
        self._expected_running_bytes = max(running_bytes, int(EXPECTED_DECAY * self._expected_running_bytes))
        await held.grow_to(running_bytes)
        self.trimmer.took(call.size)
        ask = ask_of(request)
        model = self.store.get(ask.model)
        pinned, pinned_encoding = split_codec(ask.plan, ask.encoding)
        options = request_options(ask.objective, pinned_encoding, self.policies.for_model(model.name))
        feeds = ask.feeds(model)
        model.check_inputs(feeds)
        return model, feeds, options, pinned

    def _observe(self, method: str, reply: pb.InferReply) -> None:
        kind = pb.PlanKind.Name(reply.planned.kind).removeprefix("PLAN_").lower()
        measured = {field.name.removesuffix("_ms"): value for field, value in reply.measured.ListFields()}
        self.metrics.observe_request(method, kind, "fallback" if reply.fell_back else "ok", measured)
        if reply.fell_back:
            self.metrics.observe_fallback(fallback_kind(reply.fallback_reason))
        else:
            self.metrics.observe_prediction(kind, reply.predicted.total_ms, reply.measured.total_ms)

    def _no_node_for(self, model: OnnxModel, pinned: str, k: int | str | None) -> str:
        """Why no node can run a pinned cloud plan: none reachable serves the
        model, or those that do host other cuts only (engines hosting exported suffixes)."""
        serving = [n for n in self.nodes if n.facts(model.name, model.digest)[0]]
        if not serving:
            offline = f" (offline: {self.cloud.reason})" if self.cloud.offline else ""
            return f"plan {pinned} needs a cloud node serving {model.name} and none is reachable{offline}"
        offers = "; ".join(f"{n.address} runs {', '.join('remote' if c == 0 else f'split:{c}' for c in sorted(cuts))}"
                           for n in serving if (cuts := n.offered_cuts(model.name)) is not None)
        if offers and all(n.offered_cuts(model.name) is not None and k not in n.offered_cuts(model.name) for n in serving):
            return f"plan {pinned}: no node hosts that part of {model.name} ({offers})"
        return f"plan {pinned} has no node that can run it now"

    def _pick(self, model: OnnxModel, decision: Decisions, pinned: str, key: tuple) -> tuple[Candidate, str, str]:
        """(candidate to run, why, fallback reason if a pinned cloud plan has no node)."""
        if not pinned:
            margin = self.policies.for_model(model.name).hysteresis_margin
            held = hold_or_switch(decision, self._current.get(key), margin=margin)
            if held.candidate is not None:
                self._current[key] = held.candidate.label
                return held.candidate, held.why, ""
            if decision.best_effort is not None:
                return decision.best_effort, f"best effort, constraints not met: {decision.why}", ""
            raise NoFeasiblePlan(f"no feasible plan for {model.name}: {decision.why}")
        kind, k, node = parse_pinned(pinned)
        if kind == "split" and isinstance(k, int):
            model.cut(k)  # GraphError names the valid range (or why the model cannot be split)
        elif kind == "split" and (model.name, k) not in self._general_cuts:
            raise PlanError(f"plan {pinned}: no DAG cut {k} of {model.name} has been planned (explain lists them)")
        candidate = find_pinned(decision, kind, k, node)
        if candidate is None:
            local = find_pinned(decision, "local", None, "")
            return local, f"pinned by the caller: {pinned}", self._no_node_for(model, pinned, 0 if kind == "remote" else k)
        if candidate.hard_violation:
            # The device owner's hard limits (privacy floor, memory) bind apps too.
            raise NoFeasiblePlan(f"plan {pinned} breaks the device policy: {'; '.join(candidate.violations)}")
        return candidate, f"pinned by the caller: {pinned}", ""

    async def _infer(self, time_remaining: Callable[[], float | None], model: OnnxModel, feeds: dict[str, np.ndarray],
                     objective: Objective, encoding: int, pinned: str, arrived: float, *,
                     adaptive: bool = False, queued_ms: float = 0.0, fall_back: bool = True
                     ) -> tuple[dict[str, np.ndarray], pb.InferReply]:
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        if not self.book.prepared(model, shapes):  # a new exact shape: its shape inference off the event loop
            await asyncio.to_thread(self.book.prepare, model, shapes)
        calibration = self.calibration(model, shapes)  # what the plan is priced at, and what the run then corrects
        planning = time.perf_counter()
        try:
            # a pinned plan runs as pinned, predicted from the nearest measured shape meanwhile
            decision, costs = self.decide(
                model, objective, encoding, shapes=shapes, nearest_ok=bool(pinned), adaptive=adaptive, pinned=pinned,
                calibration=calibration, current=self._current.get((model.name, objective, encoding, adaptive)),
                reuse=not pinned)
        except NotPlanned as unplanned:
            return await self._infer_unplanned(model, feeds, pinned, unplanned.reason, arrived)
        candidate, why, fallback_reason = self._pick(model, decision, pinned, (model.name, objective, encoding, adaptive))
        if fallback_reason and not fall_back:
            raise NoNodeLeft(fallback_reason)
        if "@" not in pinned:
            candidate = share_load(decision, candidate, {n.address: (n.inflight, n.last_sent) for n in self.nodes})
        planned = self._plan(candidate, model, encoding)

        stages = Stages(plan_ms=tracing.record("plan", planning, **{"tandem.planned": planned.label}))
        ran, answered = planned, ""
        if candidate.kind == "local":
            start = time.perf_counter()
            outputs = await run_cancellable(self._pool, model.run, feeds, shrink_arena=large(feeds))
            stages.edge_ms = tracing.record("edge", start)
        else:
            # a plan pinned to one node runs there or locally, never elsewhere
            retry_on = decision if "@" not in pinned else None
            outputs, reason, answered = await self._offload(time_remaining, model, candidate, retry_on, costs, feeds,
                                                            encoding, stages, fall_back=fall_back)
            planned.tensor_encodings.extend(pb.TensorEncoding(tensor=name, encoding=e) for name, e in stages.sent)
            if reason is not None:
                fallback_reason = reason
                ran = pb.Plan(kind=pb.PLAN_LOCAL, cut_index=costs.n, label="local")
        total_ms = (time.perf_counter() - arrived) * 1e3
        if not fallback_reason and not stages.cold:
            # what no stage accounts for: decoding the request and encoding the reply (not the wait for a slot)
            outside_ms = total_ms - queued_ms - (stages.edge_ms + stages.encode_ms + stages.network_ms + stages.cloud_ms
                                                 + stages.decode_ms)
            self._calibration[self._calibration_key(model, shapes)] = self.calibration(model, shapes).observed(
                candidate.stages, stages, offloaded=candidate.kind != "local", used=calibration, outside_ms=outside_ms)
            if not pinned and self.traffic.in_flight <= 1:  # others running would move the inputs first
                self._price_ahead(model, objective, encoding, shapes, adaptive)
        return outputs, pb.InferReply(
            plan=ran, planned=planned, predicted=stage_times(candidate.stages, candidate.stages.total_ms),
            measured=stage_times(stages, total_ms, stages.plan_ms), predicted_energy_j=candidate.energy_j,
            fell_back=bool(fallback_reason), fallback_reason=fallback_reason,
            node=answered if ran.kind != pb.PLAN_LOCAL else "",
            constraints_met=candidate.feasible, reason=why,
        )

    def _price_ahead(self, model: OnnxModel, objective: Objective, encoding: int, shapes: dict[str, tuple[int, ...]],
                     adaptive: bool) -> None:
        """Decide the next such request now, at the calibration this run left,
        once this reply is on its way: while the links and loads hold, that
        request finds its decision priced (QuickDecision.at) instead of
        pricing it on its own path."""
        def price() -> None:
            try:
                self.decide(model, objective, encoding, shapes=shapes, learn=False, adaptive=adaptive,
                            current=self._current.get((model.name, objective, encoding, adaptive)), reuse=True)
            except Exception:  # noqa: BLE001 -- the request itself decides again, and reports what fails
                logger.debug("pricing ahead for %s failed", model.name, exc_info=True)
        asyncio.get_running_loop().call_soon(price)

    async def _infer_unplanned(self, model: OnnxModel, feeds: dict[str, np.ndarray], pinned: str, reason: str,
                               arrived: float) -> tuple[dict[str, np.ndarray], pb.InferReply]:
        """LOCAL with nothing predicted: the model (or this shape) has no profile to plan with yet."""
        if pinned:
            parse_pinned(pinned)  # a malformed pin is still the caller's error
        start = time.perf_counter()
        outputs = await run_cancellable(self._pool, model.run, feeds, shrink_arena=large(feeds))
        stages = Stages(edge_ms=(time.perf_counter() - start) * 1e3)
        local = pb.Plan(kind=pb.PLAN_LOCAL, cut_index=model.num_segments, label="local")
        pinned_cloud = bool(pinned) and not pinned.startswith("local")
        return outputs, pb.InferReply(
            plan=local, planned=local,
            measured=stage_times(stages, (time.perf_counter() - arrived) * 1e3),
            fell_back=pinned_cloud, fallback_reason=f"plan {pinned} needs a profile: {reason}" if pinned_cloud else "",
            constraints_met=True, reason=reason,
        )

    async def generation(self, request: pb.GenerateRequest, *, deferred: bool = False) -> Generation:
        """A generation routed by the planner, its chunks counted in the metrics:
        what every frontend (gRPC Generate, the OpenAI HTTP API) streams.
        A ``deferred`` one's delivery is not live traffic."""
        objective, _, _ = request_options(request.objective, pb.ENCODING_UNSPECIFIED, self.policies.for_model(request.model))
        generation = await self.generator.generate(request, objective)

        async def observed(chunks: AsyncIterator[pb.GenerateChunk]) -> AsyncIterator[pb.GenerateChunk]:
            with self.traffic.running(counted=not deferred):
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if chunk.HasField("done"):
                            done = chunk.done
                            done.model = done.model or request.model  # a tier request's model was chosen by now
                            done.tier = request.tier
                            side = pb.PlanKind.Name(done.ran).removeprefix("PLAN_").lower()
                            self.metrics.observe_llm(request.model, side, tokens=done.completion_tokens,
                                                     tok_s=done.tokens_per_s, operation=operation_of(request),
                                                     ttft_ms=done.ttft_ms, total_ms=done.total_ms)
                            self.metrics.observe_request("Generate", side, "fallback" if done.switched else "ok")
                        yield chunk

        generation.chunks = observed(generation.chunks)
        return generation

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        async def chunks() -> AsyncIterator[pb.GenerateChunk]:
            async with contextlib.aclosing(await self.generation(request)) as generated:
                async for chunk in generated:
                    yield chunk

        with tracing.serving("tandem.EdgeAgent/Generate", context.invocation_metadata(),
                             **{"gen_ai.request.model": request.model}) as span:
            async for chunk in relay(context, chunks()):
                if chunk.HasField("done"):
                    span.set_attributes({"tandem.plan": pb.PlanKind.Name(chunk.done.ran).removeprefix("PLAN_").lower(),
                                         "tandem.switched": chunk.done.switched,
                                         "gen_ai.usage.output_tokens": chunk.done.completion_tokens})
                yield chunk

    async def Defer(self, request: pb.DeferRequest, context: grpc.aio.ServicerContext) -> pb.Deferral:
        try:
            return await self.deliveries.submit(request)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status; the agent stays up
            await abort_for(context, exc)

    async def Result(self, request: pb.ResultRequest, context: grpc.aio.ServicerContext) -> pb.DeferredResult:
        try:
            return await self.deliveries.result(request.id, request.wait_s)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)

    async def Results(self, request: pb.ResultsRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.DeferredResult]:
        try:
            async for result in self.deliveries.results(list(request.ids)):
                yield result
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.Explanation:
        policy = self.policies.for_model(request.model)
        try:
            objective, encoding, adaptive = request_options(request.objective, request.encoding, policy)
            link = None
            if request.HasField("link"):
                o = request.link
                try:
                    link = Link(uplink_mbps=o.uplink_mbps, downlink_mbps=o.downlink_mbps, rtt_ms=o.rtt_ms)
                except ValueError as exc:
                    raise InputError(f"link override: {exc}") from None
            if request.tier or self.generator.serves(request.model):
                return self._explain_generation(request, objective, link)
            model = self.store.get(request.model)
            try:
                shapes = self.explain_shapes(model, request.input_shapes)
                decision, _ = self.decide(model, objective, encoding, shapes=shapes, link=link, learn=False,
                                          nearest_ok=True, adaptive=adaptive,
                                          current=self._current.get((model.name, objective, encoding, adaptive)))
            except NotPlanned as unplanned:
                return pb.Explanation(model=model.name, objective=OBJECTIVE_TO_PB[objective], feasible=True,
                                      why=f"LOCAL: {unplanned.reason}", plans_unavailable=unplanned.reason,
                                      winner=pb.Plan(kind=pb.PLAN_LOCAL, cut_index=model.num_segments, label="local"),
                                      device=self.device_name, **self.cloud_fields())
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        current = self._current.get((model.name, objective, encoding, adaptive))
        learned = self.calibration(model, shapes)
        held = hold_or_switch(decision, current, margin=policy.hysteresis_margin)
        shown = held.candidate or decision.best_effort
        current_candidate = min(decision.plans(current), key=lambda c: c.score, default=None) if current else None
        used = link or next((n.link for n in self.nodes if n.state.reachable and n.link), None)
        why = held.why + (" " + self._codec_note(model, policy) if adaptive else "")
        return pb.Explanation(
            model=model.name, objective=OBJECTIVE_TO_PB[objective], feasible=decision.feasible, why=why,
            winner=self._plan(shown, model, encoding) if shown else pb.Plan(),
            current=self._plan(current_candidate, model, encoding) if current_candidate else pb.Plan(),
            hysteresis_margin=policy.hysteresis_margin, would_switch=held.switched,
            calibration=pb.Calibration(edge_factor=learned.edge_factor, offload_ms=learned.offload_ms,
                                       samples=learned.samples, request_ms=learned.request_ms),
            power=pb.PowerFigures(idle_w=self.power_figures.idle_w, active_w=self.power_figures.active_w,
                                  source=self.power_figures.source),
            candidates=[
                pb.Candidate(plan=self._plan(c, model, encoding), predicted=stage_times(c.stages, c.stages.total_ms),
                             energy_j=c.energy_j, score=c.score, feasible=c.feasible, violations=c.violations,
                             memory_bytes=c.memory_bytes, uplink_bytes=c.uplink_bytes)
                for c in decision.candidates
            ],
            link=pb.LinkOverride(uplink_mbps=used.uplink_mbps, downlink_mbps=used.downlink_mbps, rtt_ms=used.rtt_ms) if used else None,
            device=self.device_name,
            profile=self._profile_basis(model, shapes),
            nodes=[self._node_facts(node, model) for node in self.nodes],
            **self.cloud_fields(),
        )

    def cloud_fields(self) -> dict:
        """The cloud's state and the deferred queue's, as Explanation fields (and health's)."""
        queue = self.deliveries.store.stats() if self.deliveries is not None else None
        return dict(connectivity=self.cloud.state.value, connectivity_reason=self.cloud.reason,
                    deferred_pending=queue.pending if queue else 0,
                    deferred_oldest_age_s=queue.oldest_age_s if queue else 0.0)

    @staticmethod
    def _node_facts(node: CloudNodeClient, model: OnnxModel) -> pb.NodeFacts:
        planned, note = node.facts(model.name, model.digest)
        cuts = node.offered_cuts(model.name)
        return pb.NodeFacts(address=node.address, kind=node.kind, planned=planned, note=note,
                            cuts=sorted(cuts) if cuts is not None else [])

    def _codec_note(self, model: OnnxModel, policy: Policy) -> str:
        """What explain says of the per-request codec: the budget and where errors were measured, or why none is offered."""
        errors, note = self.book.codec_errors(model.name)
        if errors is None:
            return f"Codec: raw only ({note})."
        worst = ", ".join(f"{ENCODING_NAMES[e]} up to {max(v):.2g}" for e, v in errors.by_encoding.items())
        return (f"Codec chosen per plan within an output error of {policy.max_output_error:g} of each output's range "
                f"(measured at {errors.shapes}: {worst}).")

    def explain_shapes(self, model: OnnxModel, specs) -> dict[str, tuple[int, ...]]:
        """The caller's shapes for explain, checked like a request's, or the first profiled ones."""
        if not specs:
            return self.default_shapes(model)
        declared = {spec.name: tuple("" if d is None else d for d in spec.shape) if spec.shape is not None else None
                    for spec in model.inputs}
        try:
            return check_every_input(declared, {spec.name: list(spec.shape) for spec in specs}, f"explain {model.name}")
        except ShapeError as exc:
            raise InputError(str(exc)) from None

    def _profile_basis(self, model: OnnxModel, shapes: dict[str, tuple[int, ...]]) -> pb.ProfiledShape:
        """Which measured shape the predictions came from, and how they were rescaled."""
        view = self.book.view(model, shapes, learn=False, nearest_ok=True)
        if isinstance(view, Unplanned):
            return pb.ProfiledShape()
        return pb.ProfiledShape(
            inputs=shape_specs(model, shapes),
            source="measured at this shape" if view.method == "measured" else f"{view.method} from {view.basis}",
        )

    def _explain_generation(self, request: pb.ExplainRequest, objective: Objective, link: Link | None) -> pb.Explanation:
        model, tier_why, judged = self.generator.model_for_tier(request.tier, request.model)
        decision = self.generator.explain(model, request.prompt_tokens or 32, request.max_tokens or 64, objective, link)
        shown = decision.winner or decision.best_effort

        def plan(c) -> pb.Plan:
            return pb.Plan(kind=KIND[c.kind], node=c.node or "", label=c.label)

        return pb.Explanation(
            model=model, objective=OBJECTIVE_TO_PB[objective], feasible=decision.feasible,
            why=f"{tier_why}{decision.why}", winner=plan(shown) if shown else pb.Plan(), device=self.device_name,
            candidates=[
                pb.Candidate(plan=plan(c), predicted=pb.StageTimes(total_ms=c.total_ms), ttft_ms=c.ttft_ms,
                             energy_j=c.energy_j, score=c.score, feasible=c.feasible, violations=c.violations,
                             draft_tokens=c.draft_tokens)
                for c in decision.candidates
            ],
            tier=request.tier, threshold=judged.threshold if judged else 0.0,
            confidence_tokens=judged.first_tokens if judged else 0,
            **self.cloud_fields(),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelList:
        tensor_models = [self.book.model_info(self.store.get(info.name), info) for info in self.store.model_infos()]
        return pb.ModelList(models=[*tensor_models, *self.generator.llms.model_infos()],
                            skipped=self.store.skipped_infos())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.book.close()
        self.generator.llms.close()
        self.regions.close()
