"""Deferred requests through a real agent: accepted while no node can take
them, delivered when one returns (results equal to running them directly),
one request per idempotency key, bounds refused by name, deadlines recorded,
and a kill -9 of the agent mid-queue loses and repeats nothing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edge_agent import sdk
from runtimes import launch
from runtimes.onnx_exec import OnnxModel
from runtimes.peers import free_port

RTOL = ATOL = 1e-5


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)


def agent_for(model_dir: Path, node_port: int, queue: Path, *extra: str) -> launch.Daemon:
    return launch.edge_agent(model_dir, [f"127.0.0.1:{node_port}"], "--queue-file", str(queue), "--refresh-s", "0.5",
                             *extra)


def wait_all(client: sdk.EdgeClient, ids: list[str]) -> dict[str, sdk.DeferredResult]:
    ended = {r.id: r for r in client.results(ids, deadline=120)}
    assert set(ended) == set(ids)
    return ended


def test_accepted_while_no_node_answers_and_delivered_when_one_returns(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    model = OnnxModel("mobilenet", model_dir / "mobilenet.onnx")
    with agent_for(model_dir, port, tmp_path / "q.sqlite") as agent, sdk.EdgeClient(agent.address) as client:
        deferrals = [client.infer("mobilenet", {"input": image(i)}, plan="remote", defer=True,
                                  deliver_by=time.time() + 300, idempotency_key=f"req-{i}") for i in range(4)]
        assert all(d.created and d.state == "queued" for d in deferrals)
        again = client.infer("mobilenet", {"input": image(0)}, plan="remote", defer=True,
                             deliver_by=time.time() + 300, idempotency_key="req-0")
        assert (again.id, again.created) == (deferrals[0].id, False)  # one request per key
        assert client.result(deferrals[0].id).state == "queued"
        with launch.cloud_node(model_dir, "--listen", f"127.0.0.1:{port}") as node:
            results = wait_all(client, [d.id for d in deferrals])
        for i, deferral in enumerate(deferrals):
            result = results[deferral.id]
            assert result.state == "done" and result.attempts == 1
            assert (result.infer.plan, result.infer.node) == ("remote", node.address)
            np.testing.assert_allclose(result.infer.outputs["logits"], model.run({"input": image(i)})["logits"],
                                       rtol=RTOL, atol=ATOL)
        assert client.result(deferrals[0].id).state == "done"  # fetched results stay a while

        async def through_the_async_client() -> list[str]:
            async with sdk.AsyncEdgeClient(agent.address) as twin:
                one = await twin.result(deferrals[1].id)
                streamed = [r.id async for r in twin.results([d.id for d in deferrals[:2]], deadline=30)]
                return [one.state, *streamed]

        assert asyncio.run(through_the_async_client()) == ["done", deferrals[0].id, deferrals[1].id]


def test_bounds_and_deadlines_are_refused_and_recorded_by_name(model_dir: Path, tmp_path: Path) -> None:
    with agent_for(model_dir, free_port(), tmp_path / "q.sqlite", "--queue-max-requests", "2") as agent, \
            sdk.EdgeClient(agent.address) as client:
        soon = client.infer("mobilenet", {"input": image(0)}, defer=True, deliver_by=time.time() + 1.5)
        client.infer("mobilenet", {"input": image(1)}, defer=True, deliver_by=time.time() + 300, idempotency_key="k1")
        with pytest.raises(sdk.ResourceExhausted, match="max_requests = 2"):
            client.infer("mobilenet", {"input": image(2)}, defer=True, deliver_by=time.time() + 300)
        with pytest.raises(sdk.ResourceExhausted, match="max_wait_s"):
            client.infer("mobilenet", {"input": image(3)}, defer=True, deliver_by=time.time() + 10 * 86400)
        with pytest.raises(sdk.TandemError, match="already names another request"):
            client.infer("mobilenet", {"input": image(4)}, defer=True, deliver_by=time.time() + 300, idempotency_key="k1")
        with pytest.raises(sdk.NotFound):
            client.result("no-such-id")
        late = client.result(soon.id, wait=30)
        assert (late.state, late.error_code) == ("failed", "DEADLINE_EXCEEDED")


def test_a_kill_9_of_the_agent_mid_queue_delivers_every_request_once(model_dir: Path, tmp_path: Path) -> None:
    """Six queued while the node is down; the node returns, and once two are
    done the agent is killed -9, a third perhaps on its way to the node. After
    the restart every one is done once: the two finished before keep the
    result they had (not computed again), the rest are delivered."""
    port, queue = free_port(), tmp_path / "q.sqlite"
    model = OnnxModel("mobilenet", model_dir / "mobilenet.onnx")
    agent = agent_for(model_dir, port, queue).wait_ready()
    with launch.cloud_node(model_dir, "--listen", f"127.0.0.1:{port}") as node:
        try:
            with sdk.EdgeClient(agent.address) as client:
                ids = [client.infer("mobilenet", {"input": image(i)}, plan="remote", defer=True,
                                    deliver_by=time.time() + 300, idempotency_key=f"k{i}").id for i in range(6)]
                first = [client.result(ids[i], wait=60) for i in range(2)]
        finally:
            agent.kill()
            agent.stop()
        assert [r.state for r in first] == ["done", "done"]
        with agent_for(model_dir, port, queue) as again, sdk.EdgeClient(again.address) as client:
            assert [client.infer("mobilenet", {"input": image(i)}, plan="remote", defer=True,
                                 deliver_by=time.time() + 300, idempotency_key=f"k{i}").created
                    for i in range(6)] == [False] * 6
            results = wait_all(client, ids)
    for i, request_id in enumerate(ids):
        result = results[request_id]
        assert result.state == "done" and result.infer.node == node.address
        np.testing.assert_allclose(result.infer.outputs["logits"], model.run({"input": image(i)})["logits"],
                                   rtol=RTOL, atol=ATOL)
    for before in first:
        assert results[before.id].attempts == 1 and results[before.id].infer.measured == before.infer.measured
    assert sum(results[i].attempts for i in ids) <= 7  # at most the one in flight at the kill went twice


def test_a_deferred_generation_is_kept_whole_with_its_usage(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with agent_for(model_dir, port, tmp_path / "q.sqlite", "--llm", "smollm2") as agent, \
            sdk.EdgeClient(agent.address) as client:
        expected = client.generate_text("The three primary colors are", model="smollm2", max_tokens=24, plan="local")
        deferral = client.generate_text("The three primary colors are", model="smollm2", max_tokens=24, plan="remote",
                                        defer=True, deliver_by=time.time() + 300)
        assert client.result(deferral.id).state == "queued"  # no node serves it yet
        with launch.cloud_node(model_dir, "--listen", f"127.0.0.1:{port}", "--llm", "smollm2") as node:
            result = client.result(deferral.id, wait=120)
        assert result.state == "done"
        completion = result.completion
        assert completion.text == expected.text and completion.token_ids == expected.token_ids
        summary = completion.summary
        # delivered to the node; one that stalled there under load (llm_stall_s) finishes on the device, as a live one
        assert summary.planned == "remote"
        assert (summary.ran, summary.node) == ("remote", node.address) or (summary.switched and summary.switch_reason)
        assert completion.summary.completion_tokens == 24 and completion.summary.prompt_tokens > 0


def test_the_http_api_defers_a_completion_and_serves_its_result(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with agent_for(model_dir, port, tmp_path / "q.sqlite", "--llm", "smollm2", "--http-listen", "127.0.0.1:0") as agent:
        url = agent.ready["http"]
        body = {"model": "smollm2", "prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0,
                "tandem": {"defer": True, "deliver_by": time.time() + 300, "idempotency_key": "http-1"}}
        first = post_json(f"{url}/v1/completions", body)
        again = post_json(f"{url}/v1/completions", body)
        assert (first["status"], again["status"]) == (202, 200) and first["id"] == again["id"]
        assert get_json(f"{url}/v1/tandem/requests/{first['id']}")["state"] == "queued"
        with launch.cloud_node(model_dir, "--listen", f"127.0.0.1:{port}", "--llm", "smollm2"):
            done = get_json(f"{url}/v1/tandem/requests/{first['id']}?wait=120")
        assert done["state"] == "done" and done["result"]["usage"]["completion_tokens"] == 16
        with sdk.EdgeClient(agent.address) as client:
            assert done["result"]["text"] == client.generate_text("The three primary colors are", model="smollm2",
                                                                   max_tokens=16, plan="local").text
        assert get_json(f"{url}/v1/tandem/requests/nope", ok=False)["error"]["type"] == "invalid_request_error"
        body["stream"] = True
        assert post_json(f"{url}/v1/completions", body, ok=False)["status"] == 400


def post_json(url: str, body: dict, ok: bool = True) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return {**json.loads(reply.read()), "status": reply.status}
    except urllib.error.HTTPError as exc:
        assert not ok, exc.read()
        return {**json.loads(exc.read()), "status": exc.code}


def get_json(url: str, ok: bool = True) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=180) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        assert not ok, exc.read()
        return json.loads(exc.read())


def test_offline_is_seen_and_said_and_cloud_plans_cost_nothing_while_it_lasts(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with agent_for(model_dir, port, tmp_path / "q.sqlite", "--http-listen", "127.0.0.1:0",
                   "--metrics-listen", "127.0.0.1:0") as agent, sdk.EdgeClient(agent.address) as client:
        explained = client.explain("mobilenet")
        assert (explained.connectivity, explained.connectivity_reason) == ("offline", "none of the 1 nodes answers")
        client.infer("mobilenet", {"input": image(0)}, defer=True, deliver_by=time.time() + 300)
        assert client.explain("mobilenet").deferred_pending == 1
        pinned = client.infer("mobilenet", {"input": image(0)}, plan="remote")
        assert pinned.fell_back and "offline: none of the 1 nodes answers" in pinned.fallback_reason
        assert pinned.measured["network_ms"] == 0  # no cloud call was tried
        planned = client.infer("mobilenet", {"input": image(0)})
        assert (planned.planned, planned.fell_back) == ("local", False)
        health = get_json(f"{agent.ready['http']}/health")
        assert health["cloud"]["state"] == "offline" and health["deferred"]["pending"] == 1
        with launch.cloud_node(model_dir, "--listen", f"127.0.0.1:{port}") as node:
            for _ in range(300):  # bounded: the probes find it within a refresh or two
                if client.explain("mobilenet").connectivity == "online":
                    break
                time.sleep(0.1)
            assert client.explain("mobilenet").connectivity == "online"
            assert client.infer("mobilenet", {"input": image(0)}, plan="remote").node == node.address
            for _ in range(300):
                if client.explain("mobilenet").deferred_pending == 0:
                    break
                time.sleep(0.1)
            assert client.explain("mobilenet").deferred_pending == 0  # the queue drained once it was back
            metrics = urllib.request.urlopen(agent.ready["metrics"], timeout=10).read().decode()
            assert 'tandem_connectivity{state="online"} 1.0' in metrics and "tandem_deferred_pending 0.0" in metrics
