"""Measure both LLM tiers on the labelled set and calibrate when the device's
answer is trusted: what ``offload-tune calibrate-llm`` writes and the agent
loads (``llm_quality_file``) to route ``tier: auto`` generations."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from offload_tune.quality_tasks import KINDS, Item, labelled_set, split
from partitioner.quality import (
    FIRST_TOKENS,
    QualityPolicy,
    choose_escalation,
    choose_threshold,
    confidence,
    isotonic,
    routed,
)
from runtimes.llm import LlmEngine, Sampling

MAX_TOKENS = 12  # the longest answer in the set (six copied words) fits


@dataclass(frozen=True)
class Answer:
    text: str
    correct: bool
    logprobs: tuple[float, ...]
    pieces: tuple[str, ...] = ()  # the text token by token


def answer_all(engine: LlmEngine, items: list[Item], progress: Callable[[], None] | None = None,
               after: list[str] | None = None) -> list[Answer]:
    """Greedy completions of every item up to its first newline, with each
    token's log-probability; ``after``: each item's answer goes on after this
    text (appended to its prompt, as the agent continues an escalated answer)."""
    def one(item: Item, head: str) -> Answer:
        tokens, _ = engine.complete(engine.tokenize_prompt(item.prompt + head),
                                    Sampling(max_tokens=MAX_TOKENS, stop=("\n",), logprobs=0))
        if progress is not None:
            progress()
        pieces = tuple(t.text for t in tokens)
        text = head + "".join(pieces)
        return Answer(text, item.correct(text), tuple(t.logprobs.logprob for t in tokens), pieces)

    with ThreadPoolExecutor(engine.slots) as pool:
        return list(pool.map(one, items, after or [""] * len(items)))


def auroc(scores: list[float], labels: list[bool]) -> float:
    """The chance a right answer scores above a wrong one (ties half); nan without both."""
    right = [s for s, y in zip(scores, labels) if y]
    wrong = [s for s, y in zip(scores, labels) if not y]
    if not right or not wrong:
        return float("nan")
    return sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))


def device_heads(device: list[Answer], first_tokens: int = FIRST_TOKENS) -> list[str]:
    """The text of each device answer's first tokens: what an escalated answer continues after."""
    return ["".join(answer.pieces[:first_tokens]) for answer in device]


def calibrate(items: list[Item], device: list[Answer], cloud: list[Answer], *, device_model: str, cloud_model: str,
              quality_target: float = 0.95, first_tokens: int = FIRST_TOKENS,
              continued: list[Answer] | None = None) -> QualityPolicy:
    """Isotonic calibration and the threshold on one half of the items, judged
    on the other; with ``continued`` (the cloud model's answers after the
    device's first tokens), whether an escalated answer restarts or continues."""
    by_prompt = {item.prompt: (d, c) for item, d, c in zip(items, device, cloud)}
    calibration_items, test_items = split(items)

    def columns(part: list[Item]) -> tuple[list[float], list[bool], list[bool]]:
        rows = [by_prompt[i.prompt] for i in part]
        return ([confidence(d.logprobs, first_tokens) for d, _ in rows], [d.correct for d, _ in rows],
                [c.correct for _, c in rows])

    confs, device_right, cloud_right = columns(calibration_items)
    calibration = isotonic(confs, device_right)
    chosen = choose_threshold([calibration.probability(c) for c in confs], device_right, cloud_right,
                              quality_target=quality_target)
    test_confs, test_device, test_cloud = columns(test_items)
    on_test = routed([calibration.probability(c) for c in test_confs], test_device, test_cloud, chosen.threshold)
    by_kind = {kind: {"device": statistics.mean(by_prompt[i.prompt][0].correct for i in items if i.kind == kind),
                      "cloud": statistics.mean(by_prompt[i.prompt][1].correct for i in items if i.kind == kind)}
               for kind in KINDS}
    escalation, escalated_accuracy = "restart", None
    if continued is not None:
        after = {item.prompt: answer for item, answer in zip(items, continued)}
        escalated = [i for i, conf in zip(calibration_items, confs) if calibration.probability(conf) < chosen.threshold]
        restart_right = [by_prompt[i.prompt][1].correct for i in escalated]
        continue_right = [after[i.prompt].correct for i in escalated]
        escalation = choose_escalation(restart_right, continue_right)
        escalated_accuracy = {"items": len(escalated),
                              "restart": statistics.mean(restart_right) if escalated else float("nan"),
                              "continue": statistics.mean(continue_right) if escalated else float("nan"),
                              # over every calibration item, for a view that does not hang on the threshold
                              "restart_all": statistics.mean(by_prompt[i.prompt][1].correct for i in calibration_items),
                              "continue_all": statistics.mean(after[i.prompt].correct for i in calibration_items)}
    return QualityPolicy(device_model, cloud_model, first_tokens, calibration, chosen.threshold, chosen, on_test,
                         auroc(test_confs, test_device), by_kind, escalation, escalated_accuracy)


def measure(device: LlmEngine, cloud: LlmEngine, *, size: int = 400, progress: Callable[[], None] | None = None
            ) -> tuple[list[Item], list[Answer], list[Answer], list[Answer]]:
    """Each tier's answers, and the cloud model's after the device's first tokens."""
    items = labelled_set(size)
    device_answers = answer_all(device, items, progress)
    return (items, device_answers, answer_all(cloud, items, progress),
            answer_all(cloud, items, progress, after=device_heads(device_answers)))
