"""Deferred requests from acceptance to result: accepted into the queue's
file at once, delivered through the agent's one pipeline when a node that
serves their model is reachable (the plan decided then), oldest first and one
at a time, and their results kept for the app to fetch or stream.

While apps' requests run (LiveTraffic), the drain yields: each delivery starts
in a gap between them, and deliveries take at most ``drain_share`` of the
time (after one that took t seconds, the next waits t * (1 - share) / share).
Time is wall time: a delivery waiting on a slow uplink counts although the
device is idle then, which errs toward the live requests. With no app
request for LIVE_WINDOW_S the queue drains at full speed.

A tensor request whose cloud plan finds no node that answers goes back into
the queue rather than running on the device: it was deferred to wait for the
cloud, and an outage that began after it was taken must not change that. A
generation that loses its node mid-stream finishes on the device, as a live
one does (its text so far is not thrown away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from edge_agent.deferred import Deferred, DeferredStore
from edge_agent.offload import CloudNodeClient
from edge_agent.server import Ask, encode_all
from protos import tandem_pb2 as pb
from runtimes.admission import LiveTraffic
from runtimes.model_store import decode_all
from runtimes.onnx_exec import InputError
from runtimes.rpc import status_for

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0   # how often the queue looks for a node when nothing woke it
MAX_WAIT_S = 300.0   # the longest a Result call waits for its request to end
LIVE_WINDOW_S = 1.0  # an app's request ran this recently: the device is in use, the drain paces itself
QUIET_MAX_WAIT_S = 2.0  # the longest a delivery waits for a gap between apps' requests


class _Stored:
    """A stored request in the place of a call on the wire (``serve_tensors`` reads it once admitted)."""

    def __init__(self, request: pb.InferRequest) -> None:
        self._request = request
        self.size = request.ByteSize()

    async def read(self) -> pb.InferRequest:
        return self._request


def result_message(row: Deferred) -> pb.DeferredResult:
    result = pb.DeferredResult(id=row.id, state=row.state, error_code=row.error_code, error=row.error,
                               attempts=row.attempts)
    if row.state == "done" and row.result is not None:
        if row.kind == "infer":
            result.infer.ParseFromString(row.result)
        else:
            result.generate.ParseFromString(row.result)
    return result


class Deliveries:
    def __init__(self, store: DeferredStore, nodes: list[CloudNodeClient], *,
                 infer: Callable, generate: Callable, serves_llm: Callable[[str], bool],
                 onnx_digest: Callable[[str], str | None], traffic: LiveTraffic | None = None,
                 drain_share: float = 1.0) -> None:
        """``infer(method, call, ask_of, time_remaining, metadata)`` and
        ``generate(request)``: the agent's pipeline (EdgeAgentService's
        serve_tensors and generation); ``serves_llm(model)``: a reachable node
        serves this LLM; ``onnx_digest(model)``: the device's copy of a tensor
        model (None: no such model here); ``traffic``: apps' requests, which
        the drain yields to, taking at most ``drain_share`` of the time."""
        if not 0 < drain_share <= 1:
            raise ValueError(f"drain_share must be in (0, 1], got {drain_share}")
        self.store = store
        self.nodes = nodes
        self._infer = infer
        self._generate = generate
        self._serves_llm = serves_llm
        self._onnx_digest = onnx_digest
        self._wake = asyncio.Event()
        self._ended = asyncio.Condition()
        self.delivering: str | None = None
        self._traffic = traffic or LiveTraffic()
        self._drain_share = drain_share
        self._last_took_s = 0.0

    # ------------------------------------------------------------- serving --

    async def submit(self, request: pb.DeferRequest) -> pb.Deferral:
        kind = request.WhichOneof("request")
        if kind is None:
            raise InputError("a deferred request holds an infer or a generate request")
        inner = getattr(request, kind)
        if kind == "infer":
            if inner.HasField("output_region") or any(t.HasField("shared") for t in inner.inputs):
                raise InputError("a deferred request carries its tensors inline: shared memory may be gone by then")
            if self._onnx_digest(inner.model) is None and not self._serves_llm(inner.model):
                raise InputError(f"unknown model {inner.model!r}: not on this device")
        elif inner.plan == "local":
            raise InputError("a deferred generation waits for a node: plan 'local' never needs to")
        row, created = await asyncio.to_thread(
            self.store.submit, key=request.idempotency_key, kind=kind, model=inner.model,
            payload=inner.SerializeToString(deterministic=True), deliver_by=request.deliver_by_unix_s)
        self._wake.set()
        return pb.Deferral(id=row.id, created=created, state=row.state)

    async def result(self, request_id: str, wait_s: float) -> pb.DeferredResult:
        row = await asyncio.to_thread(self.store.get, request_id)
        if not row.ended and wait_s > 0:
            row = await self._until_ended(request_id, min(wait_s, MAX_WAIT_S))
        if row.ended:
            await asyncio.to_thread(self.store.mark_fetched, request_id)
        return result_message(row)

    async def results(self, ids: list[str]) -> AsyncIterator[pb.DeferredResult]:
        """Each request's result as it ends, in the order they end."""
        waiting = list(dict.fromkeys(ids)) or await asyncio.to_thread(self.store.pending_ids)
        while waiting:
            async with self._ended:
                # every id is read before any result is yielded: an unknown one fails the call first
                rows = [await asyncio.to_thread(self.store.get, i) for i in waiting]
                ended = [row for row in rows if row.ended]
                if not ended:
                    await self._ended.wait()
                    continue
            for row in ended:
                waiting.remove(row.id)
                await asyncio.to_thread(self.store.mark_fetched, row.id)
                yield result_message(row)

    async def _until_ended(self, request_id: str, wait_s: float) -> Deferred:
        deadline = time.monotonic() + wait_s
        async with self._ended:
            while True:
                row = await asyncio.to_thread(self.store.get, request_id)
                left = deadline - time.monotonic()
                if row.ended or left <= 0:
                    return row
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), timeout=left)

    async def _announce(self) -> None:
        async with self._ended:
            self._ended.notify_all()

    # ------------------------------------------------------------ delivery --

    def wake(self) -> None:
        """A node came back, or work arrived: look at the queue now."""
        self._wake.set()

    def deliverable(self, model: str) -> bool:
        """Whether a reachable node can take a request for ``model`` now."""
        digest = self._onnx_digest(model)
        if digest is not None:
            return any(node.facts(model, digest)[0] for node in self.nodes)
        return self._serves_llm(model)

    async def run(self) -> None:
        """Deliver until cancelled: expired requests fail, then the oldest
        deliverable one runs, then the next; with none, wait to be woken."""
        while True:
            expired = await asyncio.to_thread(self.store.expire)
            if expired:
                logger.warning("%d deferred requests passed their deliver_by undelivered", len(expired))
                await self._announce()
            await asyncio.to_thread(self.store.purge)
            await self._make_room()
            row = await asyncio.to_thread(self.store.take, self.deliverable)
            if row is None:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=IDLE_CHECK_S)
                continue
            started = time.monotonic()
            await self._deliver(row)
            self._last_took_s = time.monotonic() - started

    async def _make_room(self) -> None:
        """Pace the drain while apps' requests run (see the module's doc)."""
        if self._last_took_s and self._drain_share < 1 and self._traffic.recent(LIVE_WINDOW_S):
            await asyncio.sleep(self._last_took_s * (1 - self._drain_share) / self._drain_share)
            await self._traffic.quiet(QUIET_MAX_WAIT_S)
        self._last_took_s = 0.0

    async def _deliver(self, row: Deferred) -> None:
        self.delivering = row.id
        try:
            result = await (self._run_infer(row) if row.kind == "infer" else self._run_generate(row))
        except asyncio.CancelledError:
            await asyncio.to_thread(self.store.release, row.id)  # the agent is stopping: deliver it next time
            raise
        except Exception as exc:  # noqa: BLE001 -- every failure is recorded on the request's id
            code, message = status_for(exc)
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                logger.info("deferred %s: %s; queued again", row.id, message)
                await asyncio.to_thread(self.store.release, row.id)
                await asyncio.sleep(IDLE_CHECK_S)  # the agent is full or the node went: not at once again
                return
            await asyncio.to_thread(self.store.fail, row.id, code.name, message)
        else:
            await asyncio.to_thread(self.store.finish, row.id, result)
        finally:
            self.delivering = None
        await self._announce()

    async def _run_infer(self, row: Deferred) -> bytes:
        request = pb.InferRequest.FromString(row.payload)
        remaining = lambda: max(row.deliver_by - time.time(), 0.0)  # noqa: E731
        ask = Ask(request.model, lambda model: decode_all(request.inputs), request.plan, request.objective,
                  request.encoding)
        outputs, reply = await self._infer("tandem.EdgeAgent/Defer", _Stored(request), lambda _: ask, remaining, None,
                                           label="Deferred", deferred=True)
        reply.outputs.extend(encode_all(outputs, pb.ENCODING_RAW))
        return reply.SerializeToString()

    async def _run_generate(self, row: Deferred) -> bytes:
        request = pb.GenerateRequest.FromString(row.payload)
        text, tokens, summary = [], [], pb.GenerateSummary()
        async with contextlib.aclosing(await self._generate(request, deferred=True)) as chunks:
            async for chunk in chunks:
                if chunk.HasField("token"):
                    text.append(chunk.token.text)
                    tokens.append(chunk.token.token_id)
                else:
                    summary = chunk.done
        return pb.GenerateResult(text="".join(text), token_ids=tokens, summary=summary).SerializeToString()
