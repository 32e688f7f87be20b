"""Calibrating the device's confidence and choosing the escalation threshold (partitioner.quality)."""

from __future__ import annotations

import json
import math
import random

import pytest

from offload_tune.quality_tasks import KINDS, labelled_set, split
from partitioner.quality import (
    Calibration,
    QualityPolicy,
    Route,
    choose_escalation,
    choose_threshold,
    confidence,
    isotonic,
    routed,
)


def test_confidence_is_the_mean_log_probability_of_the_first_tokens() -> None:
    assert confidence([-0.1, -0.3, -0.2, -0.4, -5.0]) == pytest.approx(-0.25)
    assert confidence([-0.5], first=4) == -0.5
    assert confidence([]) == -math.inf


def test_isotonic_is_monotone_and_is_the_mean_where_the_data_already_is() -> None:
    rng = random.Random(3)
    confs = [rng.uniform(-3, 0) for _ in range(300)]
    labels = [rng.random() < math.exp(c) for c in confs]  # right more often when more confident
    cal = isotonic(confs, labels)
    probs = [cal.probability(c) for c in sorted(confs)]
    assert all(b >= a for a, b in zip(probs, probs[1:]))
    # every pooled block's level is its items' accuracy: the map keeps the overall mean
    assert sum(cal.probability(c) for c in confs) == pytest.approx(sum(labels))
    already_sorted = isotonic([0.0, 1.0, 2.0], [False, True, True])
    assert already_sorted.levels == (0.0, 1.0) and already_sorted.probability(5.0) == 1.0
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_the_threshold_is_the_lowest_that_keeps_the_quality_target() -> None:
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 40)
        probs = [round(rng.random(), 2) for _ in range(n)]
        device = [rng.random() < p for p in probs]
        cloud = [rng.random() < 0.8 for _ in range(n)]
        target = rng.choice([0.9, 0.95, 1.0])
        chosen = choose_threshold(probs, device, cloud, quality_target=target)
        ok = [t for t in sorted({0.0, *probs, 1.5})
              if routed(probs, device, cloud, t).routed_accuracy >= target * chosen.cloud_accuracy]
        assert chosen.threshold == (ok[0] if ok[0] <= 1.0 else math.nextafter(1.0, 2.0))
        assert chosen.routed_accuracy >= target * chosen.cloud_accuracy


def test_the_labelled_set_is_balanced_distinct_checked_and_split_by_item() -> None:
    items = labelled_set(400)
    assert len({i.prompt for i in items}) == 400
    assert {i.kind for i in items} == set(KINDS) and all(sum(i.kind == k for i in items) == 80 for k in KINDS)
    assert labelled_set(400) == items  # the same set on every machine
    calibration, test = split(items)
    assert len(calibration) == len(test) == 200 and not {i.prompt for i in calibration} & {i.prompt for i in test}
    item = items[0]
    assert item.correct(f" {item.answer}.\nQ: more") and not item.correct(" something else")


def test_an_escalated_answer_continues_only_where_that_measured_as_good_as_restarting() -> None:
    assert choose_escalation([True, False, True], [True, True, False]) == "continue"   # as many right
    assert choose_escalation([True, True, False], [True, False, False]) == "restart"
    assert choose_escalation([], []) == "restart"                                        # nothing to judge by
    with pytest.raises(ValueError):
        choose_escalation([True], [])


def test_a_policy_keeps_its_escalation_and_an_older_file_restarts() -> None:
    unmeasured = Route(0.5, 0.0, 0.0, 0.0, 0.0)
    policy = QualityPolicy("smollm2", "gemma3-270m", 4, Calibration((0.0,), (0.5,)), 0.5, unmeasured, unmeasured,
                           0.5, {}, "continue", {"items": 3, "restart": 0.3, "continue": 0.6})
    assert QualityPolicy.from_json(policy.to_json()) == policy
    older = json.loads(policy.to_json())
    del older["escalation"], older["escalated_accuracy"]
    assert QualityPolicy.from_json(json.dumps(older)).escalation == "restart"
    with pytest.raises(ValueError, match="escalation"):
        QualityPolicy("smollm2", "gemma3-270m", 4, Calibration((0.0,), (0.5,)), 0.5, unmeasured, unmeasured, 0.5, {},
                      "merge")
