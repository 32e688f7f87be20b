"""Bounded concurrency with a bounded wait queue, and a measured queue delay.

Both daemons admit work through this: a request either gets a worker slot,
waits in a queue of bounded length, or is refused at once so the caller can
go elsewhere (RESOURCE_EXHAUSTED) instead of piling up memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import onnxruntime as ort

T = TypeVar("T")
MIB = 2**20


class Overloaded(RuntimeError):
    """Every slot is busy and the queue is full; ``retry_after_ms`` is a hint."""

    def __init__(self, message: str, retry_after_ms: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class TooLarge(RuntimeError):
    """One request needs more than the whole memory budget: no retry helps."""


class MemoryBudget:
    """Bytes the requests inside a daemon may hold at once, queued and running.

    A call holds a small fixed charge while it waits unread (what the gRPC
    server buffers for it: its stream window), and once read, what running it
    holds. A call the budget cannot take now is refused before it is read; one
    the budget could never take is refused as too large.
    """

    def __init__(self, limit_bytes: int, *, retry_after_ms: Callable[[], float] = lambda: 0.0) -> None:
        if limit_bytes < 1:
            raise ValueError("the memory budget must be at least one byte")
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._running = 0  # holdings grown to what running needs: the ones whose end frees memory
        self._retry_after_ms = retry_after_ms
        self._changed = asyncio.Condition()

    def busy(self, holders: str) -> Overloaded:
        retry_ms = self._retry_after_ms()
        return Overloaded(f"busy: {holders} hold {self.held_bytes / MIB:.1f} of the {self.limit_bytes / MIB:.0f} MiB "
                          f"request memory budget; retry in about {retry_ms:.0f} ms or elsewhere", retry_after_ms=retry_ms)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator["Holding"]:
        if self.held_bytes + size > self.limit_bytes:
            raise self.busy("requests")
        holding = Holding(self, size)
        self.held_bytes += size
        try:
            yield holding
        finally:
            self.held_bytes -= holding.size
            self._running -= holding.running
            async with self._changed:
                self._changed.notify_all()


class Holding:
    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.budget = budget
        self.size = size
        self.running = False

    async def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes instead, waiting while running requests hold the
        rest; refused when nothing running would free enough."""
        budget = self.budget
        if size > budget.limit_bytes:
            raise TooLarge(f"the request needs about {size / MIB:.1f} MiB to run, more than this daemon's whole "
                           f"{budget.limit_bytes / MIB:.0f} MiB request memory budget")
        async with budget._changed:
            while budget.held_bytes - self.size + size > budget.limit_bytes:
                if not budget._running:  # only waiting calls hold the rest: waiting would never end
                    raise budget.busy("waiting requests")
                await budget._changed.wait()
        budget.held_bytes += size - self.size
        self.size = size
        if not self.running:
            self.running = True
            budget._running += 1


class Admission:
    """Slots served fairly between callers (``key``: a device). When a slot
    frees it goes to the waiting caller with the fewest running, the one
    served longest ago among equals, first come first served within a caller;
    and no caller may hold more than ``max_queue_per_key`` of the queue, so
    one device flooding a node cannot starve another."""

    def __init__(self, *, max_concurrency: int, max_queue: int, max_queue_per_key: int | None = None,
                 smoothing: float = 0.2, on_idle: Callable[[], None] | None = None) -> None:
        """``on_idle`` is called each time the last request leaves and none waits."""
        if max_concurrency < 1 or max_queue < 0 or (max_queue_per_key is not None and max_queue_per_key < 0):
            raise ValueError("max_concurrency must be >= 1, max_queue and max_queue_per_key >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_queue_per_key = max_queue if max_queue_per_key is None else max_queue_per_key
        self._on_idle = on_idle
        self._smoothing = smoothing
        self._free = max_concurrency
        self._waiting: dict[Hashable, deque[asyncio.Future]] = {}  # per caller, in arrival order
        self._running: Counter[Hashable] = Counter()
        self._served: dict[Hashable, int] = {}  # caller -> when last granted (a grant counter)
        self._grants = 0
        self.in_flight = 0
        self.queued = 0
        self.queue_delay_ms = 0.0  # EWMA of measured waits
        self.hold_ms = 0.0         # EWMA of how long a request holds its slot

    def idle(self) -> bool:
        return not self.in_flight and not self.queued

    def _refuse(self, key: Hashable) -> None:
        mine = len(self._waiting.get(key, ()))
        if self.queued < self.max_queue and mine < self.max_queue_per_key:
            return
        # about when a place in the queue frees: the line ahead, served max_concurrency at a time
        retry_ms = self.hold_ms * (self.queued + 1) / self.max_concurrency
        share = (f"; this caller has {mine} of them (its share {self.max_queue_per_key})"
                 if self.queued < self.max_queue else "")
        raise Overloaded(
            f"busy: {self.in_flight} requests running (limit {self.max_concurrency}) "
            f"and {self.queued} queued (limit {self.max_queue}){share}; retry in about {retry_ms:.0f} ms or elsewhere",
            retry_after_ms=retry_ms,
        )

    def _grant(self, key: Hashable) -> None:
        self._free -= 1
        self._running[key] += 1
        self._grants += 1
        self._served[key] = self._grants

    def _next(self) -> None:
        """Hand free slots to waiting callers, fewest running first."""
        while self._free and self._waiting:
            key = min(self._waiting, key=lambda k: (self._running[k], self._served.get(k, 0)))
            line = self._waiting[key]
            waiter = line.popleft()
            if not line:
                del self._waiting[key]
            self._grant(key)
            waiter.set_result(None)

    def _release(self, key: Hashable) -> None:
        self._free += 1
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]
            if key not in self._waiting:
                self._served.pop(key, None)  # only callers still here need their turn remembered
        self._next()

    async def _acquire(self, key: Hashable) -> None:
        if self._free and not self._waiting:
            self._grant(key)
            return
        self._refuse(key)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(waiter)
        self.queued += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(key)  # granted as it was cancelled: pass the slot on
            else:
                line = self._waiting.get(key)
                if line is not None and waiter in line:
                    line.remove(waiter)
                    if not line:
                        del self._waiting[key]
            raise
        finally:
            self.queued -= 1

    @contextlib.asynccontextmanager
    async def slot(self, key: Hashable = None) -> AsyncIterator[float]:
        """Hold a worker slot; yields this request's measured wait in ms."""
        arrived = time.perf_counter()
        await self._acquire(key)
        waited_ms = (time.perf_counter() - arrived) * 1e3
        self.queue_delay_ms += self._smoothing * (waited_ms - self.queue_delay_ms)
        self.in_flight += 1
        held = time.perf_counter()
        try:
            yield waited_ms
        finally:
            self.in_flight -= 1
            self._release(key)
            self.hold_ms += self._smoothing * ((time.perf_counter() - held) * 1e3 - self.hold_ms)
            if self._on_idle is not None and self.idle():
                self._on_idle()


# onnxruntime's arena keeps what a run used, for the next one. After a run on a
# request this large it is shrunk: without it, a burst of 27.6 MiB requests left
# the agent 55-90 MiB above idle in 4 of 9 runs of the defaults row of
# python -m bench.memory (the arena grown to the burst's concurrency); with it,
# below idle in 4 of 4, the 60 requests taking 9-10 s instead of 8-9. Small
# requests keep the arena as it is.
SHRINK_ARENA_ABOVE_BYTES = 8 * MIB


def large(tensors: dict[str, Any]) -> bool:
    return sum(array.nbytes for array in tensors.values()) >= SHRINK_ARENA_ABOVE_BYTES


async def run_cancellable(pool: Executor, fn: Callable[..., T], *args: Any, shrink_arena: bool = False) -> T:
    """Run ``fn(*args, run_options)`` in ``pool``. If the caller is cancelled
    (client gone, deadline passed), onnxruntime is told to stop and the thread
    is awaited before the cancellation propagates, so the caller's admission
    slot is only freed once the CPU really is."""
    options = ort.RunOptions()
    if shrink_arena:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    future = asyncio.get_running_loop().run_in_executor(pool, fn, *args, options)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        options.terminate = True
        with contextlib.suppress(Exception):
            await future
        raise


class LiveTraffic:
    """Apps' requests running now and when one last ran: what background
    work (the deferred queue's drain) yields to."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.in_flight = 0
        self._clock = clock
        self._last_ran = -math.inf
        self._quiet = asyncio.Event()
        self._quiet.set()

    @contextlib.contextmanager
    def running(self, *, counted: bool = True) -> Iterator[None]:
        """The enclosed request, counted unless it is not an app's (``counted``
        False: a deferred request's delivery, which is the background work)."""
        if not counted:
            yield
            return
        self.in_flight += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._last_ran = self._clock()
            if not self.in_flight:
                self._quiet.set()

    def recent(self, window_s: float) -> bool:
        """Whether a request runs now or ended within ``window_s``."""
        return self.in_flight > 0 or self._clock() - self._last_ran < window_s

    async def quiet(self, max_wait_s: float) -> None:
        """Until no request runs, or ``max_wait_s``: a device that is never idle still gets its background work done."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), max_wait_s)
