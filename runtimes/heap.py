"""Handing memory back to the board after a burst of large requests.

glibc keeps what Python, gRPC and onnxruntime free in its arenas (one per
thread that allocated, up to 8 per core) instead of returning it, and after
the first large free it serves buffers up to 32 MiB from those arenas too.
Two calls fix that: a fixed mmap threshold, so every buffer of 256 KiB or more
(request payloads, their parsed copies) is its own mapping, unmapped when
freed; and ``malloc_trim(0)`` once idle, for the free pages left between small
allocations. With both, the agent settles within 5 % of its idle RSS after 60
requests of 27.6 MiB (``python -m bench.memory``, issue 11; 326 % above it
before). Elsewhere (musl, macOS) there is nothing to call.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024
# After going idle: at once, and again once gRPC has freed what it keeps for a
# while after the last reply (one trim at 0.2 s left the agent 32 % above idle
# in one of four runs of python -m bench.memory).
TRIM_DELAYS_S = (0.2, 2.0)


def _glibc(name: str):
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def map_large_buffers() -> bool:
    """Serve buffers of ``MMAP_THRESHOLD_BYTES`` or more as their own
    mappings from now on; whether this libc could be told."""
    return bool(_MALLOPT is not None and _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class Trimmer:
    """Trims the heap once the daemon falls idle after taking in at least
    ``after_bytes`` of requests: trimming after every small request would
    cost its time (it walks every arena) for nothing to give back."""

    def __init__(self, after_bytes: int = 64 * 2**20) -> None:
        self.after_bytes = after_bytes
        self.taken_bytes = 0   # request bytes read since the last trim
        self.trims = 0
        self.released_bytes = 0
        self._lock = threading.Lock()
        self._pending: set[asyncio.Future] = set()

    def took(self, size: int) -> None:
        self.taken_bytes += size

    def due(self) -> bool:
        return _MALLOC_TRIM is not None and self.taken_bytes >= self.after_bytes

    def when_idle(self, idle: Callable[[], bool]) -> None:
        """The daemon just went idle (called on its event loop): trim off the
        loop, twice, while it still is, if enough came in."""
        if not self.due():
            return
        loop = asyncio.get_running_loop()
        for delay in TRIM_DELAYS_S:
            loop.call_later(delay, self._trim_if, idle, delay == TRIM_DELAYS_S[-1])

    def _trim_if(self, idle: Callable[[], bool], last: bool) -> None:
        if not idle():
            return  # busy again: its next idle moment trims
        if last:
            self.taken_bytes = 0
        future = asyncio.get_running_loop().run_in_executor(None, self.trim)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def trim(self) -> int:
        """Give free heap pages back; the RSS released, bytes. Blocking (run it off the event loop)."""
        if _MALLOC_TRIM is None or not self._lock.acquire(blocking=False):
            return 0
        try:
            process = psutil.Process()
            before = process.memory_info().rss
            _MALLOC_TRIM(0)
            released = max(before - process.memory_info().rss, 0)
            self.trims += 1
            self.released_bytes += released
            logger.debug("heap trimmed: %.0f MiB given back", released / 2**20)
            return released
        finally:
            self._lock.release()
