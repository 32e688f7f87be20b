"""The agent's HTTP port: the OpenAI-compatible API (``/v1``), health, and
optional bearer keys, served by aiohttp inside the agent's own event loop.

aiohttp rather than an ASGI server: its ``AppRunner``/``SockSite`` are made to
be embedded in a loop someone else owns (uvicorn wants to own the loop's
lifetime and signals, which the agent's gRPC server and SIGHUP handling
already do), it parses HTTP with llhttp in C, streams with ``StreamResponse``,
and with ``handler_cancellation`` cancels a handler whose client went away,
which is how a dropped stream frees its generation slot.
"""

from __future__ import annotations

import hmac
import logging
import math
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from edge_agent import oip, openai_api
from edge_agent.oip_http import InferenceRoutes
from edge_agent.server import OBJECTIVE_BY_NAME
from protos import tandem_pb2 as pb
from runtimes import tracing
from runtimes.admission import Overloaded, TooLarge
from runtimes.model_store import decode_all
from runtimes.rpc import bounded, status_for
from runtimes.shared_memory import RegionExists, RegionInUse, SharedMemory

logger = logging.getLogger(__name__)

# The HTTP status for each status the pipeline's errors map to (rpc.status_for),
# as KServe's and OpenAI's servers use them.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 503,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error",
               429: "rate_limit_error"}


# health probes (a supervisor's, Kubernetes') need no key
UNAUTHENTICATED = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})


def is_inference_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class ApiKeys:
    """Bearer keys from a file, one per line (# comments); none: no auth."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = keys

    @classmethod
    def load(cls, path: Path | None) -> "ApiKeys":
        if path is None:
            return cls(frozenset())
        lines = (line.strip() for line in path.read_text().splitlines())
        keys = frozenset(line for line in lines if line and not line.startswith("#"))
        if not keys:
            raise ValueError(f"http_api_keys_file {path} holds no key: every request would be refused")
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def admits(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        # every key compared, in constant time each: how many matched bytes leaks nothing
        return any([hmac.compare_digest(key.strip().encode(), k.encode()) for k in self._keys])


def error_status(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, message, extra headers) for an error of the pipeline."""
    if isinstance(exc, openai_api.BadRequest):
        return 400, str(exc), {}
    if isinstance(exc, web.HTTPException):
        return exc.status, exc.reason if exc.text is None or exc.status == 413 else exc.text, {}
    if isinstance(exc, TooLarge):
        return 413, str(exc), {}
    if isinstance(exc, (RegionExists, RegionInUse)):
        return 409, str(exc), {}
    code, message = status_for(exc)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1e3)))
    return HTTP_STATUS.get(code, 500), bounded(message), headers


def deferred_json(result: pb.DeferredResult) -> dict[str, Any]:
    """A deferred request as JSON: a generation's text and usage, or a tensor
    request's outputs as KServe v2 JSON tensors, with what Tandem did."""
    reply: dict[str, Any] = {"id": result.id, "object": "tandem.deferred", "state": result.state,
                             "attempts": result.attempts}
    if result.state == "failed":
        status = HTTP_STATUS.get(grpc.StatusCode.__members__.get(result.error_code), 500)
        reply["error"] = openai_error(status, result.error)["error"] | {"code": result.error_code}
    elif result.HasField("generate"):
        summary = result.generate.summary
        reply["result"] = {"text": result.generate.text, "finish_reason": summary.finish_reason,
                           "usage": openai_api.usage(summary), "tandem": openai_api.tandem_facts(summary)}
    elif result.HasField("infer"):
        outputs = decode_all(result.infer.outputs)
        reply["result"] = {"outputs": [{"name": name, "datatype": oip.datatype_of(array.dtype), "shape": list(array.shape),
                                        "data": array.ravel().tolist()} for name, array in outputs.items()],
                           "tandem": oip.reply_parameters(result.infer)}
    return reply


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    code = "model_not_found" if status == 404 else "invalid_api_key" if status == 401 else None
    return {"error": {"message": message, "type": OPENAI_TYPE.get(status, "server_error"), "param": param, "code": code}}


def openai_error_event(exc: BaseException) -> dict[str, Any]:
    status, message, _ = error_status(exc)
    return openai_error(status, message)


def bind_socket(listen: str) -> socket.socket:
    """A listening TCP socket for HOST:PORT (port 0: any free port; [::1] for IPv6)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"http_listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class HttpApi:
    """Routes HTTP requests to the agent's one pipeline: a frontend translates, and nothing else."""

    def __init__(self, service, *, keys: ApiKeys, max_body_bytes: int, regions: SharedMemory, version: str) -> None:
        self.service = service  # EdgeAgentService
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.inference = InferenceRoutes(service, regions, version)
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.max_body_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/tandem/requests/{id}", self.deferred)
        self.inference.add_to(app)
        return app

    async def start(self, listen: str) -> str:
        """Serve on ``listen``; returns the base URL."""
        sock = bind_socket(listen)
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, shutdown_timeout=1.0).start()
        host, port = sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---------------------------------------------------------- middleware --

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Every failure becomes an error object with its status; the agent stays up."""
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 -- each kind has its status (error_status)
            status, message, headers = error_status(exc)
            if status >= 500 and not isinstance(exc, web.HTTPException):
                logger.warning("%s %s: %s", request.method, request.path, message)
            if is_inference_path(request.path):  # KServe's and Triton's error body
                return web.json_response({"error": message}, status=status, headers=headers)
            param = exc.param if isinstance(exc, openai_api.BadRequest) else None
            return web.json_response(openai_error(status, message, param), status=status, headers=headers)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.keys.required and request.path not in UNAUTHENTICATED and not self.keys.admits(request.headers.get("Authorization")):
            message = "a valid API key is needed: Authorization: Bearer KEY"
            body = {"error": message} if is_inference_path(request.path) else openai_error(401, message)
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # -------------------------------------------------------------- routes --

    async def health(self, request: web.Request) -> web.Response:
        cloud = self.service.cloud_fields()
        return web.json_response({"status": "ok", "models": sorted(self.service.store.models),
                                  "llms": sorted(self.service.generator.served_models()),
                                  "cloud": {"state": cloud["connectivity"], "reason": cloud["connectivity_reason"]},
                                  "deferred": {"pending": cloud["deferred_pending"],
                                               "oldest_age_s": cloud["deferred_oldest_age_s"]}})

    async def models(self, request: web.Request) -> web.Response:
        generator = self.service.generator
        served = generator.served_models()
        tiers = [{"id": openai_api.TIER_PREFIX + tier, "object": "model", "created": 0, "owned_by": "tandem",
                  "tandem": {"tier": tier, "model": generator.model_for_tier(tier)[0]}}
                 for tier in ("device", "cloud", "auto") if generator.offers_tier(tier)]
        return web.json_response({"object": "list", "data": [
            *({"id": name, "object": "model", "created": 0, "owned_by": "tandem",
               "tandem": {"on_device": name in generator.llms.engines, "nodes": nodes}}
              for name, nodes in sorted(served.items())), *tiers]})

    async def deferred(self, request: web.Request) -> web.Response:
        """A deferred request's state, and its result once it has one; ``?wait=S``
        waits up to S seconds for it to end."""
        try:
            wait_s = float(request.query.get("wait", "0"))
        except ValueError:
            raise openai_api.BadRequest("wait: seconds, a number", "wait") from None
        if not 0 <= wait_s < float("inf"):
            raise openai_api.BadRequest("wait: seconds, 0 or more", "wait")
        return web.json_response(deferred_json(await self.service.deliveries.result(request.match_info["id"], wait_s)))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai_api.ChatRequest)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai_api.CompletionRequest)

    async def _complete(self, request: web.Request, kind) -> web.StreamResponse:
        body = openai_api.parse(kind, await request.read())
        objective = OBJECTIVE_BY_NAME.get(body.tandem.objective or "", pb.OBJECTIVE_UNSPECIFIED)
        generate = openai_api.generate_request(body, objective)
        if not generate.max_tokens:  # OpenAI's default: as many as the context leaves
            generate.max_tokens = self.service.generator.room(generate)
        if body.tandem.defer:
            deferral = await self.service.deliveries.submit(pb.DeferRequest(
                generate=generate, deliver_by_unix_s=body.tandem.deliver_by,
                idempotency_key=body.tandem.idempotency_key or uuid.uuid4().hex))
            return web.json_response({"id": deferral.id, "object": "tandem.deferred", "created": deferral.created,
                                      "state": deferral.state, "url": f"/v1/tandem/requests/{deferral.id}"},
                                     status=202 if deferral.created else 200)
        headers = {key.lower(): value for key, value in request.headers.items()}
        with tracing.serving(f"POST {request.path}", list(headers.items()), **{"gen_ai.request.model": body.model}):
            generation = await self.service.generation(generate)
            return await openai_api.respond(request, body, generation, openai_error_event)
