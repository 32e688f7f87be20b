"""Draft-and-verify decoding from the device's side: its own model drafts
text, a node's bigger model checks it (CloudNode.Verify), round by round.

The two models do not share a vocabulary, so drafts cross as text. The node
re-tokenizes each draft and keeps the longest prefix equal to its own greedy
choices, then adds one token of its own (heterogeneous-vocabulary
speculative decoding, Timor et al., ICML'25): the app gets the node's tokens,
whatever the drafts were. The device keeps its drafted tokens whose bytes
spell a prefix of the node's text, takes the rest of that text in its own
tokens, and drafts again after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanKind

from edge_agent.offload import CloudNodeClient
from protos import tandem_pb2 as pb
from runtimes import tracing
from runtimes.llm import LlmEngine, Round, RoundEvent, Sampling, agreeing_tokens, whole_characters
from runtimes.llm_serving import RoundSession

# The most bytes one token of any model here spells (llama.cpp pieces of runs
# of whitespace run to a few dozen): a reply whose round spells more per
# token than this is not telling the truth.
MAX_PIECE_BYTES = 256


@dataclass
class Rounds:
    """What a speculative generation saw, for its summary and the agent's estimates."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    texts: list[str] = field(default_factory=list)  # the app's text, token by token (a failover goes on after it)


async def next_message(call, address: str, stall_s: float, broke: list[str]):
    """A stream's next message, or None with the reason in ``broke`` when the
    peer falls silent for ``stall_s`` or ends the stream."""
    try:
        message = await asyncio.wait_for(call.read(), timeout=stall_s)
    except asyncio.TimeoutError:
        broke.append(f"{address} sent nothing for {stall_s:.1f} s")
        return None
    if message is grpc.aio.EOF:
        broke.append(f"{address} ended the stream without a summary")
        return None
    return message


def lied(node: CloudNodeClient, lie: str, broke: list[str]) -> None:
    """A node's stream broke on a lie: a node that miscounts is not trusted with the next stream either."""
    broke.append(f"{node.address} {lie}")
    node.mark_down(broke[-1])


def call_failed(node: CloudNodeClient, code: grpc.StatusCode, details: str, broke: list[str]) -> None:
    """A node's stream broke on a gRPC status; an unreachable node is marked down."""
    if code == grpc.StatusCode.UNAVAILABLE:
        node.mark_down(f"{code.name}: {details}")
    broke.append(f"{node.address}: {code.name}: {details}")


def reply_lie(reply: pb.VerifyReply, *, streamed: int, max_tokens: int, draft_bytes: int) -> str:
    """What is wrong with a node's reply to a round, given the tokens streamed
    before it; "" if nothing. Without the node's model only the accounting
    can be checked: the numbering, the counts, the sizes."""
    for offset, token in enumerate(reply.tokens):
        if token.index != streamed + offset:
            return f"sent token #{token.index} where #{streamed + offset} was next"
    if streamed + len(reply.tokens) > max_tokens:
        return f"sent {streamed + len(reply.tokens)} tokens, beyond max_tokens {max_tokens}"
    if reply.HasField("done"):
        done = reply.done
        if done.finish_reason not in ("stop", "length"):
            return f"ended the generation with finish_reason {done.finish_reason!r}"
        if done.completion_tokens != streamed + len(reply.tokens):
            return f"summed up {done.completion_tokens} tokens after streaming {streamed + len(reply.tokens)}"
        return ""
    if not 0 <= reply.accepted <= reply.drafted or reply.drafted > draft_bytes + 1:
        return f"accepted {reply.accepted} of {reply.drafted} drafted tokens, from a draft of {draft_bytes} bytes"
    if not reply.pieces or len(reply.pieces) > MAX_PIECE_BYTES * (reply.accepted + 1):
        return f"spelled {len(reply.pieces)} bytes for {reply.accepted + 1} tokens"
    return ""


async def speculate(drafter: LlmEngine, prompt: list[int], node: CloudNodeClient, start: pb.GenerateRequest,
                    first_k: int, next_k: Callable[[pb.VerifyReply], int], stall_s: float, seen: Rounds,
                    broke: list[str]) -> AsyncIterator[pb.GenerateChunk]:
    """The node's tokens as chunks, then its summary. ``next_k`` hears each
    round's reply and says how many tokens to draft next. If the node fails,
    lies or falls silent, the reason goes in ``broke`` and the stream ends
    without a summary; ``seen.texts`` holds what the app got."""
    drafts = RoundSession(drafter, prompt, Sampling(max_tokens=drafter.ctx_per_seq - len(prompt)), rounds="draft",
                          draft_tokens=first_k)
    pieces: list[bytes] = []     # the device's drafted completion, token by token
    text = b""                   # the node's completion so far
    drafting = first_round = True

    async def take(session: RoundSession) -> bool:
        """The drafted round's tokens into ``pieces``; False once the device can draft no more."""
        event = await session.next_event()
        if not isinstance(event, RoundEvent):  # the device's context is full: the node goes on alone
            return False
        pieces.extend(map(drafter.piece, event.tokens))
        return not event.ended
    with tracing.span("network", kind=SpanKind.CLIENT,
                      **{"rpc.method": "Verify", "server.address": node.address}):
        call = node.stub.Verify(metadata=tracing.outgoing())
        try:
            await call.write(pb.VerifyStep(start=start))
            draft = b""
            while True:  # the first reply is the node's first token; the device drafts meanwhile
                reply = await next_message(call, node.address, stall_s, broke)
                if reply is None:
                    return
                lie = reply_lie(reply, streamed=len(seen.texts), max_tokens=start.max_tokens, draft_bytes=len(draft))
                if lie:
                    lied(node, lie, broke)
                    return
                for token in reply.tokens:
                    seen.texts.append(token.text)
                    yield pb.GenerateChunk(token=token)
                if reply.HasField("done"):
                    yield pb.GenerateChunk(done=reply.done)
                    return
                text += reply.pieces
                if reply.drafted:
                    seen.rounds += 1
                    seen.drafted += reply.drafted
                    seen.accepted += reply.accepted
                k = next_k(reply)
                if first_round:  # drafted during the node's prefill, after the prompt alone
                    first_round = False
                    drafting = await take(drafts)
                if drafting:
                    keep, covered = agreeing_tokens(pieces, text)
                    rest = whole_characters(text[covered:])
                    append = drafter.tokenize_text(rest.decode("utf-8", errors="replace")) if rest else []
                    pieces[keep:] = [drafter.piece(t) for t in append]
                    drafts.send(Round(keep=keep, append=tuple(append), generate=k))
                    drafting = await take(drafts)
                drafted = b"".join(pieces)
                draft = whole_characters(drafted[len(text):]) if drafted.startswith(text) else b""
                await call.write(pb.VerifyStep(draft=draft))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:  # the latter: a write after the call ended
            if isinstance(exc, grpc.aio.AioRpcError):
                call_failed(node, exc.code(), exc.details(), broke)
            else:
                call_failed(node, await call.code(), await call.details(), broke)
        finally:
            call.cancel()
            drafts.close()
