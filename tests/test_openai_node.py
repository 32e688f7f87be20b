"""An agent streaming from a real OpenAI-compatible server (llama-cpp-python's
own, started on loopback): REMOTE greedy equals the server called directly,
a server killed mid-stream is finished on the device from the text already
streamed, and what such a server cannot take stays on the device."""

from __future__ import annotations

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
from runtimes.llm import find_smollm2
from runtimes.peers import LlamaServerPeer, PeerUnavailable

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def wait_planned(client: sdk.EdgeClient, base_url: str, tries: int = 300) -> None:
    """Readiness, not a sleep: until the agent plans generations on that server
    (its refresh has measured it; a busy machine can take a few rounds)."""
    for _ in range(tries):
        if any(c.plan == "remote" and c.node == base_url
               for c in client.explain("smollm2", prompt_tokens=8, max_tokens=8).candidates):
            return
        time.sleep(0.2)
    pytest.fail(f"the agent never planned on {base_url}")


def start_server(alias: str = "smollm2") -> LlamaServerPeer:
    try:
        return LlamaServerPeer(find_smollm2(), alias=alias).wait_ready()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server():
    peer = start_server("the-bigger-model")  # the cloud's name for it need not be the device's
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, server: LlamaServerPeer):
    # --llm-stall-s 60: on a loaded machine the server's first token may take over the default 5 s, and the
    # stream would move to the device; no test here is about a stall
    with launch.edge_agent(tmp_path_factory.mktemp("no-models"), [f"openai+{server.base_url}"], "--llm", "smollm2",
                           "--llm-remote-model", "the-bigger-model", "--llm-stall-s", "60") as daemon:
        yield daemon


def test_greedy_remote_equals_the_server_called_directly(agent, server: LlamaServerPeer) -> None:
    direct = openai.OpenAI(base_url=server.base_url, api_key="none")
    chat = direct.chat.completions.create(model="the-bigger-model", messages=MESSAGES, max_tokens=32, temperature=0.0)
    text = direct.completions.create(model="the-bigger-model", prompt=PROMPT, max_tokens=32, temperature=0.0)
    with sdk.EdgeClient(agent.address) as client:
        wait_planned(client, server.base_url)
        for result, expected in ((client.generate_text(messages=MESSAGES, max_tokens=32, plan="remote"), chat.choices[0].message.content),
                                 (client.generate_text(PROMPT, max_tokens=32, plan="remote"), text.choices[0].text)):
            assert result.text == expected, result.summary  # a switch to the device would name its reason
            summary = result.summary
            assert (summary.ran, summary.node, summary.switched) == ("remote", server.base_url, False)
            assert summary.finish_reason == "length"
        explained = client.explain("smollm2", prompt_tokens=32, max_tokens=64)
        assert any(c.plan == "remote" and c.node == server.base_url for c in explained.candidates)


def test_what_the_server_cannot_take_stays_on_the_device(agent) -> None:
    """Per-token log-probabilities need token ids, which such a server does not send."""
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb_grpc.EdgeAgentStub(channel)
        request = pb.GenerateRequest(model="smollm2", prompt=PROMPT, max_tokens=8, logprobs=True)
        *tokens, last = stub.Generate(request, timeout=60)
        assert last.done.ran == pb.PLAN_LOCAL and all(chunk.token.HasField("logprob") for chunk in tokens)
        request.plan = "remote"
        with pytest.raises(grpc.RpcError, match="not available") as refused:
            list(stub.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_server_killed_mid_stream_is_finished_on_the_device(tmp_path: Path) -> None:
    """No piece lost or repeated: the app's text is the server's pieces up to
    the break, then exactly what the device's model generates after that text."""
    server = start_server()
    try:
        with launch.edge_agent(tmp_path, [f"openai+{server.base_url}"], "--llm", "smollm2") as agent, \
                sdk.EdgeClient(agent.address) as client:
            wait_planned(client, server.base_url)
            pieces, summary = [], None
            for chunk in client.generate(PROMPT, max_tokens=48, plan="remote"):
                if isinstance(chunk, sdk.Token):
                    pieces.append(chunk.text)
                    if len(pieces) == 6:
                        server.kill()
                else:
                    summary = chunk
            assert summary.switched and summary.ran == "local" and summary.planned == "remote"
            streamed = "".join(pieces[:summary.switched_at_token])
            # the device's own continuation after that text, asked for directly
            bare = Llama(model_path=str(find_smollm2()), n_ctx=64, vocab_only=True, verbose=False)
            start = bare.tokenize(PROMPT.encode(), add_bos=False, special=True)
            before = bare.tokenize(streamed.encode(), add_bos=False, special=False)
            with grpc.insecure_channel(agent.address) as channel:
                *after, done = pb_grpc.EdgeAgentStub(channel).Generate(pb.GenerateRequest(
                    model="smollm2", prompt_token_ids=start, generated_token_ids=before, max_tokens=48, plan="local"))
            assert "".join(pieces) == streamed + "".join(chunk.token.text for chunk in after)
            assert summary.completion_tokens == done.done.completion_tokens == len(before) + len(after)
    finally:
        server.stop()


def test_a_node_table_with_a_key_file_reaches_a_server_that_wants_one(tmp_path: Path) -> None:
    """[[nodes]] in the agent's TOML: the key from api_key_file as a bearer
    token; with the wrong key the server refuses and the node is not planned."""
    try:
        server = LlamaServerPeer(find_smollm2(), alias="smollm2", api_key="sesame").wait_ready()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        for key, works in (("sesame", True), ("wrong", False)):
            (tmp_path / "key").write_text(f"{key}\n")
            (tmp_path / "agent.toml").write_text(
                f'[[nodes]]\naddress = "openai+{server.base_url}"\napi_key_file = "{tmp_path / "key"}"\nslots = 1\n')
            (tmp_path / "empty").mkdir(exist_ok=True)
            with launch.edge_agent(tmp_path / "empty", [], "--config", str(tmp_path / "agent.toml"), "--llm", "smollm2",
                                   "--llm-stall-s", "60") as agent, sdk.EdgeClient(agent.address) as client:
                if works:
                    wait_planned(client, server.base_url)
                    assert client.generate_text(PROMPT, max_tokens=8, plan="remote").summary.ran == "remote"
                else:
                    nodes = {c.node for c in client.explain("smollm2", prompt_tokens=8, max_tokens=8).candidates}
                    assert server.base_url not in nodes and "AuthenticationError" in agent.log()
    finally:
        server.stop()
