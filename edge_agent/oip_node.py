"""A Triton, KServe or MLServer as a cloud node, over the Open Inference
Protocol (KServe v2 gRPC): the engines operators already run.

It keeps CloudNodeClient's interface, so planning, load sharing, retries and
the fallback to the device are the same for every kind of node. What such an
engine does not tell us, the agent learns:

- what it hosts: its repository index, each entry's metadata checked against
  the device's copy (whole models for REMOTE, ``<model>__from_<k>`` suffixes
  from ``offload-tune export-suffixes`` for SPLIT at cut k);
- its speed: no profile is published, so the cloud side is predicted from
  this host's measured profile scaled by the node's speed, which each call
  measures as its round trip minus the link's share;
- its queue: Triton's statistics extension where the server grants it, else
  this agent's own calls in flight;
- the link: RTT from empty calls, the uplink from a request carrying bytes to
  no model (refused once received), the downlink from real replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import grpc
import numpy as np

from edge_agent.offload import CloudNodeClient, NodeFailed, NodeState
from partitioner.profile import ModelProfile
from protos import codec
from protos import tandem_pb2 as pb
from protos.oip import DTYPES, datatype_or_none, messages, onnx_tensor, parse_suffix_name, services, typed_array
from runtimes.onnx_exec import OnnxModel

logger = logging.getLogger(__name__)

LINK_PROBE_MODEL = "tandem-link-probe"  # no server hosts it: the request is read whole, then refused
SPEED_SMOOTHING = 0.2                   # weight of one call's measured speed in the running estimate
SPEED_REBUILD_STEP = 0.1                # rebuild the node's predicted profile once its speed moves this much


@dataclass(frozen=True)
class Deployment:
    """What a server hosts of one of the device's models, each entry checked against the device's copy."""

    whole: str | None = None                                      # version serving the whole model, None: not hosted
    suffixes: dict[int, tuple[str, str]] = field(default_factory=dict)  # cut -> (model name, version)
    notes: tuple[str, ...] = ()                                   # entries refused, each with the reason
    by_tensors: dict[tuple[str, ...], int] = field(default_factory=dict)  # a cut's crossing tensors -> the cut

    @cached_property
    def cuts(self) -> frozenset[int]:
        return frozenset(({0} if self.whole is not None else set()) | set(self.suffixes))


def _compatible(dims: tuple[int | None, ...] | None, served: list[int]) -> bool:
    """Same rank, and every dimension equal where both sides fix it."""
    if dims is None:
        return True
    return len(dims) == len(served) and all(d is None or s < 0 or d == s for d, s in zip(dims, served))


def mismatch(expected: list[tuple[str, str | None, tuple[int | None, ...] | None]],
             served: list[messages.ModelMetadataResponse.TensorMetadata], kind: str) -> str:
    """Why ``served`` tensors are not ``expected`` (name, datatype, dims), or ''."""
    names = [name for name, _, _ in expected]
    got = {t.name: t for t in served}
    if sorted(got) != sorted(names):
        return f"its {kind}s are {sorted(got)}, the device's copy has {sorted(names)}"
    for name, datatype, dims in expected:
        tensor = got[name]
        if tensor.datatype != datatype:
            return f"{kind} {name!r} is {tensor.datatype} there, {datatype} on the device"
        if not _compatible(dims, list(tensor.shape)):
            return f"{kind} {name!r} has shape {list(tensor.shape)} there, {list(dims)} on the device"
    return ""


def _spec_tensors(specs) -> list[tuple[str, str | None, tuple[int | None, ...] | None]]:
    return [(spec.name, datatype_or_none(spec.dtype), spec.shape) for spec in specs]


def _boundary_tensors(model: OnnxModel, names) -> list[tuple[str, str | None, tuple[int | None, ...] | None]]:
    return [(name, *onnx_tensor(model.graph.boundary(name))) for name in names]


class OipNodeClient(CloudNodeClient):
    kind = "oip"
    probe_directions = (True,)  # the protocol has no way to ask for bytes back

    def __init__(self, address: str, *, models: Mapping[str, OnnxModel],
                 host_profile: Callable[[str], ModelProfile | None], api_key: str | None = None,
                 max_concurrency: int = 1, **kwargs) -> None:
        """``models``: the device's copies, to check the server's against.
        ``host_profile``: this host's measured profile of a model, which the
        node's predicted one is scaled from. ``max_concurrency``: the requests
        the server runs at once (its instance count), for the queue estimate."""
        super().__init__(address, **kwargs)
        self.stub = services.GRPCInferenceServiceStub(self._channel)
        self.models = models
        self.host_profile = host_profile
        self.max_concurrency = max_concurrency
        self._auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.deployments: dict[str, Deployment] = {}
        self._checked: dict[tuple[str, str, str], str] = {}  # (device digest, name, version) -> mismatch or ''
        self.speed = 1.0        # node time / this host's time for the same run
        self.speed_samples = 0
        self._predicted: dict[str, tuple[object, float, ModelProfile]] = {}  # model -> (host profile, speed, scaled)
        self.queue_source = "this agent's calls in flight (no statistics asked yet)"
        self._stats: dict[str, tuple[int, int, int]] = {}  # entry -> (requests, queue ns, compute ns) at the last refresh
        self._calls: dict[str, tuple[int, int]] = {}  # entry -> this agent's calls since then (all, at the profiled shape)
        self.speed_source = ""  # what measured the speed: statistics, or round trip minus the link
        self.queue_ms = 0.0

    # ------------------------------------------------------------ probing --

    async def _probe(self, request: pb.ProbeRequest, timeout_s: float) -> None:
        if not request.payload:
            await self.stub.ServerLive(messages.ServerLiveRequest(), timeout=timeout_s, metadata=self._auth)
            return
        probe = messages.ModelInferRequest(model_name=LINK_PROBE_MODEL, raw_input_contents=[request.payload])
        try:
            await self.stub.ModelInfer(probe, timeout=timeout_s, metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise
            # refused once the server had read it: the uplink carried every byte

    async def _probe_bandwidth(self) -> None:
        await super()._probe_bandwidth()
        estimator = self.estimator
        if estimator is not None and estimator.measured_up and not estimator.measured_down:
            estimator.downlink_mbps = estimator.uplink_mbps  # until replies measure it

    async def _fetch(self, timeout_s: float, *, measure_link: bool) -> NodeState | None:
        """Liveness and readiness, the link, what it hosts (checked against the
        device's copies) and its statistics; None when it is hung (marked down)."""
        rtt_ms = await self._rtt(timeout_s)
        if rtt_ms is None:
            return None
        ready = await self.stub.ServerReady(messages.ServerReadyRequest(), timeout=timeout_s, metadata=self._auth)
        if not ready.ready:
            self.mark_down("the server says it is not ready")
            return None
        server = await self.stub.ServerMetadata(messages.ServerMetadataRequest(), timeout=timeout_s, metadata=self._auth)
        await self._observe_link(rtt_ms, measure_link=measure_link)
        hosted = await self._hosted(timeout_s)
        self.deployments = {name: await self._deployment(model, hosted, timeout_s) for name, model in self.models.items()}
        await self._read_statistics(self.deployments, timeout_s)
        return NodeState(reachable=True, node_id=f"{server.name} {server.version}".strip(), load=self._load(),
                         models={name: pb.ModelInfo(name=name, digest=self.models[name].digest, kind="onnx")
                                 for name, deployment in self.deployments.items() if deployment.cuts})

    async def _hosted(self, timeout_s: float) -> dict[str, str] | None:
        """Ready models by name -> version from the repository index; None where the server keeps none."""
        try:
            index = await self.stub.RepositoryIndex(messages.RepositoryIndexRequest(ready=True), timeout=timeout_s,
                                                    metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED):
                return None
            raise
        return {entry.name: entry.version for entry in index.models if entry.state in ("", "READY")}

    async def _deployment(self, model: OnnxModel, hosted: dict[str, str] | None, timeout_s: float) -> Deployment:
        """The entries the server hosts for ``model`` that match the device's copy.
        Without an index only the whole model is looked for (by its metadata)."""
        if hosted is None:
            candidates = {model.name: ""}
        else:
            candidates = {name: version for name, version in hosted.items()
                          if name == model.name or (parse_suffix_name(name) or ("",))[0] == model.name}
        whole, suffixes, notes = None, {}, []
        for name, version in sorted(candidates.items()):
            cut = 0 if name == model.name else parse_suffix_name(name)[1]
            if cut and (model.graph is None or cut >= model.num_segments):
                notes.append(f"{name}: the device's copy has no chain cut {cut}")
                continue
            reason = await self._check(model, cut, name, version, timeout_s)
            if reason is None:
                continue  # not there after all (no index: the whole model is simply not hosted)
            if reason:
                notes.append(f"{name}: {reason}")
            elif cut:
                suffixes[cut] = (name, version)
            else:
                whole = version
        for note in notes:
            logger.warning("oip node %s: %s (not planned)", self.address, note)
        return Deployment(whole, suffixes, tuple(notes), {tuple(model.cut(k).tensors): k for k in suffixes})

    async def _check(self, model: OnnxModel, cut: int, name: str, version: str, timeout_s: float) -> str | None:
        """'' when the entry's metadata matches the device's copy, else why not; None: no such model."""
        key = (model.digest, name, version)
        if key in self._checked:
            return self._checked[key]
        try:
            meta = await self.stub.ModelMetadata(messages.ModelMetadataRequest(name=name, version=version),
                                                 timeout=timeout_s, metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise
        if cut:
            graph_cut = model.cut(cut)
            expected_in = _boundary_tensors(model, graph_cut.tensors)
            expected_out = _boundary_tensors(model, [o for o in model.graph.outputs if o not in graph_cut.edge_outputs])
        else:
            expected_in, expected_out = _spec_tensors(model.inputs), _spec_tensors(model.outputs)
        reason = mismatch(expected_in, list(meta.inputs), "input") or mismatch(expected_out, list(meta.outputs), "output")
        if not reason and version and meta.versions and version not in meta.versions:
            reason = f"version {version} is not among the versions it lists ({list(meta.versions)})"
        self._checked[key] = reason
        return reason

    async def _read_statistics(self, deployments: dict[str, Deployment], timeout_s: float) -> None:
        """Queue time per request since the last refresh, from the statistics
        extension (Triton's); servers that refuse it leave the in-flight count.
        Where every request an entry ran since then was one of this agent's at
        the shape this host profiled, its compute time measures the node's
        speed too (better than a round trip, which carries the link's noise)."""
        names = {name: (model, cut) for model, deployment in deployments.items()
                 for cut, (name, _) in deployment.suffixes.items()}
        names.update({model: (model, 0) for model, deployment in deployments.items() if deployment.whole is not None})
        if not names:
            return
        try:
            stats = await self.stub.ModelStatistics(messages.ModelStatisticsRequest(), timeout=timeout_s,
                                                    metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            self.queue_source = f"this agent's calls in flight (statistics refused: {exc.code().name})"
            return
        requests = queued_ns = 0
        now: dict[str, tuple[int, int, int]] = {}
        calls, self._calls = self._calls, {}
        for entry in stats.model_stats:
            if entry.name not in names:
                continue
            inference = entry.inference_stats
            count, queue_ns = inference.success.count, inference.queue.ns
            compute_ns = inference.compute_input.ns + inference.compute_infer.ns + inference.compute_output.ns
            before = self._stats.get(entry.name, (count, queue_ns, compute_ns))
            ran = count - before[0]
            requests += ran
            queued_ns += queue_ns - before[1]
            now[entry.name] = (count, queue_ns, compute_ns)
            ours, at_profile = calls.get(entry.name, (0, 0))
            if ran > 0 and ran == ours == at_profile:
                model, cut = names[entry.name]
                self._observe_speed(self.host_profile(model), cut, (compute_ns - before[2]) / ran / 1e6, "statistics")
        self._stats = now
        if requests > 0:
            self.queue_ms = queued_ns / requests / 1e6
        self.queue_source = "the statistics extension (mean queue time since the last refresh)"

    def _load(self) -> pb.NodeLoad:
        return pb.NodeLoad(in_flight=self.inflight, max_concurrency=self.max_concurrency, queue_delay_ms=self.queue_ms)

    # ------------------------------------------------------------ planning --

    def offered_cuts(self, model: str) -> frozenset[int]:
        deployment = self.deployments.get(model)
        return deployment.cuts if deployment is not None else frozenset()

    def profile(self, model: str, digest: str) -> ModelProfile | None:
        """This host's measured profile of ``model`` scaled by the node's speed:
        the same object while the speed stays within SPEED_REBUILD_STEP, so the
        agent's plan tables are not rebuilt per request."""
        copy = self.models.get(model)
        if copy is None or copy.digest != digest or not self.offered_cuts(model):
            return None
        host = self.host_profile(model)
        if host is None:
            return None
        known = self._predicted.get(model)
        if known is not None and known[0] is host and abs(known[1] - self.speed) <= SPEED_REBUILD_STEP * known[1]:
            return known[2]
        speed = self.speed
        scaled = replace(host, host=f"{self.address} (predicted: {host.host} x {speed:.2f})",
                         segment_ms=tuple(t * speed for t in host.segment_ms), run_overhead_ms=host.run_overhead_ms * speed,
                         whole_ms=host.whole_ms * speed)
        self._predicted[model] = (host, speed, scaled)
        return scaled

    def facts(self, model: str, digest: str) -> tuple[bool, str]:
        if not self.state.reachable:
            return False, f"unreachable: {self.state.error}"
        deployment = self.deployments.get(model, Deployment())
        refused = f" (refused: {'; '.join(deployment.notes)})" if deployment.notes else ""
        if not deployment.cuts:
            return False, f"hosts no entry matching the device's copy{refused}"
        if self.host_profile(model) is None:
            return False, "this host has no profile of it yet to scale"
        speed = (f"measured from {self.speed_samples} samples, last by {self.speed_source}" if self.speed_samples
                 else "assumed equal to this host's until a call measures it")
        return True, (f"compute: this host's profile x {self.speed:.2f} ({speed}); queue: {self.queue_source}; "
                      f"link: RTT from ServerLive, uplink from a {LINK_PROBE_MODEL} request, downlink "
                      f"{'from replies' if self.estimator and self.estimator.measured_down else 'assumed as the uplink'}"
                      f"{refused}")

    # ----------------------------------------------------------- execution --

    def call(self, method: str, request, *, timeout_s: float, metadata) -> object:
        return self._infer(method, request, timeout_s, metadata)

    async def _infer(self, method: str, request, timeout_s: float, metadata) -> pb.RunReply:
        """RunModel as ModelInfer of the whole model, RunPartition as ModelInfer
        of the suffix whose inputs are the cut's tensors; the reply in the
        pipeline's own message, its outputs raw (checked by the caller)."""
        deployment = self.deployments.get(request.model, Deployment())
        if method == "RunModel":
            cut, tensors = 0, request.inputs
            target = None if deployment.whole is None else (request.model, deployment.whole)
        else:
            tensors = request.tensors
            cut = deployment.by_tensors.get(tuple(request.cut))
            target = deployment.suffixes.get(cut) if cut is not None else None
        if target is None:
            raise NodeFailed(f"hosts no {'model ' + request.model if method == 'RunModel' else 'suffix for this cut'}")
        infer = messages.ModelInferRequest(model_name=target[0], model_version=target[1])
        for tensor in tensors:
            dtype = codec.pb_to_dtype(tensor.dtype)
            data = tensor.payload if tensor.encoding == pb.ENCODING_RAW else \
                codec.decode(tensor).astype(dtype.newbyteorder("<"), copy=False).tobytes()
            infer.inputs.add(name=tensor.name, datatype=datatype_or_none(dtype), shape=list(tensor.shape))
            infer.raw_input_contents.append(data)
        start = time.perf_counter()
        response = await self.stub.ModelInfer(infer, timeout=timeout_s, metadata=(*metadata, *self._auth))
        rpc_ms = (time.perf_counter() - start) * 1e3
        reply = pb.RunReply(outputs=self._outputs(response), node_id=self.state.node_id)
        reply.compute_ms = self._learn_speed(request.model, cut, target[0], tensors, rpc_ms, infer.ByteSize(),
                                             response.ByteSize())
        reply.load.CopyFrom(self._load())
        return reply

    @staticmethod
    def _outputs(response: messages.ModelInferResponse) -> list[pb.Tensor]:
        raw = list(response.raw_output_contents)
        if raw and len(raw) != len(response.outputs):
            raise NodeFailed(f"a reply with {len(raw)} raw contents for {len(response.outputs)} outputs")
        tensors = []
        for i, output in enumerate(response.outputs):
            dtype = DTYPES.get(output.datatype)
            if dtype is None:
                raise NodeFailed(f"output {output.name!r} is {output.datatype}, which no model here gives")
            shape = [int(d) for d in output.shape]
            try:
                data = raw[i] if raw else typed_array(f"output {output.name!r}", output.datatype, output.contents,
                                                      int(np.prod(shape))).tobytes()
            except ValueError as exc:
                raise NodeFailed(str(exc)) from None
            tensors.append(pb.Tensor(name=output.name, dtype=codec.dtype_to_pb(dtype), shape=shape, payload=data,
                                     encoding=pb.ENCODING_RAW))
        return tensors

    def _learn_speed(self, model: str, cut: int, entry: str, tensors, rpc_ms: float, up_bytes: int,
                     down_bytes: int) -> float:
        """The call's compute and queue time (its round trip minus the link's
        predicted share); where this host measured the same run (same cut,
        same shapes) and no statistics do better, what it says of the node's speed."""
        link = self.estimator.link() if self.estimator else None
        link_ms = 0.0 if link is None else (link.rtt_ms + up_bytes * 8 / (link.uplink_mbps * 1e3)
                                            + down_bytes * 8 / (link.downlink_mbps * 1e3))
        cloud_ms = max(rpc_ms - link_ms, 0.0)
        host = self.host_profile(model)
        at_profile = host is not None and cut < host.num_segments and \
            {t.name: tuple(t.shape) for t in tensors} == {m.name: tuple(m.shape) for m in host.crossings[cut]}
        ours, profiled = self._calls.get(entry, (0, 0))
        self._calls[entry] = (ours + 1, profiled + at_profile)
        if at_profile and self.speed_source != "statistics":
            self._observe_speed(host, cut, max(cloud_ms - self.queue_ms, 0.0), "round trip minus the link")
        return cloud_ms

    def _observe_speed(self, host: ModelProfile | None, cut: int, compute_ms: float, source: str) -> None:
        """One measured run of this host's profile from ``cut`` on, taken ``compute_ms`` there."""
        if host is None or cut >= host.num_segments:
            return
        host_ms = sum(host.segment_ms[cut:]) + host.run_overhead_ms
        if host_ms <= 0:
            return
        ratio = compute_ms / host_ms
        self.speed = ratio if not self.speed_samples else self.speed + SPEED_SMOOTHING * (ratio - self.speed)
        self.speed = min(max(self.speed, 0.01), 100.0)
        self.speed_samples += 1
        self.speed_source = source
