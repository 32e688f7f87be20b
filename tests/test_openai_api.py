"""The agent's OpenAI-compatible HTTP API, driven by the official ``openai``
client against real daemons on loopback: the same planner and guarantees as
gRPC Generate, OpenAI's error objects, bearer keys, and disconnects."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from edge_agent import sdk
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch
from tests.test_fleet import wait_for
from tests.test_llm import STORY
from tests.test_operations import metric

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def client_for(daemon: launch.Daemon, **kwargs) -> openai.OpenAI:
    # no retries: a 429 or 503 is what a test looks at, not something to hide
    return openai.OpenAI(base_url=daemon.ready["http"] + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def streamed_text(stream) -> tuple[str, dict | None, object]:
    """The concatenated deltas, the closing chunk's ``tandem`` facts and the usage chunk's usage."""
    text, facts, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            if choice.finish_reason is not None:
                facts = chunk.model_extra["tandem"]
    return text, facts, usage


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


@pytest.mark.parametrize("plan", ["local", "remote"])
def test_greedy_text_through_the_openai_client_equals_the_sdks_streamed_and_whole(agent: launch.Daemon, plan: str) -> None:
    with sdk.EdgeClient(agent.address) as c:
        chat_ref = c.generate_text(messages=CHAT, model="smollm2", max_tokens=24, plan=plan)
        text_ref = c.generate_text("The capital of France is", model="smollm2", max_tokens=16, plan=plan)
    client = client_for(agent)
    pin = {"tandem": {"plan": plan}}
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                                           extra_body=pin)
    whole = raw.parse()
    assert whole.choices[0].message.content == chat_ref.text and whole.choices[0].finish_reason == chat_ref.summary.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (chat_ref.summary.prompt_tokens,
                                                                           chat_ref.summary.completion_tokens)
    facts = whole.model_extra["tandem"]
    assert facts["plan"] == facts["planned"] == plan and facts["fell_back"] is False
    assert facts["predicted"]["total_ms"] > 0 and facts["measured"]["total_ms"] > 0
    assert raw.headers["x-tandem-plan"] == plan and raw.headers["x-tandem-fell-back"] == "false"
    assert (raw.headers["x-tandem-node"] != "") == (plan == "remote")
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0, extra_body=pin,
                                            stream=True, stream_options={"include_usage": True})
    text, facts, usage = streamed_text(stream)
    assert text == chat_ref.text and facts["plan"] == plan and usage.completion_tokens == chat_ref.summary.completion_tokens
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16, temperature=0,
                                           extra_body=pin)
    assert completion.choices[0].text == text_ref.text
    text, _, _ = streamed_text(client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16,
                                                         temperature=0, extra_body=pin, stream=True))
    assert text == text_ref.text


def test_the_async_client_and_logprobs(agent: launch.Daemon) -> None:
    async def run() -> tuple:
        client = openai.AsyncOpenAI(base_url=agent.ready["http"] + "/v1", api_key="none", max_retries=0)
        whole = await client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0,
                                                     logprobs=True, top_logprobs=3)
        stream = await client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        await client.close()
        return whole, text

    whole, text = asyncio.run(run())
    assert whole.choices[0].message.content == text
    tokens = whole.choices[0].logprobs.content
    assert len(tokens) == whole.usage.completion_tokens
    for token in tokens:  # greedy: each token is its position's most likely, its logprob the top one
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob <= 0
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
    assert "".join(t.token for t in tokens) == text


def test_models_health_and_every_bad_request_gets_an_openai_error(agent: launch.Daemon, cloud: launch.Daemon) -> None:
    client = client_for(agent)
    (model,) = [m for m in client.models.list().data if m.id == "smollm2"]
    assert model.model_extra["tandem"] == {"on_device": True, "nodes": [cloud.address]}
    url = agent.ready["http"]
    with urllib.request.urlopen(url + "/health", timeout=10) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    good = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    bad = [  # (what is changed, status, parameter named)
        ({"n": 2}, 400, "n"), ({"temperature": "hot"}, 400, "temperature"), ({"temperature": 3}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"), ({"top_p": 0}, 400, "top_p"), ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"), ({"model": ""}, 400, "model"),
        ({"presence_penalty": 1.0}, 400, "presence_penalty"), ({"tools": [{"type": "function"}]}, 400, "tools"),
        ({"top_logprobs": 2}, 400, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"stop": ["x"] * 17}, 400, "stop"), ({"max_tokens": 10**6}, 400, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
        ({"model": "no-such-model"}, 404, None), ({"tandem": {"plan": "sideways"}}, 400, None),
    ]
    for change, status, param in bad:
        code, _, body = post(url + "/v1/chat/completions", json.dumps({**good, **change}).encode())
        assert code == status, (change, body)
        assert body["error"]["message"] and body["error"]["type"] and body["error"]["param"] == param, (change, body)
    for raw in (b"{not json", b"", b"[1, 2]", "{\"model\": \"\udcff\"}".encode("utf-8", "surrogatepass")):
        code, _, body = post(url + "/v1/chat/completions", raw)
        assert code == 400 and body["error"]["type"] == "invalid_request_error", (raw, body)
    code, _, body = post(url + "/v1/completions", json.dumps({"model": "smollm2", "prompt": ["a", "b"]}).encode())
    assert code == 400 and "one prompt" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2-xl", messages=CHAT)
    assert client.chat.completions.create(**good).choices[0].finish_reason == "length"  # still serving


def test_bearer_keys_when_configured(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nkey-one\nkey-two\n")
    with launch.edge_agent(model_dir, [], "--http-listen", "127.0.0.1:0", "--http-api-keys-file", str(keys)) as agent:
        with pytest.raises(openai.AuthenticationError):
            client_for(agent, api_key="wrong").models.list()
        assert client_for(agent, api_key="key-two").models.list().data == []  # no LLM on this one
        code, headers, body = post(agent.ready["http"] + "/v1/completions", b"{}")
        assert code == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["code"] == "invalid_api_key"
        with urllib.request.urlopen(agent.ready["http"] + "/health", timeout=10) as reply:
            assert reply.status == 200  # liveness probes need no key


def node_active(node: launch.Daemon) -> int:
    with grpc.insecure_channel(node.address) as channel:
        status = pb_grpc.CloudNodeStub(channel).Status(pb.StatusRequest(), timeout=10)
    return sum(load.active for load in status.llm)


@pytest.mark.parametrize("plan", ["local", "remote"])
def test_a_client_that_disconnects_frees_its_slot(agent: launch.Daemon, cloud: launch.Daemon, plan: str) -> None:
    metrics = agent.ready["metrics"]
    stream = client_for(agent).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": STORY}],
                                                       max_tokens=1500, temperature=0, stream=True,
                                                       extra_body={"tandem": {"plan": plan}})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    busy = (lambda: metric(metrics, "tandem_llm_requests_running", model="smollm2")) if plan == "local" else \
        (lambda: node_active(cloud))
    assert busy() == 1
    stream.close()
    wait_for(lambda: busy() == 0, f"the {plan} slot to be freed after the client left")


def test_a_node_killed_mid_stream_finishes_the_sse_stream_on_the_device(model_dir: Path) -> None:
    node = launch.cloud_node(model_dir, "--llm", "smollm2").wait_ready()
    try:
        with launch.edge_agent(model_dir, [node.address], "--llm", "smollm2", "--http-listen", "127.0.0.1:0") as agent:
            client = client_for(agent)
            ask = dict(model="smollm2", prompt=STORY, max_tokens=120, temperature=0)
            reference = client.completions.create(**ask, extra_body={"tandem": {"plan": "local"}})
            stream = client.completions.create(**ask, extra_body={"tandem": {"plan": "remote"}}, stream=True,
                                               stream_options={"include_usage": True}, logprobs=0)
            texts, facts, usage = [], None, None
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.logprobs is not None:
                        texts.append(choice.text)
                    if len(texts) == 5 and node.process.poll() is None:
                        node.kill()
                    if choice.finish_reason is not None:
                        facts = chunk.model_extra["tandem"]
    finally:
        node.stop()
    assert "".join(texts) == reference.choices[0].text  # none lost, none repeated
    assert len(texts) == usage.completion_tokens == reference.usage.completion_tokens
    assert facts["fell_back"] and facts["plan"] == "local" and facts["planned"] == "remote" and facts["switched_at_token"] >= 5


def test_a_full_agent_answers_429_with_retry_after_and_503_when_nothing_can_serve(model_dir: Path) -> None:
    with launch.edge_agent(model_dir, [], "--llm", "smollm2", "--llm-slots", "1", "--llm-max-queue", "0",
                           "--http-listen", "127.0.0.1:0") as agent:
        client = client_for(agent)
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": STORY}],
                                                max_tokens=1500, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)  # the only slot is taken, and no queue is allowed
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4)
        code, headers, body = post(agent.ready["http"] + "/v1/completions",
                                   json.dumps({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}).encode())
        assert code == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
        stream.close()
        code, _, body = post(agent.ready["http"] + "/v1/completions", json.dumps(
            {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "tandem": {"plan": "remote"}}).encode())
        assert code == 503, body  # no node to run it on, and the caller pinned it there
