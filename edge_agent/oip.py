"""KServe v2 / Open Inference Protocol (OIP) for tensor models, on the
agent's gRPC port: what tritonclient, KServe's and Triton's clients speak.

The messages and stubs come from protos.oip (tritonclient's modules
generated from the official definition). A ModelInfer becomes an ``Ask`` and goes through
the agent's one pipeline (``EdgeAgentService.serve_tensors``): the same
admission, planner, fallback and metrics as Tandem's own Infer. The REST
form (``/v2`` in http_api) translates its JSON into these same messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from edge_agent.server import OBJECTIVE_BY_NAME, Ask, EdgeAgentService
from protos import tandem_pb2 as pb
from protos.oip import DTYPES, datatype_or_none, typed_array
from protos.oip import messages as oip
from protos.oip import services as oip_grpc
from runtimes.onnx_exec import InputError, OnnxModel
from runtimes.rpc import UnknownModel, abort_for, bounded
from runtimes.shared_memory import Lease, NotLocal, SharedMemory, peer_is_local

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "tandem-edge-agent"
EXTENSIONS = ("binary_tensor_data", "system_shared_memory", "parameters")
PLATFORM = "onnxruntime_onnx"  # what Triton reports for an ONNX model run by onnxruntime
VERSION = "1"  # the agent serves one version of each model

MAX_RANK = 32  # numpy's own limit is 64; no model here has more than a handful of dims
SHM_REGION, SHM_OFFSET, SHM_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


def datatype_of(dtype: np.dtype) -> str:
    name = datatype_or_none(dtype)
    if name is None:
        raise InputError(f"{dtype} has no Open Inference Protocol datatype")
    return name


def parameter(value: InferValue) -> oip.InferParameter:
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    if isinstance(value, int):
        return oip.InferParameter(int64_param=value)
    if isinstance(value, float):
        return oip.InferParameter(double_param=value)
    return oip.InferParameter(string_param=value)


def parameter_value(param: oip.InferParameter) -> InferValue:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else ""


InferValue = bool | int | float | str


def reply_parameters(reply: pb.InferReply) -> dict[str, InferValue]:
    """What Tandem did, for the reply's parameters: plan, node, fallback,
    predicted and measured ms (the same fields as Tandem's own InferReply)."""
    values: dict[str, InferValue] = {
        "tandem.plan": reply.plan.label, "tandem.planned": reply.planned.label, "tandem.node": reply.node,
        "tandem.fell_back": reply.fell_back, "tandem.reason": reply.reason,
        "tandem.measured_ms": reply.measured.total_ms,
    }
    if reply.HasField("predicted"):
        values["tandem.predicted_ms"] = reply.predicted.total_ms
    if reply.fell_back:
        values["tandem.fallback_reason"] = reply.fallback_reason
    return values


def tensor_metadata(specs) -> list[dict]:
    # a dynamic dimension is -1; a tensor of unknown rank has no shape to give
    return [{"name": spec.name, "datatype": datatype_of(spec.dtype),
             "shape": [-1 if d is None else d for d in spec.shape or ()]} for spec in specs]


def model_metadata(model: OnnxModel) -> dict:
    return {"name": model.name, "versions": [VERSION], "platform": PLATFORM,
            "inputs": tensor_metadata(model.inputs), "outputs": tensor_metadata(model.outputs)}


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def check_version(model: str, version: str) -> None:
    if version not in ("", VERSION):
        raise UnknownModel(f"model '{model}' has no version '{version}': the agent serves version {VERSION} only")


def checked_shape(name: str, dims) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_RANK:
        raise InputError(f"input '{name}' has {len(shape)} dimensions; at most {MAX_RANK} are taken")
    if any(d < 0 for d in shape):
        raise InputError(f"input '{name}' has a negative dimension in its shape {list(shape)}")
    return shape


def _from_contents(name: str, datatype: str, contents: oip.InferTensorContents, count: int) -> np.ndarray:
    try:
        return typed_array(f"input '{name}'", datatype, contents, count)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _array(data: bytes | np.ndarray, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.frombuffer(data, dtype).reshape(shape)
    if dtype.kind == "b" and array.size and np.frombuffer(data, np.uint8).max() > 1:
        raise InputError(f"input '{name}' is BOOL; its bytes hold values other than 0 and 1")
    return array


def _check_contents(tensor: oip.ModelInferRequest.InferInputTensor, via: str) -> None:
    if tensor.HasField("contents") and tensor.contents.ListFields():
        raise InputError(f"input '{tensor.name}' has both contents and {via}: one is taken")


@dataclass
class Decoded:
    """A ModelInferRequest read against its model: the feeds, and where each requested output goes."""

    feeds: dict[str, np.ndarray]
    outputs: list[str]  # the outputs to reply with, in order
    output_regions: dict[str, tuple[str, int, int]]  # output -> (region, offset, byte size)


def decode_request(request: oip.ModelInferRequest, model: OnnxModel, lease: Lease) -> Decoded:
    """The request's tensors as arrays, checked as Triton checks them: every
    name known, each datatype the model's, the bytes exactly the shape's, a
    region inside its bounds. Raw entries go, in order, to the inputs that
    name no shared-memory region (as tritonclient sends them)."""
    specs = {spec.name: spec for spec in model.inputs}
    in_memory = [t for t in request.inputs if SHM_REGION not in t.parameters]
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(in_memory):
        raise InputError(f"the request has {len(raw)} raw_input_contents for {len(in_memory)} inputs not in shared "
                         "memory: raw contents are for all of them or none")
    raw_of = dict(zip((t.name for t in in_memory), raw)) if raw else {}
    feeds: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        name = tensor.name
        if name in feeds:
            raise InputError(f"input '{name}' is given more than once")
        spec = specs.get(name)
        if spec is None:
            raise InputError(f"unexpected inference input '{name}' for model '{model.name}'")
        expected = datatype_of(spec.dtype)
        if tensor.datatype != expected:
            raise InputError(f"inference input '{name}' data-type is '{tensor.datatype}', but model '{model.name}' "
                             f"expects '{expected}'")
        shape = checked_shape(name, tensor.shape)
        dtype = DTYPES[tensor.datatype]
        nbytes = math.prod(shape) * dtype.itemsize
        if SHM_REGION in tensor.parameters:
            _check_contents(tensor, "a shared-memory region")
            region, offset, size = _region_of(f"input '{name}'", tensor.parameters, lease)
            if size != nbytes:
                raise InputError(f"input '{name}' names {size} bytes of shared memory; shape {list(shape)} of "
                                 f"{tensor.datatype} is {nbytes}")
            feeds[name] = _array(lease.read(region, offset, size, f"input '{name}'"), dtype, shape, name)
        elif raw_of:
            _check_contents(tensor, "raw_input_contents")
            data = raw_of[name]
            if len(data) != nbytes:
                raise InputError(f"input '{name}' has {len(data)} bytes of raw contents; shape {list(shape)} of "
                                 f"{tensor.datatype} is {nbytes}")
            feeds[name] = _array(data, dtype, shape, name)
        else:
            feeds[name] = _from_contents(name, tensor.datatype, tensor.contents, math.prod(shape)).reshape(shape)
    names = [spec.name for spec in model.outputs]
    outputs, output_regions = [], {}
    for wanted in request.outputs:
        if wanted.name not in names:
            raise InputError(f"unexpected inference output '{wanted.name}' for model '{model.name}'")
        if wanted.name in outputs:
            raise InputError(f"output '{wanted.name}' is requested more than once")
        outputs.append(wanted.name)
        if SHM_REGION in wanted.parameters:
            output_regions[wanted.name] = _region_of(f"output '{wanted.name}'", wanted.parameters, lease)
    return Decoded(feeds, outputs or names, output_regions)


def _region_of(what: str, parameters: Mapping[str, oip.InferParameter], lease: Lease) -> tuple[str, int, int]:
    region = parameter_value(parameters[SHM_REGION])
    offset = parameter_value(parameters[SHM_OFFSET]) if SHM_OFFSET in parameters else 0
    if SHM_SIZE not in parameters:
        raise InputError(f"{what} names region '{region}' without {SHM_SIZE}")
    size = parameter_value(parameters[SHM_SIZE])
    if not isinstance(region, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)):
        raise InputError(f"{what}: {SHM_REGION} is a string, {SHM_OFFSET} and {SHM_SIZE} integers")
    lease.take(region, offset, size, what)
    return region, offset, size


class Exchange:
    """One ModelInfer, from its request to its response, whichever transport
    carried it: what decoding finds (the outputs asked for, the regions they
    go to) is what the response needs."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.request: oip.ModelInferRequest | None = None
        self.decoded: Decoded | None = None

    def ask(self, request: oip.ModelInferRequest) -> Ask:
        """The pipeline's view of the request; its tensors are read once the model is known."""
        check_version(request.model_name, request.model_version)
        params = {key: parameter_value(value) for key, value in request.parameters.items()}
        plan, objective = params.get("tandem.plan", ""), params.get("tandem.objective", "")
        if not isinstance(plan, str) or not isinstance(objective, str):
            raise InputError("the parameters tandem.plan and tandem.objective are strings")
        if objective and objective not in OBJECTIVE_BY_NAME:
            raise InputError(f"tandem.objective must be one of {sorted(OBJECTIVE_BY_NAME)}, got '{objective}'")
        self.request = request
        return Ask(request.model_name, self._feeds, plan=plan,
                   objective=OBJECTIVE_BY_NAME.get(objective, pb.OBJECTIVE_UNSPECIFIED))

    def _feeds(self, model: OnnxModel) -> dict[str, np.ndarray]:
        self.decoded = decode_request(self.request, model, self.lease)
        return self.decoded.feeds

    def response(self, outputs: dict[str, np.ndarray], reply: pb.InferReply) -> oip.ModelInferResponse:
        """Outputs raw, in the order asked (or the model's); those bound for a
        region are written there and keep an empty raw entry, so each output's
        raw contents are at its own index (how tritonclient reads them)."""
        request, decoded = self.request, self.decoded
        response = oip.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
        for key, value in reply_parameters(reply).items():
            response.parameters[key].CopyFrom(parameter(value))
        for name in decoded.outputs:
            array = np.ascontiguousarray(outputs[name])
            tensor = response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            if name in decoded.output_regions:
                region, offset, size = decoded.output_regions[name]
                self.lease.write(region, offset, size, array, f"output '{name}'")
                tensor.parameters[SHM_REGION].string_param = region
                tensor.parameters[SHM_SIZE].int64_param = array.nbytes
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        return response


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """OIP over gRPC. RPCs the agent has no counterpart for (repository
    control, CUDA memory, tracing settings) stay UNIMPLEMENTED, as the
    generated base class answers."""

    def __init__(self, service: EdgeAgentService, regions: SharedMemory, version: str) -> None:
        self.service = service
        self.regions = regions
        self.version = version

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self._model(request.name, request.version) is not None)

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(**server_metadata(self.version))

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, bounded(f"unknown model '{request.name}' (version "
                                                                    f"'{request.version}')"))
        meta = model_metadata(model)
        return oip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[oip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[oip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    def _model(self, name: str, version: str) -> OnnxModel | None:
        if version not in ("", VERSION):
            return None
        return self.service.store.models.get(name)

    async def ModelInfer(self, call, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        try:
            with self.regions.lease(local=peer_is_local(context.peer())) as lease:
                exchange = Exchange(lease)
                outputs, reply = await self.service.serve_tensors(
                    f"{SERVICE}/ModelInfer", call, exchange.ask, context.time_remaining, context.invocation_metadata())
                return exchange.response(outputs, reply)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status; the agent stays up
            await abort_for(context, exc)

    async def SystemSharedMemoryRegister(self, request: oip.SystemSharedMemoryRegisterRequest, context
                                         ) -> oip.SystemSharedMemoryRegisterResponse:
        try:
            if not peer_is_local(context.peer()):
                raise NotLocal("shared memory is for apps on this device; this caller is not")
            self.regions.register(request.name, request.key, request.offset, request.byte_size)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        return oip.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request: oip.SystemSharedMemoryStatusRequest, context
                                       ) -> oip.SystemSharedMemoryStatusResponse:
        try:
            regions = self.regions.status(request.name)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        response = oip.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region.name].CopyFrom(oip.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size))
        return response

    async def SystemSharedMemoryUnregister(self, request: oip.SystemSharedMemoryUnregisterRequest, context
                                           ) -> oip.SystemSharedMemoryUnregisterResponse:
        try:
            self.regions.unregister(request.name)
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        return oip.SystemSharedMemoryUnregisterResponse()


