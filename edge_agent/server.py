"""EdgeAgent gRPC service: plan each request, run it, fall back, report."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from edge_agent.offload import CloudNodeClient
from partitioner.costmodel import Candidate, Constraints, Decision, Link, ModelCosts, Objective, Power, choose
from partitioner.planning import CodecSpeed, cloud_option, model_costs
from partitioner.profile import ModelProfile
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.admission import Admission
from runtimes.model_store import ModelStore
from runtimes.onnx_exec import InputError, OnnxModel
from runtimes.rpc import NoFeasiblePlan, abort_for

logger = logging.getLogger(__name__)

OBJECTIVES = {
    pb.OBJECTIVE_LATENCY: Objective.LATENCY,
    pb.OBJECTIVE_ENERGY: Objective.ENERGY,
    pb.OBJECTIVE_WEIGHTED: Objective.WEIGHTED,
}
OBJECTIVE_TO_PB = {v: k for k, v in OBJECTIVES.items()}
KINDS = {"local": pb.PLAN_LOCAL, "split": pb.PLAN_SPLIT, "remote": pb.PLAN_REMOTE}

# Below this much time left before the caller's deadline, a cloud attempt is
# not worth starting: there would be no time left to fall back.
MIN_CLOUD_BUDGET_S = 0.005


class PlanError(InputError):
    """A pinned plan that does not exist for this model."""


@dataclass(frozen=True)
class Policy:
    objective: Objective = Objective.LATENCY
    weight_latency: float = 0.5
    constraints: Constraints = field(default_factory=Constraints)
    encoding: int = pb.ENCODING_RAW          # codec for tensors sent to a node
    cloud_timeout_s: float = 10.0            # longest wait for one cloud call


@dataclass
class Stages:
    edge_ms: float = 0.0
    encode_ms: float = 0.0
    network_ms: float = 0.0
    cloud_ms: float = 0.0
    decode_ms: float = 0.0

    def message(self, total_ms: float) -> pb.StageTimes:
        return pb.StageTimes(edge_ms=self.edge_ms, encode_ms=self.encode_ms, network_ms=self.network_ms,
                             cloud_ms=self.cloud_ms, decode_ms=self.decode_ms, total_ms=total_ms)


class CloudFailed(RuntimeError):
    """A cloud call failed; the request continues locally."""


def plan_message(candidate: Candidate, model: OnnxModel, encoding: int) -> pb.Plan:
    cut = model.cut(candidate.k).tensors if candidate.kind == "split" else ()
    return pb.Plan(kind=KINDS[candidate.kind], cut_index=candidate.k, cut=cut, node=candidate.node or "",
                   encoding=encoding if candidate.node else pb.ENCODING_UNSPECIFIED, label=candidate.label)


def stages_message(candidate: Candidate) -> pb.StageTimes:
    s = candidate.stages
    return pb.StageTimes(edge_ms=s.edge_ms, encode_ms=s.encode_ms, network_ms=s.network_ms,
                         cloud_ms=s.cloud_ms, decode_ms=s.decode_ms, total_ms=s.total_ms)


def parse_pinned(label: str) -> tuple[str, int | None, str]:
    """("local" | "remote" | "split", k, node) from "local", "remote", "split:<k>", each optionally "@HOST:PORT"."""
    wanted, _, node = label.strip().partition("@")
    kind, _, index = wanted.partition(":")
    if kind not in KINDS or (kind == "split") != index.isdigit() or (kind != "split" and index):
        raise PlanError(f"plan {label!r} is not one of 'local', 'remote', 'split:<k>' (optionally '@HOST:PORT')")
    return kind, int(index) if index else None, node


def find_pinned(decision: Decision, kind: str, k: int | None, node: str) -> Candidate | None:
    for candidate in decision.candidates:
        if candidate.kind == kind and (k is None or candidate.k == k) and (not node or candidate.node == node):
            return candidate
    return None


class EdgeAgentService(pb_grpc.EdgeAgentServicer):
    def __init__(self, *, store: ModelStore, profiles: dict[str, ModelProfile], nodes: list[CloudNodeClient],
                 power: Power, device_name: str, codec_speed: dict[int, CodecSpeed], policy: Policy,
                 max_concurrency: int, max_queue: int) -> None:
        self.store = store
        self.profiles = profiles
        self.nodes = nodes
        self.power = power
        self.device_name = device_name
        self.codec_speed = codec_speed
        self.policy = policy
        self.admission = Admission(max_concurrency=max_concurrency, max_queue=max_queue)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="edge-compute")
        self._costs: dict[tuple[str, int], ModelCosts] = {}  # profiles are immutable: build once per codec

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------ planning --

    async def decide(self, model: OnnxModel, objective: Objective, encoding: int, link: Link | None = None) -> Decision:
        profile = self.profiles[model.name]
        costs = self._costs.get((model.name, encoding))
        if costs is None:
            costs = model_costs(profile, encoding=encoding, speed=self.codec_speed[encoding], output_encoding=pb.ENCODING_RAW)
            self._costs[(model.name, encoding)] = costs
        clouds = []
        for node in self.nodes:
            if not node.state.reachable:
                continue
            try:
                cloud_profile = await node.profile(model.name, model.digest)
            except grpc.RpcError as exc:
                node.mark_down(f"profile of {model.name}: {exc.code().name}: {exc.details()}")
                continue
            if cloud_profile is None or cloud_profile.num_segments != profile.num_segments:
                continue
            clouds.append(cloud_option(node.address, cloud_profile, link=link or node.state.link,
                                       queue_ms=node.state.load.queue_delay_ms))
        return choose(costs, clouds, self.power, objective=objective, weight_latency=self.policy.weight_latency,
                      constraints=self.policy.constraints)

    # ----------------------------------------------------------- execution --

    def _node(self, address: str) -> CloudNodeClient:
        return next(node for node in self.nodes if node.address == address)

    async def _cloud_call(self, node: CloudNodeClient, method: str, request: Any, timeout_s: float) -> pb.RunReply:
        try:
            reply = await getattr(node.stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            # Only a node we cannot reach is taken out of planning; a missed
            # deadline or a full queue shows up in its reported load instead.
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                node.mark_down(f"{exc.code().name}: {exc.details()}")
            raise CloudFailed(f"{node.address} {method}: {exc.code().name}: {exc.details()}") from exc
        node.update_load(reply.load)
        return reply

    def _cloud_budget_s(self, context: grpc.aio.ServicerContext, local_fallback_ms: float) -> float:
        """Time a cloud call may take and still leave room to finish locally."""
        budget = self.policy.cloud_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - local_fallback_ms / 1e3 * 1.2)
        return budget

    async def _offload(self, context, model: OnnxModel, candidate: Candidate, feeds: dict[str, np.ndarray],
                       encoding: int, stages: Stages) -> tuple[dict[str, np.ndarray], str | None]:
        """Run a SPLIT or REMOTE plan; on any cloud failure finish locally.

        Returns the outputs and the fallback reason (None if the cloud answered).
        """
        node = self._node(candidate.node)
        profile = self.profiles[model.name]
        split = candidate.kind == "split"
        cut = model.cut(candidate.k) if split else None
        local_outputs: dict[str, np.ndarray] = {}
        to_send = feeds
        if split:
            start = time.perf_counter()
            produced = await self._run(model.run_prefix, cut, feeds)
            stages.edge_ms += (time.perf_counter() - start) * 1e3
            local_outputs = {name: produced[name] for name in cut.edge_outputs}
            to_send = {name: produced[name] for name in cut.tensors}
        try:
            remaining_local_ms = sum(profile.segment_ms[candidate.k:]) + profile.run_overhead_ms
            budget_s = self._cloud_budget_s(context, remaining_local_ms)
            if budget_s < MIN_CLOUD_BUDGET_S:
                raise CloudFailed(f"deadline leaves {budget_s * 1e3:.1f} ms for the cloud: not enough to try")
            start = time.perf_counter()
            tensors = [codec.encode(array, name, encoding) for name, array in to_send.items()]
            stages.encode_ms += (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            if split:
                request = pb.PartitionRequest(model=model.name, model_digest=model.digest, cut=list(cut.tensors),
                                              tensors=tensors, reply_encoding=pb.ENCODING_RAW)
                reply = await self._cloud_call(node, "RunPartition", request, budget_s)
            else:
                request = pb.ModelRequest(model=model.name, model_digest=model.digest, inputs=tensors,
                                          reply_encoding=pb.ENCODING_RAW)
                reply = await self._cloud_call(node, "RunModel", request, budget_s)
            rpc_ms = (time.perf_counter() - start) * 1e3
            stages.cloud_ms = reply.queue_ms + reply.compute_ms + reply.decode_ms + reply.encode_ms
            stages.network_ms = max(rpc_ms - stages.cloud_ms, 0.0)
            start = time.perf_counter()
            outputs = {t.name: codec.decode(t) for t in reply.outputs}
            stages.decode_ms += (time.perf_counter() - start) * 1e3
            return {**local_outputs, **outputs}, None
        except (CloudFailed, codec.CodecError) as exc:
            reason = str(exc)
            logger.warning("%s %s falling back to LOCAL: %s", model.name, candidate.label, reason)
            start = time.perf_counter()
            if split:
                outputs = await self._run(model.run_suffix, cut, to_send)  # the prefix is not run twice
            else:
                outputs = await self._run(model.run, feeds)
            stages.edge_ms += (time.perf_counter() - start) * 1e3
            return {**local_outputs, **outputs}, reason

    # ---------------------------------------------------------------- rpcs --

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferReply:
        arrived = time.perf_counter()
        try:
            model = self.store.get(request.model)
            feeds = {t.name: codec.decode(t) for t in request.inputs}
            model.check_inputs(feeds)
            objective = OBJECTIVES.get(request.objective, self.policy.objective)
            encoding = request.encoding or self.policy.encoding
            if encoding not in self.codec_speed:
                raise codec.CodecError(f"unknown encoding {encoding}")
            async with self.admission.slot():
                return await self._infer(context, model, feeds, objective, encoding, request.plan, arrived)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status; the agent stays up
            await abort_for(context, exc)

    async def _infer(self, context, model: OnnxModel, feeds, objective: Objective, encoding: int, pinned: str,
                     arrived: float) -> pb.InferReply:
        decision = await self.decide(model, objective, encoding)
        fallback_reason = ""
        if pinned:
            kind, k, node = parse_pinned(pinned)
            if kind == "split":
                model.cut(k)  # GraphError names the valid range (or why the model cannot be split)
            candidate = find_pinned(decision, kind, k, node)
            if candidate is None:
                fallback_reason = f"plan {pinned} needs a cloud node serving {model.name} and none is reachable"
                candidate = find_pinned(decision, "local", None, "")
            why = f"pinned by the caller: {pinned}"
        elif decision.winner is not None:
            candidate, why = decision.winner, decision.why
        elif decision.best_effort is not None:
            candidate, why = decision.best_effort, f"best effort, constraints not met: {decision.why}"
        else:
            raise NoFeasiblePlan(f"no feasible plan for {model.name}: {decision.why}")
        planned = plan_message(candidate, model, encoding)

        stages = Stages()
        if candidate.kind == "local":
            start = time.perf_counter()
            outputs = await self._run(model.run, feeds)
            stages.edge_ms = (time.perf_counter() - start) * 1e3
            ran = planned
        else:
            outputs, reason = await self._offload(context, model, candidate, feeds, encoding, stages)
            if reason:
                fallback_reason = reason
            ran = planned if reason is None else pb.Plan(kind=pb.PLAN_LOCAL, cut_index=model.num_segments, label="local")
        encoded = [codec.encode(array, name) for name, array in outputs.items()]
        total_ms = (time.perf_counter() - arrived) * 1e3
        return pb.InferReply(
            outputs=encoded, plan=ran, planned=planned, predicted=stages_message(candidate),
            measured=stages.message(total_ms), predicted_energy_j=candidate.energy_j,
            fell_back=bool(fallback_reason), fallback_reason=fallback_reason,
            node=candidate.node if ran.kind != pb.PLAN_LOCAL else "",
            constraints_met=candidate.feasible, reason=why,
        )

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.Explanation:
        try:
            model = self.store.get(request.model)
            objective = OBJECTIVES.get(request.objective, self.policy.objective)
            encoding = request.encoding or self.policy.encoding
            link = None
            if request.HasField("link"):
                o = request.link
                link = Link(uplink_mbps=o.uplink_mbps, downlink_mbps=o.downlink_mbps, rtt_ms=o.rtt_ms)
            decision = await self.decide(model, objective, encoding, link)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        shown = decision.winner or decision.best_effort
        used = link or next((n.state.link for n in self.nodes if n.state.reachable and n.state.link), None)
        return pb.Explanation(
            model=model.name, objective=OBJECTIVE_TO_PB[objective], feasible=decision.feasible, why=decision.why,
            winner=plan_message(shown, model, encoding) if shown else pb.Plan(),
            candidates=[
                pb.Candidate(plan=plan_message(c, model, encoding), predicted=stages_message(c), energy_j=c.energy_j,
                             score=c.score, feasible=c.feasible, violations=c.violations,
                             memory_bytes=c.memory_bytes, uplink_bytes=c.uplink_bytes)
                for c in decision.candidates
            ],
            link=pb.LinkOverride(uplink_mbps=used.uplink_mbps, downlink_mbps=used.downlink_mbps, rtt_ms=used.rtt_ms) if used else None,
            device=self.device_name,
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelList:
        return pb.ModelList(models=self.store.model_infos())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
