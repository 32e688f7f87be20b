"""Any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama) as a cloud
node for LLM generations, through the official ``openai`` client.

Such a server streams text, not token ids, and may run another (bigger) model
than the device's: ``models`` maps each device LLM to the server's model id.
So the agent's guarantees are kept at text level: if the stream breaks, the
device tokenizes the text already streamed and finishes from there (see
Generator). Routing needs the server's speeds, which it does not publish: a
short generation measures them when the node joins, and every stream after
that updates them (time to first token, tokens per second).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import openai

from edge_agent.link import LinkEstimator
from edge_agent.offload import CloudNodeClient, NodeState
from protos import tandem_pb2 as pb
from runtimes.llm import Sampling

logger = logging.getLogger(__name__)
# the client's HTTP library logs every request at INFO: one line per probe is noise in a daemon's log
for name in ("httpx", "httpx2"):
    logging.getLogger(name).setLevel(logging.WARNING)

SPEED_SMOOTHING = 0.3  # weight of one stream's measured speeds in the running estimate
# The speed probe: a prompt of about PROBE_PROMPT_TOKENS tokens ("word" is one
# token in the BPE vocabularies of Llama, Gemma and SmolLM2 alike), a few tokens out.
PROBE_PROMPT_TOKENS = 64
PROBE_MAX_TOKENS = 16


@dataclass
class StreamSpeed:
    """What streams measured of the server: prefill and decode rates."""

    prompt_tok_s: float
    gen_tok_s: float
    streams: int = 1

    def observe(self, prompt_tok_s: float | None, gen_tok_s: float | None) -> None:
        if prompt_tok_s:
            self.prompt_tok_s += SPEED_SMOOTHING * (prompt_tok_s - self.prompt_tok_s)
        if gen_tok_s:
            self.gen_tok_s += SPEED_SMOOTHING * (gen_tok_s - self.gen_tok_s)
        self.streams += 1


class OpenAiNodeClient(CloudNodeClient):
    kind = "openai"
    probe_directions = ()  # LLM requests and replies are small: the RTT is what the link costs them

    def __init__(self, base_url: str, *, models: Mapping[str, str], api_key: str | None = None, slots: int = 1,
                 ca_file: Path | None = None, client_cert: tuple[Path, Path] | None = None, **kwargs) -> None:
        """``models``: device LLM name -> the server's model id.
        ``slots``: generations the server runs at once (llama.cpp's server: 1).
        ``ca_file``, ``client_cert``: an https server's CA, and this device's
        certificate and key where it asks for one (else the system's CAs)."""
        kwargs.pop("credentials", None)  # gRPC's: TLS here is the HTTP client's
        super().__init__(base_url, **kwargs)
        self.models = dict(models)
        self.slots = slots
        http_client = None
        if ca_file is not None or client_cert is not None:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if client_cert is not None:
                context.load_cert_chain(*map(str, client_cert))
            http_client = openai.DefaultAsyncHttpxClient(verify=context)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0,
                                         http_client=http_client)
        self.speeds: dict[str, StreamSpeed] = {}
        self.active: dict[str, int] = {}

    @staticmethod
    def _open_channel(*args) -> None:
        return None  # HTTP through self.client, not gRPC

    async def _alive(self, timeout_s: float) -> bool:
        try:
            await self.client.models.list(timeout=timeout_s)
            return True
        except (openai.APIError, asyncio.CancelledError):
            return False

    async def _timed_listing(self, timeout_s: float) -> tuple[float, set[str]]:
        start = time.perf_counter()
        listing = await self.client.models.list(timeout=timeout_s)
        return (time.perf_counter() - start) * 1e3, {model.id for model in listing.data}

    async def refresh(self, *, timeout_s: float = 2.0, measure_link: bool = False) -> NodeState:
        if any(self.active.values()):
            # A stream in progress shows the server alive; and llama.cpp's server, by
            # default, interrupts a running generation for any new request, a probe included.
            self.state.llm = self._loads(self.state.models)
            return self.state
        return await super().refresh(timeout_s=timeout_s, measure_link=measure_link)

    async def _fetch(self, timeout_s: float, *, measure_link: bool) -> NodeState | None:
        """The models it serves (GET /models, which times the RTT too) and, for
        a model not measured yet, its speeds; None when it failed (marked down)."""
        probe_s = self.liveness_timeout_s() if self.estimator is not None else timeout_s
        try:
            listings = [await self._timed_listing(probe_s) for _ in range(3)]
            rtt_ms, served = min(ms for ms, _ in listings), listings[-1][1]
            if self.estimator is None:
                self.estimator = LinkEstimator(uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=rtt_ms)
            self.estimator.observe_rtt(rtt_ms)
            for name, remote in self.models.items():
                if remote in served and name not in self.speeds:
                    self.speeds[name] = await self._measure(remote, timeout_s=max(timeout_s, 30.0))
        except openai.APITimeoutError:
            self.mark_down(f"hung: no answer to GET /models in {probe_s * 1e3:.0f} ms")
            return None
        except openai.APIError as exc:
            self.mark_down(f"{type(exc).__name__}: {exc}")
            return None
        hosted = [name for name, remote in self.models.items() if remote in served and name in self.speeds]
        return NodeState(reachable=True, node_id="an OpenAI-compatible server", load=pb.NodeLoad(max_concurrency=self.slots),
                         models={name: pb.ModelInfo(name=name, kind="gguf") for name in hosted}, llm=self._loads(hosted))

    def _loads(self, models) -> list[pb.LlmLoad]:
        return [pb.LlmLoad(model=name, slots=self.slots, active=self.active.get(name, 0),
                           prompt_tok_s=self.speeds[name].prompt_tok_s, gen_tok_s=self.speeds[name].gen_tok_s)
                for name in models]

    async def _measure(self, remote: str, *, timeout_s: float) -> StreamSpeed:
        """One short greedy generation: its time to first token gives the
        prefill rate, the gaps between tokens the decode rate."""
        start = time.perf_counter()
        first = last = None
        tokens = 0
        stream = await self.client.completions.create(model=remote, prompt="word " * PROBE_PROMPT_TOKENS,
                                                      max_tokens=PROBE_MAX_TOKENS, temperature=0.0, stream=True,
                                                      timeout=timeout_s)
        async with stream:
            async for event in stream:
                if event.choices and event.choices[0].text:
                    last = time.perf_counter()
                    first = first or last
                    tokens += 1
        rtt_s = (self.estimator.rtt_ms if self.estimator else 0.0) / 1e3
        prefill_s = max((first or time.perf_counter()) - start - rtt_s, 1e-3)
        decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 1.0
        logger.info("openai node %s, %s: prefill %.0f tokens/s, decode %.1f tokens/s (measured)", self.address, remote,
                    PROBE_PROMPT_TOKENS / prefill_s, decode)
        return StreamSpeed(PROBE_PROMPT_TOKENS / prefill_s, decode)

    def facts(self, model: str, digest: str) -> tuple[bool, str]:
        return False, "an OpenAI-compatible server: LLMs only"

    def offered_cuts(self, model: str) -> frozenset[int]:
        return frozenset()

    def profile(self, model: str, digest: str) -> None:
        return None

    async def stream(self, model: str, request: pb.GenerateRequest, sampling: Sampling, texts: list[str],
                     broke: list[str], *, stall_s: float, prompt_tokens: int) -> AsyncIterator[pb.GenerateChunk]:
        """The server's stream as token chunks (one per text delta, appended
        to ``texts``; token_id -1: the server's vocabulary is not the
        device's), then a summary. If it breaks, the reason goes in ``broke``
        and the stream ends without a summary."""
        remote = self.models[model]
        common = dict(model=remote, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p, stop=list(sampling.stop) or None, stream=True)
        if request.seed:
            common["seed"] = request.seed
        chat = bool(request.messages)
        self.active[model] = self.active.get(model, 0) + 1
        start = time.perf_counter()
        first = last = None
        finish = ""
        stream = None
        try:
            if chat:
                stream = await self.client.chat.completions.create(
                    messages=[{"role": m.role, "content": m.content} for m in request.messages], **common)
            else:
                stream = await self.client.completions.create(prompt=request.prompt, **common)
            events = stream.__aiter__()
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), timeout=stall_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    broke.append(f"{self.address} sent nothing for {stall_s:.1f} s")
                    return
                if not event.choices:
                    continue  # a usage-only chunk
                choice = event.choices[0]
                text = (choice.delta.content if chat else choice.text) or ""
                if text:
                    if len(texts) >= sampling.max_tokens:
                        broke.append(f"{self.address} sent more than max_tokens {sampling.max_tokens} pieces")
                        self.mark_down(broke[-1])
                        return
                    texts.append(text)
                    last = time.perf_counter()
                    first = first or last
                    yield pb.GenerateChunk(token=pb.TokenChunk(index=len(texts) - 1, token_id=-1, text=text))
                finish = choice.finish_reason or finish
            if finish not in ("stop", "length"):
                broke.append(f"{self.address} ended the stream with finish_reason {finish or 'none'}")
                return
            self._observe(model, prompt_tokens, start, first, last, len(texts))
            yield pb.GenerateChunk(done=pb.GenerateSummary(finish_reason=finish, prompt_tokens=prompt_tokens,
                                                           completion_tokens=len(texts), ran=pb.PLAN_REMOTE,
                                                           node=self.address))
        except openai.APIError as exc:
            if isinstance(exc, openai.APIConnectionError):
                self.mark_down(f"{type(exc).__name__}: {exc}")
            broke.append(f"{self.address}: {type(exc).__name__}: {exc}")
        finally:
            self.active[model] -= 1
            if stream is not None:
                await stream.close()  # a generation the app left stops on the server too

    def _observe(self, model: str, prompt_tokens: int, start: float, first: float | None, last: float | None,
                 tokens: int) -> None:
        speed = self.speeds.get(model)
        if speed is None or first is None:
            return
        rtt_s = (self.estimator.rtt_ms if self.estimator else 0.0) / 1e3
        prefill = prompt_tokens / max(first - start - rtt_s, 1e-3) if prompt_tokens else None
        decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else None
        speed.observe(prefill, decode)

    async def close(self, grace_s: float | None = None) -> None:
        self.closed = True
        await self.client.close()
