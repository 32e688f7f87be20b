"""Generations a draining node hands over (LlmEngine.hand_off): their KV
states, kept for the devices to fetch (FetchState) until each is taken or
released or the drain ends. The node's memory bounds what is kept: a state
beyond MAX_KEPT_BYTES is not kept, and that device evaluates its tokens
itself, as it would after a crash."""

from __future__ import annotations

import asyncio
import secrets
import time

MAX_KEPT_BYTES = 1 << 30      # all states waiting at once
STATE_CHUNK_BYTES = 1 << 20   # FetchState's pieces: far below any message limit
SETTLE_POLL_S = 0.05


class UnknownHandle(KeyError):
    status_code = "NOT_FOUND"


class HandedOver:
    def __init__(self, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._states: dict[str, bytes] = {}
        self.generating = 0  # generations running: each may still hand a state over

    @property
    def kept_bytes(self) -> int:
        return sum(map(len, self._states.values()))

    def keep(self, state: bytes) -> str | None:
        """A handle for ``state``, or None when there is no room for it."""
        if self.kept_bytes + len(state) > self.max_bytes:
            return None
        handle = secrets.token_hex(16)
        self._states[handle] = state
        return handle

    def take(self, handle: str) -> bytes:
        try:
            return self._states.pop(handle)
        except KeyError:
            raise UnknownHandle(f"no handed-over state {handle!r} (taken, released, or never kept)") from None

    def release(self, handle: str) -> None:
        self._states.pop(handle, None)

    async def settled(self, within_s: float) -> bool:
        """Until no generation runs and every state was taken or released,
        or ``within_s`` passes; whether it settled."""
        deadline = time.monotonic() + within_s
        while self.generating or self._states:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_S)
        return True
