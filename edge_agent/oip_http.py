"""The Open Inference Protocol's REST form (``/v2``) on the agent's HTTP port.

A JSON request (with the binary tensor extension: a JSON header of
``Inference-Header-Content-Length`` bytes, then each binary input's bytes in
order) is translated into the gRPC form's ModelInferRequest and runs through
the same ``oip.Exchange``; the response is translated back. So both forms
check tensors and regions in one place, and run through one pipeline.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from aiohttp import web

from edge_agent import oip
from edge_agent.oip import DTYPES, SHM_REGION
from edge_agent.oip import oip as pb_oip
from runtimes import shared_memory
from runtimes.onnx_exec import InputError
from runtimes.shared_memory import NotLocal, SharedMemory

HEADER_LENGTH = "Inference-Header-Content-Length"
# which JSON number kinds each datatype's kind takes: no bool for a number, no
# fraction for an integer (numpy would truncate it without a word)
JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_parameter(key: str, value: Any) -> pb_oip.InferParameter:
    if isinstance(value, bool | int | float | str):
        return oip.parameter(value)
    raise InputError(f"parameter '{key}' must be a string, number or boolean")


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object")
    return value


def json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 is a ValueError too; nesting too deep, a RecursionError
        raise InputError(f"the request is not valid JSON: {exc}") from None
    return _object(doc, "the request")


def json_tensor_bytes(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> bytes:
    """A JSON ``data`` list (flat or nested, row-major) as the tensor's raw bytes, refused
    rather than converted when a value does not fit the datatype."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"input '{name}' is {datatype}, which Tandem's models do not take")
    if data is None:
        raise InputError(f"input '{name}' has no data, binary_data_size or shared-memory region")
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InputError(f"input '{name}': data is not a regular array: {exc}") from None
    if array.size and array.dtype.kind not in JSON_KINDS[dtype.kind]:
        held = {"b": "booleans", "i": "integers", "u": "integers", "f": "fractions"}.get(array.dtype.kind, "non-numbers")
        raise InputError(f"input '{name}' is {datatype}; its data holds {held}")
    if array.size != math.prod(shape):
        raise InputError(f"input '{name}' has {array.size} values in data; shape {list(shape)} holds {math.prod(shape)}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"input '{name}' has values outside {datatype}'s range")
    return array.astype(dtype).tobytes()


def request_from_json(body: bytes, header_length: str | None, model: str, version: str) -> pb_oip.ModelInferRequest:
    """A REST infer body as the gRPC request it means."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InputError(f"{HEADER_LENGTH} is {header_length[:40]!r}, for a body of {len(body)} bytes")
        header, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    doc = json_object(header)
    request = pb_oip.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    for key, value in _object(doc.get("parameters"), "parameters").items():
        request.parameters[key].CopyFrom(json_parameter(key, value))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("the request needs a list of inputs")
    position = 0
    for entry in inputs:
        entry = _object(entry, "each input")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InputError("each input needs a name and a datatype (strings)")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise InputError(f"input '{name}' needs a shape (a list of integers)")
        dims = oip.checked_shape(name, shape)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=dims)
        params = _object(entry.get("parameters"), f"the parameters of input '{name}'")
        for key, value in params.items():
            if key != "binary_data_size":
                tensor.parameters[key].CopyFrom(json_parameter(key, value))
        if SHM_REGION in params:
            continue
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not _is_int(size) or size < 0 or position + size > len(binary):
                raise InputError(f"input '{name}' claims binary_data_size {size!r}; {len(binary) - position} bytes "
                                 "of binary data are left")
            request.raw_input_contents.append(bytes(binary[position:position + size]))
            position += size
        else:
            request.raw_input_contents.append(json_tensor_bytes(name, datatype, dims, entry.get("data")))
    if position != len(binary):
        raise InputError(f"{len(binary)} bytes of binary data follow the JSON header; the inputs claim {position}")
    for entry in doc.get("outputs") or []:
        entry = _object(entry, "each output")
        if not isinstance(entry.get("name"), str):
            raise InputError("each output needs a name")
        wanted = request.outputs.add(name=entry["name"])
        for key, value in _object(entry.get("parameters"), f"the parameters of output '{entry['name']}'").items():
            wanted.parameters[key].CopyFrom(json_parameter(key, value))
    return request


def _wants_binary(request: pb_oip.ModelInferRequest, name: str) -> bool:
    default = oip.parameter_value(request.parameters["binary_data_output"]) is True \
        if "binary_data_output" in request.parameters else False
    for wanted in request.outputs:
        if wanted.name == name and "binary_data" in wanted.parameters:
            return oip.parameter_value(wanted.parameters["binary_data"]) is True
    return default


def response_to_json(request: pb_oip.ModelInferRequest, response: pb_oip.ModelInferResponse,
                     parameters: dict[str, oip.InferValue]) -> web.Response:
    """The REST reply: outputs as JSON data, or binary after the JSON header where asked."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                           "parameters": parameters, "outputs": []}
    if response.id:
        doc["id"] = response.id
    chunks: list[bytes] = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if SHM_REGION in tensor.parameters:
            entry["parameters"] = {key: oip.parameter_value(value) for key, value in tensor.parameters.items()}
        elif _wants_binary(request, tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, DTYPES[tensor.datatype]).tolist()
        doc["outputs"].append(entry)
    header = json.dumps(doc).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=b"".join([header, *chunks]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


class Body:
    """A REST infer request still unread, as the pipeline's admission wants it (``read``, ``size``)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.size = 0

    async def read(self) -> pb_oip.ModelInferRequest:
        body = await self._request.read()
        self.size = len(body)
        match = self._request.match_info
        return request_from_json(body, self._request.headers.get(HEADER_LENGTH), match["model"],
                                 match.get("version", ""))


def peer_is_local(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):
        return True  # a unix socket
    return shared_memory.peer_is_local(f"ipv{'6' if ':' in peer[0] else '4'}:{peer[0]}:{peer[1]}")


class InferenceRoutes:
    """``/v2``: health, metadata, infer and system shared memory, as KServe and Triton serve them."""

    def __init__(self, service, regions: SharedMemory, version: str) -> None:
        self.service = service  # EdgeAgentService
        self.regions = regions
        self.version = version

    def add_to(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.live)
        get("/v2", self.server)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self.model)
            get(f"{base}/ready", self.model_ready)
            post(f"{base}/infer", self.infer)
        get("/v2/systemsharedmemory/status", self.shm_status)
        get("/v2/systemsharedmemory/region/{region}/status", self.shm_status)
        post("/v2/systemsharedmemory/region/{region}/register", self.shm_register)
        post("/v2/systemsharedmemory/unregister", self.shm_unregister)
        post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def server(self, request: web.Request) -> web.Response:
        return web.json_response(oip.server_metadata(self.version))

    def _model(self, request: web.Request):
        name, version = request.match_info["model"], request.match_info.get("version", "")
        oip.check_version(name, version)
        return self.service.store.get(name)

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(oip.model_metadata(self._model(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)  # an unknown model is a 404
        return web.json_response({"name": request.match_info["model"], "ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        with self.regions.lease(local=peer_is_local(request)) as lease:
            exchange = oip.Exchange(lease)
            headers = {key.lower(): value for key, value in request.headers.items()}
            outputs, reply = await self.service.serve_tensors(
                f"POST {request.path}", Body(request), exchange.ask, lambda: None, list(headers.items()),
                label="ModelInfer")
            response = exchange.response(outputs, reply)
            return response_to_json(exchange.request, response, oip.reply_parameters(reply))

    async def shm_status(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                                  for r in self.regions.status(request.match_info.get("region", ""))])

    async def shm_register(self, request: web.Request) -> web.Response:
        if not peer_is_local(request):
            raise NotLocal("shared memory is for apps on this device; this caller is not")
        doc = json_object(await request.read())
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str) or not _is_int(offset) or not _is_int(size):
            raise InputError("registering a region takes key (a string), offset and byte_size (integers)")
        self.regions.register(request.match_info["region"], key, offset, size)
        return web.json_response({})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.regions.unregister(request.match_info.get("region", ""))
        return web.json_response({})
