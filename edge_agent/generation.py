"""LLM requests on the agent: route each to LOCAL or a cloud node, stream it,
and if the cloud stream breaks, finish it on the device without losing or
repeating a token."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
from opentelemetry.trace import SpanKind

from edge_agent.offload import CloudNodeClient
from edge_agent.openai_node import OpenAiNodeClient
from edge_agent.speculative import Rounds, call_failed, lied, next_message, speculate
from partitioner.costmodel import Link, Objective, Power
from partitioner.llm_routing import (
    GenerationShape,
    LlmCandidate,
    LlmDecision,
    LlmNode,
    LlmPolicy,
    LlmSpeed,
    estimated_prompt_bytes,
    expected_queue_ms,
    resume_from_state,
    route_generation,
)
from partitioner.policy import LlmLimits
from partitioner.quality import QualityPolicy
from partitioner.speculation import AcceptanceEstimate, Drafting, best_draft
from protos import tandem_pb2 as pb
from runtimes import tracing
from runtimes.admission import Overloaded
from runtimes.llm import DoneEvent, GenerationError, LlmEngine, Sampling, TokenEvent, check_sampling
from runtimes.llm_serving import LlmStore, checked, prompt_tokens, sampling_of, stream, summary_of, token_chunk
from runtimes.rpc import NoFeasiblePlan, NoNodeLeft, UnknownModel

logger = logging.getLogger(__name__)

KIND = {"local": pb.PLAN_LOCAL, "remote": pb.PLAN_REMOTE, "speculative": pb.PLAN_SPLIT}
# A log-probability is at most 0; float32 rounding of a certain token's may come out just above.
LOGPROB_SLACK = 1e-3
# A prompt's tokens, guessed from its text where no tokenizer is at hand:
# about 4 characters per token in English ("a helpful rule of thumb", OpenAI's
# tokenizer guide, platform.openai.com/tokenizer). Routing needs only its size.
BYTES_PER_TOKEN = 4
# Fetching a handed-over KV state may take twice its predicted time, within these bounds.
FETCH_STATE_MIN_S = 1.0
FETCH_STATE_MAX_S = 60.0


@dataclass(frozen=True)
class LlmSettings:
    allow_remote: bool = True                 # False: prompts never leave the device
    remote_tokens_per_hour: int | None = None  # cap on tokens generated in the cloud
    slo_ms: float | None = None
    stall_s: float = 5.0                      # a cloud stream silent this long is treated as broken
    # Cloud streams at once, each holding a place to finish on the device if
    # its node fails: beyond the device's own queue, a failover is never refused.
    failover_places: int = 16
    cloud_model: str = ""                     # the bigger LLM the nodes serve (tier cloud and auto)
    quality: QualityPolicy | None = None      # when tier auto trusts the device's answer
    # Share of the device's drafted tokens a node's model accepts, before any round
    # is measured: an even guess, worth 8 drafted tokens, that the first rounds replace.
    draft_acceptance_prior: float = 0.5
    draft_tokens: int = 0                     # drafted per round; 0: partitioner.speculation picks it each round


class RemoteBudget:
    """Cloud tokens used in the last hour, against the policy's cap."""

    WINDOW_S = 3600.0

    def __init__(self, per_hour: int | None) -> None:
        self.per_hour = per_hour
        self._used: deque[tuple[float, int]] = deque()

    def left(self, now: float) -> int | None:
        if self.per_hour is None:
            return None
        while self._used and self._used[0][0] < now - self.WINDOW_S:
            self._used.popleft()
        return max(self.per_hour - sum(n for _, n in self._used), 0)

    def spend(self, now: float, tokens: int) -> None:
        if self.per_hour is not None and tokens:
            self._used.append((now, tokens))


def guessed_prompt_tokens(request: pb.GenerateRequest) -> int:
    """A prompt's size in tokens where this device has no tokenizer for its model."""
    text = request.prompt or "".join(m.content for m in request.messages)
    return max(len(request.prompt_token_ids) or -(-len(text.encode()) // BYTES_PER_TOKEN), 1)


def stream_lie(chunk: pb.GenerateChunk, *, streamed: int, prompt_tokens: int | None, max_tokens: int,
               vocab: int | None, logprobs: int = -1) -> str:
    """What is wrong with a node's next chunk, given the ``streamed`` tokens
    (continuation included) before it; "" if nothing. Only the accounting can
    be checked without running the model: which token comes next, that it is
    one of the model's, and that the summary counts what was streamed. With no
    copy of the model here, ``prompt_tokens`` and ``vocab`` are unknown (None)."""
    if chunk.HasField("token"):
        token = chunk.token
        if token.index != streamed:
            return f"sent token #{token.index} where #{streamed} was next"
        if streamed >= max_tokens:
            return f"sent token #{token.index} beyond max_tokens {max_tokens}"
        if vocab is not None and not 0 <= token.token_id < vocab:
            return f"sent token id {token.token_id}, outside the vocabulary ({vocab})"
        if logprobs >= 0 and not (token.HasField("logprob") and all(
                math.isfinite(lp) and lp <= LOGPROB_SLACK for lp in (token.logprob, *(t.logprob for t in token.top_logprobs)))
                and len(token.top_logprobs) <= logprobs):
            return f"sent token #{token.index} without a log-probability, or with one that is not (at most {logprobs} alternatives)"
        return ""
    if not chunk.HasField("done"):
        return "sent a chunk that is neither a token nor a summary"
    done = chunk.done
    if done.finish_reason not in ("stop", "length"):
        return f"ended the stream with finish_reason {done.finish_reason!r}"
    if done.completion_tokens != streamed or (prompt_tokens is not None and done.prompt_tokens != prompt_tokens):
        prompt = f" for a prompt of {prompt_tokens}" if prompt_tokens is not None else ""
        return (f"summed up {done.completion_tokens} tokens of completion and {done.prompt_tokens} of prompt "
                f"after streaming {streamed}{prompt}")
    if done.finish_reason == "length" and streamed != max_tokens:
        return f"said 'length' after {streamed} of max_tokens {max_tokens}"
    return ""


async def app_view(chunks: AsyncIterator[pb.GenerateChunk], started: float) -> AsyncIterator[pb.GenerateChunk]:
    """Time to first token and tokens/s as the agent delivers them to the app,
    across a switch, instead of one side's own figures."""
    first = last = None
    tokens = 0
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            now = time.perf_counter()
            if chunk.HasField("token"):
                first = first or now
                last = now
                tokens += 1
            else:
                summary = chunk.done
                summary.ttft_ms = ((first or now) - started) * 1e3
                summary.tokens_per_s = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
                summary.total_ms = (now - started) * 1e3
            yield chunk


class Generation:
    """A routed generation: its plan and predictions, known before the first
    token (a frontend's response headers), and its chunks."""

    def __init__(self, chunks: AsyncIterator[pb.GenerateChunk], predicted: dict, node: str) -> None:
        self.chunks = chunks
        self.predicted = predicted  # predicted_fields: planned, reason, predicted_*
        self.node = node            # the planned node, "" for LOCAL

    def __aiter__(self) -> AsyncIterator[pb.GenerateChunk]:
        return self.chunks

    async def aclose(self) -> None:
        await self.chunks.aclose()


def predicted_fields(candidate: LlmCandidate, why: str) -> dict:
    """What the summary says was planned and predicted, as GenerateSummary fields."""
    return dict(planned=KIND[candidate.kind], reason=why, predicted_ttft_ms=candidate.ttft_ms,
                predicted_total_ms=candidate.total_ms, predicted_energy_j=candidate.energy_j)


def own_logprobs(chunk: pb.GenerateChunk, asked: int) -> pb.GenerateChunk:
    """A token chunk with the log-probabilities the app asked for (-1: none, else that many alternatives)."""
    if asked < 0:
        chunk.token.ClearField("logprob")
        chunk.token.piece = b""
        del chunk.token.top_logprobs[:]
    return chunk


def parse_llm_plan(label: str) -> tuple[str, str]:
    kind, _, node = label.strip().partition("@")
    if kind not in KIND:
        raise GenerationError(f"plan {label!r} for an LLM is not 'local', 'remote' or 'remote@HOST:PORT'")
    return kind, node


class FailoverPlace:
    """A cloud stream's place to finish on the device if its node fails
    (LlmSettings.failover_places): held from acceptance until it ends or its
    continuation runs."""

    def __init__(self, generator: "Generator") -> None:
        self._generator = generator
        generator.failover_held += 1
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._generator.failover_held -= 1


class Generator:
    """The agent's LLM side; ``EdgeAgentService`` delegates Generate here."""

    def __init__(self, llms: LlmStore, nodes: list[CloudNodeClient], power: Power, settings: LlmSettings,
                 weight_latency: float) -> None:
        self.llms = llms
        self.nodes = nodes
        self.power = power
        self.settings = settings
        self.weight_latency = weight_latency
        self.budget = RemoteBudget(settings.remote_tokens_per_hour)
        self.failover_held = 0  # cloud streams now holding a failover place
        self.acceptance: dict[str, AcceptanceEstimate] = {}   # by the model that checks the drafts
        self.verify_ms: dict[str, dict[int, float]] = {}      # by node: its decode calls timed in replies

    def use_limits(self, limits: LlmLimits, *, weight_latency: float) -> None:
        """A reloaded policy's LLM limits; tokens already spent in the cloud still count."""
        self.settings = replace(self.settings, allow_remote=limits.allow_remote,
                                remote_tokens_per_hour=limits.remote_tokens_per_hour)
        self.budget.per_hour = limits.remote_tokens_per_hour
        self.weight_latency = weight_latency

    def serves(self, model: str) -> bool:
        return model in self.llms.engines or any(self._node_load(n, model) for n in self.nodes)

    def served_models(self) -> dict[str, list[str]]:
        """Every LLM this agent can serve, with the nodes serving it."""
        served: dict[str, list[str]] = {name: [] for name in self.llms.engines}
        for node in self.nodes:
            for name, info in node.state.models.items() if node.state.reachable else ():
                if info.kind == "gguf" and self._node_load(node, name) is not None:
                    served.setdefault(name, []).append(node.address)
        return served

    def room(self, request: pb.GenerateRequest) -> int:
        """Tokens the context leaves after this prompt: ``max_tokens`` for a
        request that names none (OpenAI's default), at least 1 (a prompt that
        fills the context is then refused by name)."""
        engine = self.llms.engines.get(request.model)
        if engine is not None:
            return max(engine.ctx_per_seq - len(prompt_tokens(engine, request)), 1)
        contexts = [load.ctx_per_seq for node in self.nodes if (load := self._node_load(node, request.model))]
        return max(max(contexts, default=0) - guessed_prompt_tokens(request), 1)

    def _node_load(self, node: CloudNodeClient, model: str) -> pb.LlmLoad | None:
        if not node.state.reachable:
            return None
        info = node.state.models.get(model)
        local_digest = self.llms.digests.get(model)
        # a tandem node must hold the same file (it continues from token ids); an openai
        # node runs whatever model the map names, and continues at text level
        same_file = node.kind == "openai" or not local_digest or info is None or info.digest == local_digest
        if info is None or info.kind != "gguf" or not same_file:
            return None
        return next((load for load in node.state.llm if load.model == model), None)

    def decide(self, model: str, shape: GenerationShape, objective: Objective, link: Link | None = None, *,
               by_text: bool = True, drafter: LlmEngine | None = None) -> LlmDecision:
        """``by_text`` False: only nodes that take token ids (tandem nodes), for
        requests an OpenAI-compatible server cannot take (log-probabilities,
        a continuation from token ids) or could not be finished from here.
        ``drafter``: the device's model can draft for this one (a greedy
        request for a model the device has no copy of): tandem nodes are
        also candidates for draft-and-verify decoding."""
        engine = self.llms.engines.get(model)
        local = LlmSpeed(engine.prompt_tok_s, engine.gen_tok_s) if engine and engine.gen_tok_s > 0 else None
        nodes = []
        for node in self.nodes:
            if node.kind == "openai" and (not by_text or engine is None):
                continue
            load = self._node_load(node, model)
            if load is None or load.gen_tok_s <= 0 or load.prompt_tok_s <= 0 or node.link is None:
                continue
            # What a new stream would get there now. Both sides smooth their
            # speeds over every decode step of every request they run; the
            # node's figures arrive with each status refresh.
            speed = LlmSpeed(load.prompt_tok_s, load.next_stream_tok_s or load.gen_tok_s)
            queue_ms = expected_queue_ms(reported_ms=load.queue_delay_ms, slots=max(load.slots, 1), active=load.active,
                                         queued=load.queued, max_tokens=shape.max_tokens, gen_tok_s=speed.gen_tok_s)
            nodes.append(LlmNode(node=node.address, link=link or node.link, queue_ms=queue_ms, speed=speed,
                                 drafting=self._drafting(drafter, node, load, model) if node.kind == "tandem" else None))
        if local is None and not nodes:
            raise UnknownModel(f"unknown model {model!r}: not on this device and no reachable node serves it")
        policy = LlmPolicy(allow_remote=self.settings.allow_remote, remote_tokens_left=self.budget.left(time.monotonic()),
                           slo_ms=self.settings.slo_ms)
        return route_generation(shape, local, nodes, self.power, objective=objective,
                                weight_latency=self.weight_latency, policy=policy)

    def _drafting(self, drafter: LlmEngine | None, node: CloudNodeClient, load: pb.LlmLoad, model: str) -> Drafting | None:
        """What a round with ``node`` costs and yields, from the node's timed
        decode calls (its status, then its replies) and the acceptance seen."""
        if drafter is None or drafter.gen_tok_s <= 0:
            return None
        measured = {n: ms for n, ms in enumerate(load.step_ms, start=1) if ms > 0}
        measured.update(self.verify_ms.get(node.address, {}))
        if not measured:
            return None
        acceptance = self.acceptance.get(model)
        return Drafting(draft_ms=1e3 / drafter.gen_tok_s, verify_ms=measured,
                        acceptance=acceptance.value if acceptance else self.settings.draft_acceptance_prior,
                        batched=load.batched_verify)

    def drafter_for(self, request: pb.GenerateRequest) -> LlmEngine | None:
        """The device's LLM, if it can draft for this request: greedy, plain
        text out, no token ids in (the drafts cross as text)."""
        if (request.temperature > 0 or request.logprobs or request.prompt_token_ids or request.generated_token_ids
                or request.model in self.llms.engines):
            return None
        return self.llms.engines.get(self._device_model())

    def model_for_tier(self, tier: str, model: str = "") -> tuple[str, str, QualityPolicy | None]:
        """The model a tier runs, what explain says of the tier first, and for
        "auto" the policy that judges the device's answer ("": ``model`` as named)."""
        if not tier:
            return model, "", None
        if tier not in ("device", "cloud", "auto"):
            raise GenerationError(f"tier must be device, cloud or auto, got {tier!r}")
        if model:
            raise GenerationError(f"name a tier or a model, not both (tier {tier!r}, model {model!r})")
        device = self._device_model()
        if tier in ("device", "auto") and device not in self.llms.engines:
            raise GenerationError(f"tier {tier} needs the device's LLM ({device or 'none'}) loaded here (--llm)")
        if tier in ("cloud", "auto") and not self.settings.cloud_model:
            raise GenerationError(f"tier {tier} needs llm_cloud_model: the bigger LLM the nodes serve")
        if tier == "device":
            return device, f"tier device: {device} on this device (LOCAL). ", None
        if tier == "cloud":
            return self.settings.cloud_model, f"tier cloud: {self.settings.cloud_model}. ", None
        policy = self.settings.quality
        if policy is None:
            raise GenerationError("tier auto needs llm_quality_file: the calibration offload-tune calibrate-llm writes")
        return self.settings.cloud_model, (
            f"tier auto: {device} starts here; if the calibrated probability of its first {policy.first_tokens} "
            f"tokens' mean log-probability is below {policy.threshold:.2f}, {self.settings.cloud_model} answers, "
            f"routed as follows. "), policy

    def offers_tier(self, tier: str) -> bool:
        """Whether a request may name ``tier`` here now (its model loaded or served, its policy given)."""
        try:
            model = self.model_for_tier(tier)[0]
        except GenerationError:
            return False
        return self.serves(model)

    def _device_model(self) -> str:
        return self.settings.quality.device_model if self.settings.quality else next(iter(self.llms.engines), "")

    def _pick(self, decision: LlmDecision, pinned: str) -> tuple[LlmCandidate, str]:
        if pinned:
            kind, node = parse_llm_plan(pinned)
            for candidate in decision.candidates:
                if candidate.kind == kind and (not node or candidate.node == node):
                    if candidate.hard_violation:
                        raise NoFeasiblePlan(f"plan {pinned} breaks the device policy: {'; '.join(candidate.violations)}")
                    return candidate, f"pinned by the caller: {pinned}"
            raise NoFeasiblePlan(f"plan {pinned} is not available for this model (no such node, or the model is not here)")
        if decision.winner is not None:
            return decision.winner, decision.why
        if decision.best_effort is not None:
            return decision.best_effort, f"best effort, constraints not met: {decision.why}"
        raise NoFeasiblePlan(f"no way to run this generation: {decision.why}")

    async def generate(self, request: pb.GenerateRequest, objective: Objective) -> Generation:
        """Validate and route (errors raise here, or at the first chunk when a
        queue is full), then stream."""
        started = time.perf_counter()
        if request.tier:
            tiered = self._tiered(request, objective, started)
            if tiered is not None:
                return tiered
        if not request.model:
            if len(self.llms.engines) != 1:
                raise GenerationError(f"name the model: LLMs on this device are {sorted(self.llms.engines)}")
            request.model = next(iter(self.llms.engines))
        engine = self.llms.engines.get(request.model)
        if engine is None and not self.serves(request.model):
            raise UnknownModel(f"unknown model {request.model!r}: not on this device and no reachable node serves it; "
                               f"LLMs here: {sorted(self.llms.engines)}")
        if engine is None:
            sampling, line, predicted = self._remote_only_route(request, objective)
            return Generation(app_view(self._cloud(request, sampling, line, started, predicted), started), predicted,
                              line[0].node)
        tokens = prompt_tokens(engine, request)
        sampling = sampling_of(request)
        engine.validate(tokens, sampling, request.generated_token_ids)
        shape = GenerationShape(prompt_tokens=len(tokens), max_tokens=sampling.max_tokens,
                                prompt_bytes=request.ByteSize())
        decision = self.decide(request.model, shape, objective,
                               by_text=not (request.logprobs or request.generated_token_ids or request.prompt_token_ids))
        candidate, why = self._pick(decision, request.plan)
        if candidate.kind != "local" and self.failover_held >= self.settings.failover_places:
            # refused or kept here before it is accepted, never after: its failover would have no place
            full = (f"{self.failover_held} cloud streams hold every place to finish on the device if their node fails "
                    f"(llm_failover_places {self.settings.failover_places})")
            local = next((c for c in decision.candidates if c.kind == "local" and not c.violations), None)
            if request.plan or local is None:
                raise Overloaded(f"{full}; retry when one ends")
            candidate, why = local, f"{full}: LOCAL"
        predicted = predicted_fields(candidate, why)
        if candidate.kind == "local":
            chunks = self._local(engine, tokens, sampling, list(request.generated_token_ids), started, predicted)
        else:
            node = self._node(candidate.node)
            chunks = self._remote(engine, node, request, tokens, sampling, started, predicted)
        return Generation(app_view(chunks, started), predicted, candidate.node if candidate.kind != "local" else "")

    def _tiered(self, request: pb.GenerateRequest, objective: Objective, started: float) -> Generation | None:
        """A request by tier: "device" and "cloud" become the model each tier
        runs (None: route it as any request for that model); "auto" starts
        on the device and is judged by its first tokens (_auto)."""
        tier = request.tier
        if request.model or request.plan:
            raise GenerationError(f"a request names a tier or a model and plan, not both (tier {tier!r}, model "
                                  f"{request.model!r}, plan {request.plan!r})")
        model, _, _ = self.model_for_tier(tier)
        device = self._device_model()
        if tier == "device":
            request.model, request.plan = device, "local"
            return None
        if tier == "cloud":
            request.model = model
            return None
        if not self.serves(self.settings.cloud_model):
            raise NoNodeLeft(f"tier auto: no reachable node serves {self.settings.cloud_model}")
        request.model = device
        return Generation(app_view(self._auto(request, objective, started), started), {}, "")

    async def _auto(self, request: pb.GenerateRequest, objective: Objective,
                    started: float) -> AsyncIterator[pb.GenerateChunk]:
        """The device generates; its first tokens are held back until the
        quality policy judges them. Trusted, they stream and the device goes
        on; not, the device stops and the cloud model answers, from the
        prompt afresh or, where the policy measured it as good, after the
        device's first tokens' text (it has another vocabulary: text is what
        carries over). The summary says which model answered and why."""
        policy = self.settings.quality
        engine = self.llms.engines[request.model]
        tokens = prompt_tokens(engine, request)
        asked = sampling_of(request)
        engine.validate(tokens, asked)
        held: list[TokenEvent] = []
        done: DoneEvent | None = None
        events = stream(engine, tokens, replace(asked, logprobs=max(asked.logprobs, 0)))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, DoneEvent):
                    done = checked(event)
                    break
                held.append(event)
                if len(held) >= policy.first_tokens:
                    break
            conf, probability, escalate = policy.judge([t.logprobs.logprob for t in held])
            verdict = dict(tier="auto", confidence=conf if math.isfinite(conf) else 0.0,
                           confidence_probability=probability, threshold=policy.threshold, escalated=escalate)
            if not escalate:
                for event in held:
                    yield own_logprobs(token_chunk(event), asked.logprobs)
                while done is None:
                    event = await anext(events)
                    if isinstance(event, DoneEvent):
                        done = checked(event)
                    else:
                        yield own_logprobs(token_chunk(event), asked.logprobs)
                summary = summary_of(done, started=started, ran=pb.PLAN_LOCAL)
                summary.model, summary.reason = request.model, (
                    f"tier auto: the device's answer is trusted (calibrated {probability:.2f} >= threshold "
                    f"{policy.threshold:.2f})")
                for key, value in verdict.items():
                    setattr(summary, key, value)
                yield pb.GenerateChunk(done=summary)
                return
        # Continue after the device's first tokens where the calibration measured it as good as restarting;
        # a chat's messages have no place for a partial answer, and a finished answer has nothing to continue.
        head = held if policy.escalation == "continue" and request.prompt and done is None else []
        cloud = pb.GenerateRequest()
        cloud.CopyFrom(request)
        cloud.model, cloud.tier, cloud.plan = self.settings.cloud_model, "", ""
        if head:
            cloud.prompt += "".join(event.text for event in head)
            cloud.max_tokens = asked.max_tokens - len(head)
            for event in head:
                yield own_logprobs(token_chunk(event), asked.logprobs)
        how = f"continued after the device's first {len(head)} tokens" if head else "answered afresh"
        sampling, line, predicted = self._remote_only_route(cloud, objective)
        async with contextlib.aclosing(self._cloud(cloud, sampling, line, started, predicted)) as chunks:
            async for chunk in chunks:
                if chunk.HasField("token"):
                    chunk.token.index += len(head)
                else:
                    chunk.done.completion_tokens += len(head)
                    chunk.done.model, chunk.done.reason = cloud.model, (
                        f"tier auto: the device's answer is not trusted (calibrated {probability:.2f} < threshold "
                        f"{policy.threshold:.2f}): {cloud.model} {how}")
                    for key, value in verdict.items():
                        setattr(chunk.done, key, value)
                yield chunk

    async def _local(self, engine: LlmEngine, tokens: list[int], sampling: Sampling, generated: list[int],
                     started: float, predicted: dict, switch: dict | None = None, reserved: bool = False,
                     state: bytes | None = None, state_tokens: int = 0) -> AsyncIterator[pb.GenerateChunk]:
        async with contextlib.aclosing(stream(engine, tokens, sampling, generated, reserved=reserved, state=state,
                                              state_tokens=state_tokens)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    yield token_chunk(event)
                else:
                    summary = summary_of(checked(event), started=started, ran=pb.PLAN_LOCAL)
                    for key, value in {**predicted, **(switch or {})}.items():
                        setattr(summary, key, value)
                    if state is not None and not event.cached_tokens:  # the engine evaluated the tokens after all
                        summary.resumed_state_bytes = 0
                        summary.switch_reason += "; the node's KV state did not load, so the tokens were evaluated"
                    yield pb.GenerateChunk(done=summary)

    async def _remote(self, engine: LlmEngine, node: CloudNodeClient, request: pb.GenerateRequest, tokens: list[int],
                      sampling: Sampling, started: float, predicted: dict) -> AsyncIterator[pb.GenerateChunk]:
        place = FailoverPlace(self)
        then_device = self._text_then_device if isinstance(node, OpenAiNodeClient) else self._remote_then_device
        try:
            async with contextlib.aclosing(then_device(engine, node, request, tokens, sampling, started,
                                                       predicted, place)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            place.release()

    async def _remote_then_device(self, engine: LlmEngine, node: CloudNodeClient, request: pb.GenerateRequest,
                                  tokens: list[int], sampling: Sampling, started: float, predicted: dict,
                                  place: "FailoverPlace") -> AsyncIterator[pb.GenerateChunk]:
        generated = list(request.generated_token_ids)
        forward = pb.GenerateRequest(
            model=request.model, prompt_token_ids=tokens, generated_token_ids=generated, max_tokens=sampling.max_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, stop=list(sampling.stop),
            logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        )
        broke: list[str] = []
        offers: list[pb.Handoff] = []
        async with contextlib.aclosing(self._from_node(node, forward, generated, sampling, predicted, broke,
                                                       prompt_tokens=len(tokens), vocab=engine.llm.n_vocab(),
                                                       offers=offers)) as chunks:
            async for chunk in chunks:
                yield chunk
        if not broke:
            return
        reason = broke[0]
        logger.warning("generation on %s broke after %d tokens, continuing on the device: %s",
                       node.address, len(generated), reason)
        if len(generated) >= sampling.max_tokens:  # it broke after the last token: nothing is left to generate
            for offer in offers:
                node.release_state(offer.handle)
            switch = dict(switched=True, switched_at_token=len(generated), switch_reason=reason)
            summary = pb.GenerateSummary(finish_reason="length", prompt_tokens=len(tokens), completion_tokens=len(generated),
                                         ran=pb.PLAN_REMOTE, node=node.address, **predicted, **switch)
            yield pb.GenerateChunk(done=summary)
            return
        state, state_tokens, resumed = await self._handed_state(engine, node, request.model, tokens, generated, offers)
        switch = dict(switched=True, switched_at_token=len(generated), resumed_state_bytes=len(state or b""),
                      switch_reason=f"{reason}; {resumed}" if resumed else reason)
        async for chunk in self._local(engine, tokens, sampling, generated, started, predicted, switch, reserved=True,
                                       state=state, state_tokens=state_tokens):
            place.release()  # it runs: the place it held is no longer needed
            yield chunk

    async def _text_then_device(self, engine: LlmEngine, node: OpenAiNodeClient, request: pb.GenerateRequest,
                                tokens: list[int], sampling: Sampling, started: float, predicted: dict,
                                place: "FailoverPlace") -> AsyncIterator[pb.GenerateChunk]:
        """An OpenAI-compatible server's stream; if it breaks, the device
        tokenizes the text streamed so far and generates the rest after it, so
        the app's text has no piece lost or repeated."""
        texts: list[str] = []
        broke: list[str] = []
        with tracing.span("network", kind=SpanKind.CLIENT, **{"server.address": node.address}):
            async with contextlib.aclosing(node.stream(request.model, request, sampling, texts, broke,
                                                       stall_s=self.settings.stall_s, prompt_tokens=len(tokens))) as chunks:
                async for chunk in chunks:
                    if chunk.HasField("done"):
                        for key, value in predicted.items():
                            setattr(chunk.done, key, value)
                    yield chunk
        self.budget.spend(time.monotonic(), len(texts))
        if not broke:
            return
        logger.warning("generation on %s broke after %d pieces, continuing on the device: %s",
                       node.address, len(texts), broke[0])
        async for chunk in self._device_after_text(engine, tokens, sampling, texts, broke[0], started, predicted,
                                                   node.address, place):
            yield chunk

    async def _device_after_text(self, engine: LlmEngine, tokens: list[int], sampling: Sampling, texts: list[str],
                                 reason: str, started: float, predicted: dict, node: str, place: "FailoverPlace"
                                 ) -> AsyncIterator[pb.GenerateChunk]:
        """The device's model goes on after the text another model streamed
        (``texts``, piece by piece), numbering its tokens after those pieces."""
        generated = engine.tokenize_text("".join(texts))
        switch = dict(switched=True, switched_at_token=len(texts), switch_reason=reason)
        if len(generated) >= sampling.max_tokens:
            summary = pb.GenerateSummary(finish_reason="length", prompt_tokens=len(tokens), completion_tokens=len(texts),
                                         ran=pb.PLAN_REMOTE, node=node, **predicted, **switch)
            yield pb.GenerateChunk(done=summary)
            return
        index = len(texts)  # the app's numbering goes on from the server's pieces
        async for chunk in self._local(engine, tokens, sampling, generated, started, predicted, switch, reserved=True):
            place.release()
            if chunk.HasField("token"):
                chunk.token.index = index
                index += 1
            else:
                chunk.done.model = engine.name
            yield chunk

    def _cloud(self, request: pb.GenerateRequest, sampling: Sampling, line: list[LlmCandidate], started: float,
               predicted: dict) -> AsyncIterator[pb.GenerateChunk]:
        """A model this device has no copy of, on the route chosen first in ``line`` (_remote_only_route)."""
        if line[0].kind == "speculative":
            return self._speculative(request, sampling, line[0], started, predicted)
        return self._remote_only(request, sampling, line, predicted)

    async def _speculative(self, request: pb.GenerateRequest, sampling: Sampling, candidate: LlmCandidate,
                           started: float, predicted: dict) -> AsyncIterator[pb.GenerateChunk]:
        """The device drafts, ``candidate``'s node checks (edge_agent.speculative);
        if the node fails, the device's model finishes after the text streamed."""
        drafter = self.llms.engines[self._device_model()]
        node = self._node(candidate.node)
        prompt = prompt_tokens(drafter, request)
        start = pb.GenerateRequest(model=request.model, prompt=request.prompt, messages=request.messages,
                                   max_tokens=sampling.max_tokens, stop=list(sampling.stop))
        estimate = self.acceptance.setdefault(request.model, AcceptanceEstimate(self.settings.draft_acceptance_prior))
        timed = self.verify_ms.setdefault(node.address, {})

        def next_k(reply: pb.VerifyReply) -> int:
            load = self._node_load(node, request.model)
            if reply.drafted and reply.step_ms > 0 and load is not None:
                estimate.add(reply.drafted, reply.accepted)
                # one decode call of drafted + 1 tokens, or a plain step per token streamed
                size, ms = (reply.drafted + 1, reply.step_ms) if load.batched_verify else (1, reply.step_ms / (reply.accepted + 1))
                timed[size] = ms if size not in timed else timed[size] + 0.2 * (ms - timed[size])
            if self.settings.draft_tokens:
                return self.settings.draft_tokens
            drafting = self._drafting(drafter, node, load, request.model) if load is not None else None
            return best_draft(drafting, node.link.rtt_ms).k if drafting and node.link else candidate.draft_tokens

        place = FailoverPlace(self)
        seen, broke = Rounds(), []
        try:
            first_k = self.settings.draft_tokens or candidate.draft_tokens
            async with contextlib.aclosing(speculate(drafter, prompt, node, start, first_k, next_k,
                                                     self.settings.stall_s, seen, broke)) as chunks:
                async for chunk in chunks:
                    if chunk.HasField("done"):
                        summary = chunk.done
                        summary.ran, summary.node, summary.model = pb.PLAN_SPLIT, node.address, request.model
                        summary.draft_rounds, summary.drafted_tokens = seen.rounds, seen.drafted
                        summary.accepted_tokens = seen.accepted
                        for key, value in predicted.items():
                            setattr(summary, key, value)
                    yield chunk
            self.budget.spend(time.monotonic(), len(seen.texts))
            if not broke:
                return
            logger.warning("draft-and-verify with %s broke after %d tokens, continuing on the device: %s",
                           node.address, len(seen.texts), broke[0])
            async for chunk in self._device_after_text(drafter, prompt, sampling, seen.texts, broke[0], started,
                                                       predicted, node.address, place):
                yield chunk
        finally:
            place.release()

    async def _from_node(self, node: CloudNodeClient, forward: pb.GenerateRequest, generated: list[int],
                         sampling: Sampling, predicted: dict, broke: list[str], *, prompt_tokens: int | None,
                         vocab: int | None, callers_errors: bool = False, offers: list[pb.Handoff] | None = None
                         ) -> AsyncIterator[pb.GenerateChunk]:
        """One node's stream, every chunk checked: its tokens (appended to
        ``generated``), then its summary. If it breaks, the reason goes in
        ``broke`` and the stream ends without a summary; a node that hands the
        generation over (it is shutting down) breaks it too, its offer of a
        KV state going in ``offers`` (released when None). ``callers_errors``:
        the node is the only one to judge the request, so an INVALID_ARGUMENT
        before its first token is the caller's error, not a node failure."""
        before = len(generated)
        with tracing.span("network", kind=SpanKind.CLIENT, **{"rpc.method": "Generate", "server.address": node.address}):
            call = node.stub.Generate(forward, metadata=tracing.outgoing())
            try:
                while True:
                    chunk = await next_message(call, node.address, self.settings.stall_s, broke)
                    if chunk is None:
                        return
                    if chunk.HasField("handoff"):
                        self._handed_over(node, chunk.handoff, len(generated), broke, offers)
                        return
                    lie = stream_lie(chunk, streamed=len(generated), prompt_tokens=prompt_tokens,
                                     max_tokens=sampling.max_tokens, vocab=vocab, logprobs=sampling.logprobs)
                    if lie:
                        lied(node, lie, broke)
                        return
                    if chunk.HasField("token"):
                        generated.append(chunk.token.token_id)
                        yield chunk
                        continue
                    summary = chunk.done
                    summary.ran, summary.node = pb.PLAN_REMOTE, node.address
                    for key, value in predicted.items():
                        setattr(summary, key, value)
                    yield pb.GenerateChunk(done=summary)
                    return
            except grpc.aio.AioRpcError as exc:
                if callers_errors and exc.code() == grpc.StatusCode.INVALID_ARGUMENT and len(generated) == before:
                    raise GenerationError(f"{node.address} refused the generation: {exc.details()}") from None
                call_failed(node, exc.code(), exc.details(), broke)
            finally:
                call.cancel()
                self.budget.spend(time.monotonic(), len(generated) - before)

    @staticmethod
    def _handed_over(node: CloudNodeClient, offer: pb.Handoff, streamed: int, broke: list[str],
                     offers: list[pb.Handoff] | None) -> None:
        counted_right = offer.completion_tokens == streamed
        broke.append(f"{node.address} is shutting down and handed the generation over after {streamed} tokens"
                     if counted_right else f"{node.address} handed the generation over after "
                     f"{offer.completion_tokens} tokens, having streamed {streamed}")
        node.mark_down(broke[-1])  # no new work for a node on its way out
        if counted_right and offers is not None and offer.handle:
            offers.append(offer)
        elif offer.handle:
            node.release_state(offer.handle)

    async def _handed_state(self, engine: LlmEngine, node: CloudNodeClient, model: str, tokens: list[int],
                            generated: list[int], offers: list[pb.Handoff]) -> tuple[bytes | None, int, str]:
        """The node's KV state to go on from, with the positions it holds, or
        None when the device should evaluate the tokens itself; and why
        (partitioner.llm_routing.resume_from_state decides by the measured link)."""
        if not offers:
            return None, 0, ""
        offer = offers[0]
        positions = len(tokens) + len(generated)
        problem = ""
        if offer.model_digest != self.llms.digests.get(model):
            problem = "the node's copy of the model differs from the device's"
        elif not 0 < offer.state_tokens <= positions:
            problem = f"it says it holds {offer.state_tokens} positions of {positions}"
        elif not 0 < offer.state_bytes <= engine.max_state_bytes(offer.state_tokens):
            problem = f"{offer.state_bytes} bytes is not a state of {offer.state_tokens} tokens of {model}"
        if problem:
            node.release_state(offer.handle)
            return None, 0, f"not using the node's KV state: {problem}"
        choice = resume_from_state(offer.state_bytes, node.link, prompt_tokens=len(tokens), streamed_tokens=len(generated),
                                   prompt_tok_s=engine.prompt_tok_s, decode_tok_s=engine.stream_tok_s(1))
        if not choice.ship:
            node.release_state(offer.handle)
            return None, 0, choice.why
        timeout_s = min(max(2 * choice.ship_ms / 1e3, FETCH_STATE_MIN_S), FETCH_STATE_MAX_S)
        try:
            state = await node.fetch_state(offer.handle, offer.state_bytes, timeout_s=timeout_s)
        except (grpc.RpcError, ValueError) as exc:
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            return None, 0, f"{choice.why}, but the fetch failed ({details}): evaluating the tokens"
        return state, offer.state_tokens, choice.why

    def _remote_only_route(self, request: pb.GenerateRequest, objective: Objective
                           ) -> tuple[Sampling, list[LlmCandidate], dict]:
        """For a model this device has no copy of: its sampling, checked; the
        nodes to try in turn (the chosen one, then the others holding the same
        file); what was predicted."""
        sampling = sampling_of(request)
        check_sampling(sampling, request.generated_token_ids)
        shape = GenerationShape(prompt_tokens=guessed_prompt_tokens(request), max_tokens=sampling.max_tokens,
                                prompt_bytes=request.ByteSize())
        decision = self.decide(request.model, shape, objective, drafter=self.drafter_for(request))
        first, why = self._pick(decision, request.plan)
        digest = self._digest(first.node, request.model)
        line = [first, *sorted((c for c in decision.candidates if c.kind == "remote" and c is not first
                                and not c.hard_violation and self._digest(c.node, request.model) == digest),
                               key=lambda c: c.score)]
        return sampling, line, predicted_fields(first, f"{why} (no copy on this device)")

    async def _remote_only(self, request: pb.GenerateRequest, sampling: Sampling, line: list[LlmCandidate],
                           predicted: dict) -> AsyncIterator[pb.GenerateChunk]:
        """The nodes tokenize the prompt. A broken stream continues on the
        next node in ``line`` from the tokens already streamed; with none left
        it ends with the reasons (nothing here could finish it)."""
        generated = list(request.generated_token_ids)
        reasons: list[str] = []
        for candidate in line:
            node = self._node(candidate.node)
            forward = pb.GenerateRequest()
            forward.CopyFrom(request)
            forward.plan = ""
            forward.ClearField("generated_token_ids")
            forward.generated_token_ids.extend(generated)
            switch = dict(switched=True, switched_at_token=len(generated), switch_reason="; ".join(reasons)) if reasons else {}
            broke: list[str] = []
            async with contextlib.aclosing(self._from_node(node, forward, generated, sampling, {**predicted, **switch},
                                                           broke, prompt_tokens=None, vocab=None,
                                                           callers_errors=not reasons)) as chunks:
                async for chunk in chunks:
                    yield chunk
            if not broke:
                return
            reasons.append(broke[0])
            logger.warning("generation of %s on %s broke after %d tokens: %s", request.model, node.address,
                           len(generated), broke[0])
        raise NoNodeLeft(f"{request.model} broke after {len(generated)} tokens and no other node holds the same file; "
                         f"this device has no copy to finish it: {'; '.join(reasons)}")

    def _node(self, address: str) -> CloudNodeClient:
        return next(n for n in self.nodes if n.address == address)

    def _digest(self, address: str, model: str) -> str:
        info = self._node(address).state.models.get(model)
        return info.digest if info else ""

    def explain(self, model: str, prompt_tokens: int, max_tokens: int, objective: Objective, link: Link | None) -> LlmDecision:
        """As a greedy request for ``model`` would be routed."""
        shape = GenerationShape(prompt_tokens=max(prompt_tokens, 1), max_tokens=max(max_tokens, 1),
                                prompt_bytes=estimated_prompt_bytes(prompt_tokens))
        return self.decide(model, shape, objective, link, drafter=self.drafter_for(pb.GenerateRequest(model=model)))
