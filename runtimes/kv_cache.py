"""Prefix reuse for llama.cpp: the KV state of recent prompts, so a chat that
resends its system prompt and history evaluates only what is new since the
last prompt (its previous answer and the new message).

A state is one sequence's KV cache as ``llama_state_seq_get_data`` gives it
(about 23 KB per token for SmolLM2 Q4_1, measured: DESIGN.md). Loading it into
a sequence and evaluating the rest of the prompt gives the same logits, bit
for bit, as evaluating the whole prompt (checked here for prefixes inside and
across llama.cpp's 512-token batches; tests/test_llm_engine.py checks greedy
outputs), so reuse never changes an answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    """States keyed by the tokens they hold, least recently used out first,
    together at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def longest(self, tokens: Sequence[int], *, at_most: int) -> tuple[int, bytes] | None:
        """The state of the longest cached prefix of ``tokens`` holding at most
        ``at_most`` of them, as (its length, its bytes)."""
        best: tuple[int, ...] | None = None
        for key in self._states:
            if len(key) <= at_most and (best is None or len(key) > len(best)) and tuple(tokens[:len(key)]) == key:
                best = key
        if best is None:
            return None
        self._states.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        return len(best), self._states[best]

    def put(self, tokens: Sequence[int], state: bytes) -> None:
        key = tuple(tokens)
        if not key or len(state) > self.max_bytes:
            return
        if key in self._states:
            self.bytes -= len(self._states.pop(key))
        self._states[key] = state
        self.bytes += len(state)
        while self.bytes > self.max_bytes:
            _, dropped = self._states.popitem(last=False)
            self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._states)
