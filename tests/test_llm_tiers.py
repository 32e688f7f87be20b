"""Two tiers on real daemons: the device's SmolLM2-135M and the cloud's Gemma 3
270M (the packaged GGUFs), a request routed by tier, and tier auto following
the calibrated threshold on the device's own confidence."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from edge_agent import sdk
from offload_tune.quality import answer_all
from offload_tune.quality_tasks import labelled_set
from partitioner.quality import Calibration, QualityPolicy, Route, confidence
from runtimes import launch
from runtimes.llm import LlmEngine, find_smollm2

ANSWER_TOKENS = 12  # as offload_tune.quality measures: up to the first newline


@pytest.fixture(scope="module")
def items() -> list:
    return labelled_set(40)[:10]  # two of each kind


@pytest.fixture(scope="module")
def confidences(items: list) -> list[float]:
    """Each prompt's confidence as the device computes it (the same file, greedy)."""
    engine = LlmEngine("smollm2", find_smollm2(), slots=2, ctx_per_seq=512)
    try:
        return [confidence(answer.logprobs) for answer in answer_all(engine, items)]
    finally:
        engine.close()


def policy_splitting(confidences: list[float]) -> QualityPolicy:
    """A monotone calibration over these confidences, its threshold at their median
    probability: about half the prompts stay on the device, the rest escalate."""
    edges = tuple(sorted({c for c in confidences if math.isfinite(c)}))
    levels = tuple(0.05 + 0.9 * i / max(len(edges) - 1, 1) for i in range(len(edges)))
    calibration = Calibration(edges, levels)
    threshold = sorted(calibration.probability(c) for c in confidences)[len(confidences) // 2]
    unmeasured = Route(threshold, 0.0, 0.0, 0.0, 0.0)  # this policy is made for the test, not measured
    return QualityPolicy("smollm2", "gemma3-270m", 4, calibration, threshold, unmeasured, unmeasured, 0.5, {})


def when_the_node_is_seen(client: sdk.EdgeClient, **kwargs) -> sdk.Completion:
    """The agent learns what its node serves from its status: retry a bounded number of times."""
    for _ in range(200):
        try:
            return client.generate_text(**kwargs)
        except (sdk.NotFound, sdk.Unavailable):
            time.sleep(0.1)
    return client.generate_text(**kwargs)


def test_tier_auto_follows_the_calibrated_threshold_and_says_which_model_answered(
        no_models: Path, tmp_path: Path, gemma_cloud: launch.Daemon, items: list, confidences: list[float]) -> None:
    policy = policy_splitting(confidences)
    expected = [policy.calibration.probability(c) < policy.threshold for c in confidences]
    assert any(expected) and not all(expected)  # both ways are exercised
    quality_file = tmp_path / "quality.json"
    quality_file.write_text(policy.to_json())
    with launch.edge_agent(no_models, [gemma_cloud.address], "--llm", "smollm2", "--llm-cloud-model", "gemma3-270m",
                              "--llm-quality-file", str(quality_file)) as agent, sdk.EdgeClient(agent.address) as client:
        when_the_node_is_seen(client, prompt="Hello", tier="cloud", max_tokens=2)
        explained = client.explain(tier="auto", prompt_tokens=16, max_tokens=ANSWER_TOKENS)
        assert (explained.tier, explained.model, explained.confidence_tokens) == ("auto", "gemma3-270m", 4)
        assert explained.threshold == pytest.approx(policy.threshold) and explained.why.startswith("tier auto: smollm2")
        assert {c.plan for c in explained.candidates} >= {"remote", "speculative"}
        for item, escalate in zip(items, expected):
            ask = dict(prompt=item.prompt, max_tokens=ANSWER_TOKENS, stop=["\n"])
            routed = client.generate_text(tier="auto", **ask)
            summary = routed.summary
            assert (summary.tier, summary.escalated) == ("auto", escalate), summary.reason
            assert summary.threshold == pytest.approx(policy.threshold)
            assert summary.confidence_probability == pytest.approx(
                policy.calibration.probability(summary.confidence), abs=1e-9)
            # the answer is exactly the one tier's own: nothing of the device's leaks into an escalated one
            alone = client.generate_text(tier="cloud" if escalate else "device", **ask)
            assert summary.model == alone.summary.model == ("gemma3-270m" if escalate else "smollm2")
            assert routed.text == alone.text and routed.token_ids == alone.token_ids
            # the cloud model's answer, streamed or drafted here and checked there (the same tokens)
            assert summary.ran in (("remote", "speculative") if escalate else ("local",))
        with pytest.raises(sdk.InvalidArgument, match="tier must be"):
            client.generate_text(prompt="Hi", tier="bigger")
        with pytest.raises(sdk.InvalidArgument, match="not both"):
            client.generate_text(prompt="Hi", tier="auto", model="smollm2")


def test_an_escalated_answer_continues_after_the_devices_first_tokens_when_the_policy_says_so(
        no_models: Path, tmp_path: Path, gemma_cloud: launch.Daemon, items: list) -> None:
    """Every answer escalates (a threshold above any probability) and continues:
    the app's text is the device's first tokens, then the cloud model's own
    answer to the prompt followed by them."""
    unmeasured = Route(1.5, 0.0, 0.0, 0.0, 0.0)
    policy = QualityPolicy("smollm2", "gemma3-270m", 4, Calibration((0.0,), (0.5,)), 1.5, unmeasured, unmeasured, 0.5,
                           {}, "continue")
    quality_file = tmp_path / "quality.json"
    quality_file.write_text(policy.to_json())
    with launch.edge_agent(no_models, [gemma_cloud.address], "--llm", "smollm2", "--llm-cloud-model", "gemma3-270m",
                           "--llm-quality-file", str(quality_file)) as agent, sdk.EdgeClient(agent.address) as client:
        when_the_node_is_seen(client, prompt="Hello", tier="cloud", max_tokens=2)
        continued = 0
        for item in items[:4]:
            ask = dict(prompt=item.prompt, max_tokens=ANSWER_TOKENS, stop=["\n"])
            routed = client.generate_text(tier="auto", **ask)
            device = client.generate_text(tier="device", **ask)
            assert routed.summary.escalated and routed.summary.model == "gemma3-270m"
            if len(device.token_ids) < 4:  # the device's answer ended within the tokens judged: nothing to continue
                assert "afresh" in routed.summary.reason
                continue
            head = client.generate_text(tier="device", prompt=item.prompt, max_tokens=4).text
            rest = client.generate_text(tier="cloud", prompt=item.prompt + head, max_tokens=ANSWER_TOKENS - 4,
                                        stop=["\n"])
            assert routed.text == head + rest.text, routed.summary.reason
            assert routed.summary.completion_tokens == 4 + len(rest.token_ids)
            assert "continued after the device's first 4 tokens" in routed.summary.reason
            continued += 1
        assert continued  # the set's first answers are longer than the tokens judged


def test_a_quality_file_that_is_not_one_stops_the_agent_with_the_reason(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "quality.json"
    bad.write_text('{"format": 1, "device_model": "smollm2"}')
    with pytest.raises(RuntimeError, match="llm_quality_file"):
        launch.edge_agent(model_dir, [], "--llm", "smollm2", "--llm-quality-file", str(bad)).wait_ready()
