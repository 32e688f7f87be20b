"""The OpenAI-compatible frontend: chat and text completions, whole or
streamed as server-sent events, translated to and from the agent's one
generation pipeline (``EdgeAgentService.generation``). No planning here.

Request bodies are validated by pydantic models (what vLLM's and llama.cpp
server's OpenAI layers use too), so a bad parameter gets a 400 that names it.
Parameters that would change the answer and that the pipeline does not
implement (n > 1, penalties, tools, JSON mode) are refused, never ignored.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.generation import Generation
from protos import tandem_pb2 as pb
from runtimes.llm import MAX_TOP_LOGPROBS
from runtimes.llm_serving import MAX_STOP_STRINGS

# OpenAI's legacy completions API bounds its integer ``logprobs`` at 5.
MAX_COMPLETION_LOGPROBS = 5
PLAN_NAMES = {pb.PLAN_LOCAL: "local", pb.PLAN_REMOTE: "remote", pb.PLAN_SPLIT: "speculative"}
# A model id that names a tier instead (GenerateRequest.tier): "tier:device", "tier:cloud", "tier:auto".
TIER_PREFIX = "tier:"


class BadRequest(ValueError):
    """A request the OpenAI API answers 400, naming the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    # Unknown keys are ignored as OpenAI's own server does for ones it has
    # retired (``user``, ``metadata``...); strict: "0.5" is not a number.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TandemOptions(_Body):
    """What the openai client's ``extra_body={"tandem": {...}}`` sends."""
    plan: str = ""                                   # "local", "remote" or "remote@HOST:PORT"
    objective: Literal["latency", "energy", "weighted"] | None = None
    defer: bool = False                              # store it and run it when a node can take it
    deliver_by: float | None = Field(default=None, allow_inf_nan=False)  # unix time it must have run by
    idempotency_key: str = ""                        # the same key twice is one request (default: a new one)

    @model_validator(mode="after")
    def _deferral(self):
        if self.defer and self.deliver_by is None:
            raise ValueError("tandem.deliver_by: a deferred request needs one (unix seconds)")
        if not self.defer and (self.deliver_by is not None or self.idempotency_key):
            raise ValueError("tandem.deliver_by: only with tandem.defer = true")
        return self


class _Generation(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default is 1, not greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tandem: TandemOptions = TandemOptions()

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError(f"n: only one choice per request is served, got n = {self.n}")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty: penalties are not supported; leave presence_penalty and "
                             "frequency_penalty at 0")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: needs stream = true")
        if self.tandem.defer and self.stream:
            raise ValueError("stream: a deferred request is not streamed; fetch /v1/tandem/requests/{id} instead")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or text parts (other kinds are refused)."""
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages: only text content parts are served, got a {part.get('type')!r} part",
                                 "messages")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError(f"response_format: {self.response_format.get('type')!r} is not supported, only text")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs = true")
        return self


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request is served, got a list of "
                                 f"{len(self.prompt)}")
        if self.echo or self.suffix or (self.best_of or 1) != 1:
            raise ValueError("echo: echo, suffix and best_of are not supported")
        return self


def parse(model: type[_Body], body: bytes) -> Any:
    """The request body as ``model``, or BadRequest naming what is wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
        if error["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {error['msg']}") from None
        message = error["msg"].removeprefix("Value error, ")
        if not where:  # a check across fields: its message starts with the parameter's name
            named = message.partition(":")[0]
            raise BadRequest(message, named if named in model.model_fields else None) from None
        raise BadRequest(f"{where}: {message}", where.split(".")[0]) from None


def generate_request(body: ChatRequest | CompletionRequest, objective: int) -> pb.GenerateRequest:
    """The pipeline's request for an OpenAI body. A seed is drawn when none is
    given and sampling is random, as OpenAI's own server does; a deferred
    request's comes from its idempotency key, so a retry is the same request."""
    if body.seed is not None:
        seed = body.seed
    elif body.tandem.defer and body.tandem.idempotency_key:
        seed = zlib.crc32(body.tandem.idempotency_key.encode())
    else:
        seed = secrets.randbits(32)
    tier = body.model.removeprefix(TIER_PREFIX) if body.model.startswith(TIER_PREFIX) else ""
    request = pb.GenerateRequest(model="" if tier else body.model, tier=tier, temperature=body.temperature,
                                 top_p=body.top_p, seed=seed & 0xFFFFFFFF, stop=body.stops(), plan=body.tandem.plan,
                                 objective=objective)
    if isinstance(body, ChatRequest):
        request.messages.extend(pb.ChatMessage(role=m.role, content=m.text()) for m in body.messages)
        request.max_tokens = body.max_completion_tokens or body.max_tokens or 0
        request.logprobs, request.top_logprobs = body.logprobs, body.top_logprobs or 0
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            request.prompt_token_ids.extend(prompt)
        else:
            request.prompt = prompt if isinstance(prompt, str) else prompt[0]
        request.max_tokens = body.max_tokens or 0
        if body.logprobs is not None:
            request.logprobs, request.top_logprobs = True, body.logprobs
    return request


def tandem_facts(summary: pb.GenerateSummary) -> dict[str, Any]:
    """What Tandem did, in the ``tandem`` object clients ignore."""
    return {
        "plan": PLAN_NAMES.get(summary.ran, ""), "planned": PLAN_NAMES.get(summary.planned, ""),
        "node": summary.node, "fell_back": summary.switched, "reason": summary.reason, "model": summary.model,
        **({"tier": summary.tier, "escalated": summary.escalated, "confidence": summary.confidence,
            "threshold": summary.threshold} if summary.tier == "auto" else {}),
        **({"switched_at_token": summary.switched_at_token, "switch_reason": summary.switch_reason}
           if summary.switched else {}),
        "predicted": {"ttft_ms": summary.predicted_ttft_ms, "total_ms": summary.predicted_total_ms,
                      "energy_j": summary.predicted_energy_j},
        "measured": {"ttft_ms": summary.ttft_ms, "total_ms": summary.total_ms, "queue_ms": summary.queue_ms,
                     "tokens_per_s": summary.tokens_per_s},
    }


def header_text(text: str) -> str:
    """A value safe in an HTTP header (latin-1, one line)."""
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:500]


def planned_headers(generation: Generation) -> dict[str, str]:
    """What is known before the first token: the plan and its prediction."""
    predicted = generation.predicted
    return {"x-tandem-planned": PLAN_NAMES.get(predicted["planned"], ""), "x-tandem-planned-node": generation.node,
            "x-tandem-predicted-ms": f"{predicted['predicted_total_ms']:.1f}"}


def done_headers(summary: pb.GenerateSummary) -> dict[str, str]:
    return {"x-tandem-plan": PLAN_NAMES.get(summary.ran, ""), "x-tandem-node": summary.node,
            "x-tandem-fell-back": str(summary.switched).lower(), "x-tandem-measured-ms": f"{summary.total_ms:.1f}",
            "x-tandem-reason": header_text(summary.reason)}


def usage(summary: pb.GenerateSummary) -> dict[str, int]:
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens}


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprobs(tokens: list[pb.TokenChunk]) -> dict[str, Any]:
    return {"content": [{
        "token": _token_text(t.piece), "logprob": t.logprob, "bytes": list(t.piece),
        "top_logprobs": [{"token": _token_text(o.piece), "logprob": o.logprob, "bytes": list(o.piece)}
                         for o in t.top_logprobs],
    } for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[pb.TokenChunk], offset: int) -> dict[str, Any]:
    """The legacy completions form; ``offset``: characters of text before these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [_token_text(t.piece) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(o.piece): o.logprob for o in t.top_logprobs} for t in tokens],
            "text_offset": offsets}


class Reply:
    """One completion's OpenAI objects, whole or as stream chunks."""

    def __init__(self, body: ChatRequest | CompletionRequest, model: str) -> None:
        self.chat = isinstance(body, ChatRequest)
        self.logprobs = bool(body.logprobs) if self.chat else body.logprobs is not None
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.text_offset = 0

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def _logprobs(self, tokens: list[pb.TokenChunk]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(tokens) if self.chat else completion_logprobs(tokens, self.text_offset)

    def whole(self, tokens: list[pb.TokenChunk], summary: pb.GenerateSummary) -> dict[str, Any]:
        text = "".join(t.text for t in tokens)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "finish_reason": summary.finish_reason, "logprobs": self._logprobs(tokens)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": summary.finish_reason, "logprobs": self._logprobs(tokens)}
        reply = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**reply, "usage": usage(summary), "tandem": tandem_facts(summary)}

    def chunk(self, token: pb.TokenChunk | None, summary: pb.GenerateSummary | None = None, *,
              first: bool = False) -> dict[str, Any]:
        """A stream chunk for one token, or the closing one (``summary``)."""
        tokens = [token] if token is not None else []
        finish = summary.finish_reason if summary is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if token is not None:
                delta["content"] = token.text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": self._logprobs(tokens) if tokens else None}
        else:
            choice = {"index": 0, "text": token.text if token else "", "finish_reason": finish,
                      "logprobs": self._logprobs(tokens) if tokens else None}
        if token is not None:
            self.text_offset += len(token.text)
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if summary is not None:
            chunk["tandem"] = tandem_facts(summary)
        return chunk

    def usage_chunk(self, summary: pb.GenerateSummary) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []), "usage": usage(summary)}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def respond(request: web.Request, body: ChatRequest | CompletionRequest, generation: Generation,
                  error_payload) -> web.StreamResponse:
    """Stream or return ``generation``. The first chunk is awaited before any
    header is sent, so a full queue still gets its 429; an error after that
    ends the stream with an OpenAI error event (``error_payload(exc)``)."""
    reply = Reply(body, body.model)
    async with contextlib.aclosing(generation):
        chunks: AsyncIterator[pb.GenerateChunk] = aiter(generation)
        first = await anext(chunks)
        if not body.stream:
            tokens, summary = [], None
            async for chunk in _with_first(first, chunks):
                if chunk.HasField("token"):
                    tokens.append(chunk.token)
                else:
                    summary = chunk.done
            return web.json_response(reply.whole(tokens, summary), headers={**planned_headers(generation),
                                                                            **done_headers(summary)},
                                     dumps=lambda obj: json.dumps(obj, ensure_ascii=False))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **planned_headers(generation)})
        await response.prepare(request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        started = False
        try:
            async for chunk in _with_first(first, chunks):
                if chunk.HasField("token"):
                    if chunk.token.text or reply.logprobs:  # a character still incomplete waits for its next byte
                        await response.write(sse(reply.chunk(chunk.token, first=not started)))
                        started = True
                    continue
                await response.write(sse(reply.chunk(None, chunk.done, first=not started)))
                if include_usage:
                    await response.write(sse(reply.usage_chunk(chunk.done)))
        except Exception as exc:  # noqa: BLE001 -- headers are sent: the error goes in the stream
            await response.write(sse(error_payload(exc)))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response


async def _with_first(first: pb.GenerateChunk, rest: AsyncIterator[pb.GenerateChunk]) -> AsyncIterator[pb.GenerateChunk]:
    yield first
    async for chunk in rest:
        yield chunk
