"""Draft-and-verify decoding on real daemons: the device's SmolLM2-135M drafts,
the node's Gemma 3 270M checks, across two vocabularies. The app must get
exactly the node's own greedy tokens, and a node lost mid-verification must
leave one stream with nothing lost or repeated."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import openai
import pytest
from llama_cpp import Llama

from edge_agent import sdk
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from runtimes.llm import LlmEngine, Round, RoundEvent, Sampling, TokenEvent, find_smollm2
from runtimes.llm_serving import RoundSession

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def fibonacci(n):\n"]
DEVICE = ("--llm", "smollm2", "--llm-cloud-model", "gemma3-270m")


def when_the_node_is_seen(client: sdk.EdgeClient) -> None:
    """The agent learns what its node serves from its status: a bounded wait."""
    for _ in range(300):
        try:
            client.generate_text(prompt="Hi", model="gemma3-270m", max_tokens=1)
            return
        except (sdk.NotFound, sdk.Unavailable):
            time.sleep(0.1)


@pytest.fixture(scope="module")
def client(no_models: Path, gemma_cloud: launch.Daemon):
    # A round the node is slow to check under load must not pass for a broken node
    # (the device would finish the text in its own words): these tests are about exactness.
    with launch.edge_agent(no_models, [gemma_cloud.address], *DEVICE, "--llm-stall-s", "60") as agent, \
            sdk.EdgeClient(agent.address) as c:
        when_the_node_is_seen(c)
        yield c


@pytest.mark.parametrize("stop", [(), ("\n\n",)])
def test_drafted_here_and_checked_there_is_token_for_token_the_cloud_models_greedy_output(
        client: sdk.EdgeClient, stop: tuple[str, ...]) -> None:
    drafted = accepted = 0
    for prompt in PROMPTS:
        alone = client.generate_text(prompt=prompt, model="gemma3-270m", max_tokens=40, stop=list(stop), plan="remote")
        checked = client.generate_text(prompt=prompt, model="gemma3-270m", max_tokens=40, stop=list(stop),
                                       plan="speculative")
        assert checked.token_ids == alone.token_ids and checked.text == alone.text, (prompt, checked.summary)
        summary = checked.summary
        assert (summary.ran, summary.model, summary.finish_reason) == ("speculative", "gemma3-270m",
                                                                       alone.summary.finish_reason)
        assert summary.completion_tokens == len(checked.token_ids)
        assert 0 <= summary.accepted_tokens <= summary.drafted_tokens and summary.draft_rounds > 0
        drafted, accepted = drafted + summary.drafted_tokens, accepted + summary.accepted_tokens
    assert accepted > 0  # the device's text did stand in the other vocabulary, not only the node's own tokens


def test_explain_shows_the_speculative_route_with_its_draft_length(client: sdk.EdgeClient) -> None:
    explained = client.explain(tier="cloud", prompt_tokens=16, max_tokens=64)
    assert explained.model == "gemma3-270m" and explained.why.startswith("tier cloud")
    speculative = next(c for c in explained.candidates if c.plan == "speculative")
    assert speculative.draft_tokens >= 1 and speculative.node and speculative.predicted["total_ms"] > 0
    with pytest.raises(sdk.InvalidArgument, match="llm_quality_file"):
        client.explain(tier="auto")


def test_openai_clients_name_a_tier_as_a_model(no_models: Path, gemma_cloud: launch.Daemon) -> None:
    with launch.edge_agent(no_models, [gemma_cloud.address], *DEVICE, "--http-listen", "127.0.0.1:0") as agent, \
            sdk.EdgeClient(agent.address) as c:
        when_the_node_is_seen(c)
        http = openai.OpenAI(base_url=agent.ready["http"] + "/v1", api_key="none", max_retries=0)
        listed = {m.id for m in http.models.list().data}
        assert {"smollm2", "gemma3-270m", "tier:device", "tier:cloud"} <= listed and "tier:auto" not in listed
        for tier, model in (("device", "smollm2"), ("cloud", "gemma3-270m")):
            reply = http.completions.create(model=f"tier:{tier}", prompt=PROMPTS[0], max_tokens=12, temperature=0)
            alone = c.generate_text(prompt=PROMPTS[0], tier=tier, max_tokens=12)
            assert reply.choices[0].text == alone.text
            assert reply.model == f"tier:{tier}" and reply.model_extra["tandem"]["model"] == model
        with pytest.raises(openai.BadRequestError, match="llm_quality_file"):
            http.completions.create(model="tier:auto", prompt=PROMPTS[0], max_tokens=4)


def test_a_node_killed_mid_verification_is_finished_on_the_device_with_nothing_lost_or_repeated(
        no_models: Path) -> None:
    node = launch.cloud_node(no_models, "--llm", "gemma3-270m").wait_ready()
    try:
        with launch.edge_agent(no_models, [node.address], *DEVICE) as agent, sdk.EdgeClient(agent.address) as c:
            when_the_node_is_seen(c)
            tokens, summary = [], None
            for chunk in c.generate(PROMPTS[0], model="gemma3-270m", max_tokens=48, plan="speculative"):
                if isinstance(chunk, sdk.Token):
                    tokens.append(chunk)
                    if len(tokens) == 6:
                        node.kill()
                else:
                    summary = chunk
            assert summary.switched and summary.ran == "local" and summary.planned == "speculative"
            assert summary.model == "smollm2" and summary.switch_reason
            assert [t.index for t in tokens] == list(range(len(tokens)))  # none lost, none repeated
            streamed = "".join(t.text for t in tokens[:summary.switched_at_token])
            # the device's own continuation after that text, asked for directly
            bare = Llama(model_path=str(find_smollm2()), n_ctx=64, vocab_only=True, verbose=False)
            start = bare.tokenize(PROMPTS[0].encode(), add_bos=False, special=True)
            before = bare.tokenize(streamed.encode(), add_bos=False, special=False)
            with grpc.insecure_channel(agent.address) as channel:
                *after, _ = pb_grpc.EdgeAgentStub(channel).Generate(pb.GenerateRequest(
                    model="smollm2", prompt_token_ids=start, generated_token_ids=before, max_tokens=48, plan="local"))
            assert "".join(t.text for t in tokens) == streamed + "".join(chunk.token.text for chunk in after)
    finally:
        node.stop()


@pytest.mark.parametrize("batched", [False, True])
def test_verifying_rounds_stream_the_models_own_tokens_whatever_the_draft(batched: bool) -> None:
    """Engine level, one model: drafts right, half right and wrong all give
    the plain greedy generation (checked step by step; in one call each the
    logits may differ, so there only the accounting is checked), and each
    round says what it accepted."""
    engine = LlmEngine("smollm2", find_smollm2(), slots=2, ctx_per_seq=256, batched_verify=batched)
    try:
        prompt = engine.tokenize_prompt("The days of the week are")
        plain = [e.token_id for e in engine.complete(prompt, Sampling(max_tokens=32))[0]]
        drafts = [tuple(plain[1:5]), (plain[5], plain[6], 7, 7), (3, 3, 3), tuple(plain[9:40])]
        streamed, rounds = asyncio.run(verified(engine, prompt, drafts))
        assert streamed == plain or batched
        assert streamed[:sum(len(r.tokens) for r in rounds)] == [t for r in rounds for t in r.tokens]
        first, *checked = rounds
        assert first.tokens == (plain[0],) and first.drafted == 0
        for draft, event in zip(drafts, checked):
            agreeing = 0
            while agreeing < min(len(draft), len(event.tokens)) and draft[agreeing] == event.tokens[agreeing]:
                agreeing += 1
            assert event.accepted == agreeing == len(event.tokens) - 1
            assert event.drafted == len(draft) or event is checked[-1]  # the last is cut at max_tokens
    finally:
        engine.close()


async def verified(engine: LlmEngine, prompt: list[int], drafts: list[tuple[int, ...]]
                   ) -> tuple[list[int], list[RoundEvent]]:
    """Every token streamed and every round, sending ``drafts`` one per round."""
    session = RoundSession(engine, prompt, Sampling(max_tokens=32), rounds="verify")
    streamed, rounds, pending = [], [], list(drafts)
    try:
        while session.done is None:
            event = await session.next_event()
            if isinstance(event, TokenEvent):
                streamed.append(event.token_id)
            elif isinstance(event, RoundEvent):
                rounds.append(event)
                session.send(Round(draft=pending.pop(0) if pending else ()))
    finally:
        session.close()
    return streamed, rounds
