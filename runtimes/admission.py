"""Bounded concurrency with a bounded wait queue, and a measured queue delay.

Both daemons admit work through this: a request either gets a worker slot,
waits in a queue of bounded length, or is refused at once so the caller can
go elsewhere (RESOURCE_EXHAUSTED) instead of piling up memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import onnxruntime as ort

T = TypeVar("T")


class Overloaded(RuntimeError):
    """Every slot is busy and the queue is full; ``retry_after_ms`` is a hint."""

    def __init__(self, message: str, retry_after_ms: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Admission:
    def __init__(self, *, max_concurrency: int, max_queue: int, smoothing: float = 0.2) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._smoothing = smoothing
        self.in_flight = 0
        self.queued = 0
        self.queue_delay_ms = 0.0  # EWMA of measured waits
        self.hold_ms = 0.0         # EWMA of how long a request holds its slot

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a worker slot; yields this request's measured wait in ms."""
        if self._slots.locked() and self.queued >= self.max_queue:
            # about when a place in the queue frees: the line ahead, served max_concurrency at a time
            retry_ms = self.hold_ms * (self.queued + 1) / self.max_concurrency
            raise Overloaded(
                f"busy: {self.in_flight} requests running (limit {self.max_concurrency}) "
                f"and {self.queued} queued (limit {self.max_queue}); retry in about {retry_ms:.0f} ms or elsewhere",
                retry_after_ms=retry_ms,
            )
        arrived = time.perf_counter()
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        waited_ms = (time.perf_counter() - arrived) * 1e3
        self.queue_delay_ms += self._smoothing * (waited_ms - self.queue_delay_ms)
        self.in_flight += 1
        held = time.perf_counter()
        try:
            yield waited_ms
        finally:
            self.in_flight -= 1
            self._slots.release()
            self.hold_ms += self._smoothing * ((time.perf_counter() - held) * 1e3 - self.hold_ms)


async def run_cancellable(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args, run_options)`` in ``pool``. If the caller is cancelled
    (client gone, deadline passed), onnxruntime is told to stop and the thread
    is awaited before the cancellation propagates, so the caller's admission
    slot is only freed once the CPU really is."""
    options = ort.RunOptions()
    future = asyncio.get_running_loop().run_in_executor(pool, fn, *args, options)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        options.terminate = True
        with contextlib.suppress(Exception):
            await future
        raise
