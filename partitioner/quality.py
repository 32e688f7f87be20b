"""When the device's own answer is good enough: its confidence, calibrated.

Pure decision logic (no I/O, no clock). The device generates; its confidence
is the mean log-probability of its first tokens (a signal that needs no
training and held up better out of distribution than trained routers in a
2026 study of small-model routing, see issue 15). Calibration maps it to the
probability that the answer is right, by isotonic regression (pool adjacent
violators: the most likely monotone map, no shape assumed) on a labelled
set. A threshold on that probability routes: at or above it the device
answers; below it the request goes to the cloud's bigger model.

The threshold is chosen on the calibration split where the cloud model's
answers were labelled too: the lowest one (fewest cloud calls) whose routed
accuracy stays at or above ``quality_target`` times the cloud's own. The
test split, never seen by the choice, says what it gives.

An escalated answer either restarts (the cloud model answers the prompt
afresh) or continues (it goes on after the device's first tokens, which it
then need not generate). ``choose_escalation`` keeps continuing only where
it measured as accurate as restarting on the calibration split's escalated
items.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

FIRST_TOKENS = 4  # the confidence reads this many generated tokens (fewer if the answer is shorter)
POLICY_FORMAT = 1


def confidence(logprobs: Sequence[float], first: int = FIRST_TOKENS) -> float:
    """Mean natural-log probability of the first ``first`` tokens; -inf for none."""
    head = [lp for lp in logprobs[:first] if math.isfinite(lp)]
    return sum(head) / len(head) if head else -math.inf


@dataclass(frozen=True)
class Calibration:
    """An isotonic map: confidence -> probability the device's answer is right.
    ``edges`` are the lowest confidences of its steps (ascending), ``levels``
    the probability on each step (non-decreasing)."""

    edges: tuple[float, ...]
    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.edges or len(self.edges) != len(self.levels):
            raise ValueError("a calibration needs one level per edge, at least one")
        if any(b < a for a, b in zip(self.edges, self.edges[1:])) or any(b < a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError("a calibration's edges and levels must both ascend")
        if not all(0.0 <= p <= 1.0 for p in self.levels):
            raise ValueError("a calibration's levels are probabilities")

    def probability(self, conf: float) -> float:
        step = bisect.bisect_right(self.edges, conf) - 1
        return self.levels[max(step, 0)]

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(tuple(float(e) for e in data["edges"]), tuple(float(p) for p in data["levels"]))


def isotonic(confidences: Sequence[float], correct: Sequence[bool]) -> Calibration:
    """Pool adjacent violators over the items sorted by confidence."""
    if len(confidences) != len(correct) or not confidences:
        raise ValueError("isotonic needs as many labels as confidences, at least one")
    order = sorted(range(len(confidences)), key=lambda i: confidences[i])
    blocks: list[list[float]] = []  # [lowest confidence, sum of labels, count]
    for i in order:
        blocks.append([confidences[i], float(correct[i]), 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            low, total, count = blocks.pop()
            blocks[-1][1] += total
            blocks[-1][2] += count
    return Calibration(tuple(b[0] for b in blocks), tuple(b[1] / b[2] for b in blocks))


@dataclass(frozen=True)
class Route:
    threshold: float        # calibrated probability at or above which the device answers
    routed_accuracy: float  # on the items it was measured on
    cloud_share: float      # of those items sent to the cloud
    device_accuracy: float
    cloud_accuracy: float


def routed(probabilities: Sequence[float], device_correct: Sequence[bool], cloud_correct: Sequence[bool],
           threshold: float) -> Route:
    """What routing at ``threshold`` gives on labelled items."""
    n = len(probabilities)
    if not n or len(device_correct) != n or len(cloud_correct) != n:
        raise ValueError("routed needs the same number (at least one) of probabilities and labels")
    to_cloud = [p < threshold for p in probabilities]
    right = sum(c if up else d for up, d, c in zip(to_cloud, device_correct, cloud_correct))
    return Route(threshold, right / n, sum(to_cloud) / n, sum(device_correct) / n, sum(cloud_correct) / n)


def choose_threshold(probabilities: Sequence[float], device_correct: Sequence[bool], cloud_correct: Sequence[bool],
                     *, quality_target: float = 0.95) -> Route:
    """The lowest threshold (fewest cloud calls) whose routed accuracy is at
    least ``quality_target`` x the cloud's; every item to the cloud (threshold
    above 1) when none is. Candidates are the calibrated levels themselves."""
    if not 0.0 < quality_target <= 1.0:
        raise ValueError(f"quality_target must be in (0, 1], got {quality_target}")
    candidates = sorted({0.0, *probabilities, math.nextafter(1.0, 2.0)})
    for threshold in candidates:
        route = routed(probabilities, device_correct, cloud_correct, threshold)
        if route.routed_accuracy >= quality_target * route.cloud_accuracy:
            return route
    return routed(probabilities, device_correct, cloud_correct, candidates[-1])


ESCALATIONS = ("restart", "continue")


def choose_escalation(restart_correct: Sequence[bool], continue_correct: Sequence[bool]) -> str:
    """"continue" when it was right at least as often as restarting on the
    same escalated items (it saves the cloud the device's first tokens), else
    "restart"; "restart" with nothing escalated to judge by."""
    if len(restart_correct) != len(continue_correct):
        raise ValueError("the two ways must be judged on the same items")
    if not restart_correct:
        return "restart"
    return "continue" if sum(continue_correct) >= sum(restart_correct) else "restart"


@dataclass(frozen=True)
class QualityPolicy:
    """What the agent routes ``tier: auto`` by, with what it was measured on."""

    device_model: str
    cloud_model: str
    first_tokens: int
    calibration: Calibration
    threshold: float
    on_calibration: Route
    on_test: Route
    test_auroc: float
    accuracy_by_kind: dict[str, dict[str, float]]
    # how an escalated answer goes on, and the accuracy of each way on the escalated calibration items
    escalation: str = "restart"
    escalated_accuracy: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.escalation not in ESCALATIONS:
            raise ValueError(f"escalation must be one of {ESCALATIONS}, got {self.escalation!r}")

    def to_json(self) -> str:
        data = asdict(self)
        data["calibration"] = self.calibration.to_dict()
        return json.dumps({"format": POLICY_FORMAT, **data}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> QualityPolicy:
        data = json.loads(text)
        if data.get("format") != POLICY_FORMAT:
            raise ValueError(f"a quality policy of format {data.get('format')!r}; this agent reads format {POLICY_FORMAT}")
        return cls(device_model=str(data["device_model"]), cloud_model=str(data["cloud_model"]),
                   first_tokens=int(data["first_tokens"]), calibration=Calibration.from_dict(data["calibration"]),
                   threshold=float(data["threshold"]), on_calibration=Route(**data["on_calibration"]),
                   on_test=Route(**data["on_test"]), test_auroc=float(data["test_auroc"]),
                   accuracy_by_kind=data["accuracy_by_kind"], escalation=str(data.get("escalation", "restart")),
                   escalated_accuracy=data.get("escalated_accuracy"))

    def judge(self, logprobs: Sequence[float]) -> tuple[float, float, bool]:
        """(confidence, calibrated probability, escalate) for the device's first tokens."""
        conf = confidence(logprobs, self.first_tokens)
        probability = self.calibration.probability(conf)
        return conf, probability, probability < self.threshold
