"""The TOML policy file: what it reads to, what it refuses and where."""

from __future__ import annotations

import pytest

from partitioner.choice import Objective
from partitioner.costmodel import Constraints
from partitioner.policy import LlmLimits, Policy, PolicyError, PolicySet, check_models, parse, render
from protos import tandem_pb2 as pb


def rich_policies() -> PolicySet:
    default = Policy(objective=Objective.WEIGHTED, weight_latency=0.3,
                     constraints=Constraints(slo_ms=120.0, energy_budget_j=2.5, memory_limit_bytes=256 * 2**20,
                                             allowed_cuts=frozenset({3, 7})),
                     encoding=pb.ENCODING_FP16, cloud_timeout_s=4.0, hysteresis_margin=0.2)
    chain = Policy(objective=Objective.ENERGY, weight_latency=0.3,
                   constraints=Constraints(slo_ms=80.0, energy_budget_j=2.5, memory_limit_bytes=256 * 2**20,
                                           privacy_min_local=2, allowed_cuts=frozenset({3, 7})),
                   encoding=pb.ENCODING_INT8, cloud_timeout_s=4.0, hysteresis_margin=0.2,
                   preferred_nodes=("10.0.0.5:50052", "10.0.0.6:50052"))
    return PolicySet(default=default, models={"mobilenet": chain}, llm=LlmLimits(allow_remote=False, remote_tokens_per_hour=5000))


def test_a_written_policy_reads_back_to_the_same_policies() -> None:
    policies = rich_policies()
    text = render(policies, header=["written by a test"], notes={"mobilenet": ["LOCAL 58 ms on pi4"]})
    assert parse(text) == policies
    assert "# written by a test" in text and "# LOCAL 58 ms on pi4" in text
    assert 'objective = "energy"' in text.split("[models.mobilenet]")[1]  # model tables hold only what differs
    assert "weight_latency" not in text.split("[models.mobilenet]")[1].split("[llm]")[0]


def test_what_the_file_leaves_out_comes_from_the_agents_flags() -> None:
    base = Policy(encoding=pb.ENCODING_INT8, hysteresis_margin=0.3)
    policies = parse('[default]\nobjective = "energy"\n[models.resnet]\nslo_ms = 50\n', base)
    assert policies.default == Policy(objective=Objective.ENERGY, encoding=pb.ENCODING_INT8, hysteresis_margin=0.3)
    assert policies.for_model("resnet").constraints.slo_ms == 50.0
    assert policies.for_model("resnet").objective == Objective.ENERGY
    assert policies.for_model("other") is policies.default
    assert parse("") == PolicySet()


@pytest.mark.parametrize(("text", "message"), [
    ("version = 2\n", r"line 1: version in top level: this agent reads policy version 1, got 2"),
    ('[default]\nobjective = "fast"\n', r"line 2: objective in \[default\]: must be one of energy, latency, weighted, got 'fast'"),
    ("[default]\n# slo\n\nslo_ms = -1\n", r"line 4: slo_ms in \[default\]: must be > 0, got -1"),
    ("[models.mobilenet]\nwieght_latency = 0.5\n", r"line 2: wieght_latency in \[models.mobilenet\]: unknown key"),
    ("[default]\nweight_latency = 1.5\n", r"line 2: weight_latency in \[default\]: must be <= 1, got 1.5"),
    ("[default]\nallowed_cuts = [1, -2]\n", r"line 2: allowed_cuts in \[default\]: must be a whole number >= 0, got -2"),
    ("[default]\nencoding = \"zip\"\n", r"encoding in \[default\]: must be one of fp16, int8, raw"),
    ("[default]\nallow_remote = \"no\"\n", r"allow_remote in \[default\]: must be true or false"),
    ("[default]\npreferred_nodes = \"a:1\"\n", r"preferred_nodes in \[default\]: must be a list of HOST:PORT strings"),
    ("[llm]\nremote_tokens_per_hour = -5\n", r"line 2: remote_tokens_per_hour in \[llm\]: must be a whole number >= 0"),
    ("[llm]\nmax_tokens = 5\n", r"max_tokens in \[llm\]: unknown key"),
    ("colour = 1\n", r"line 1: colour in top level: unknown key"),
    ("[default\nslo_ms = 1\n", r"not valid TOML: .*line 1"),
    ("models = 3\n", r"models in top level: must be tables"),
])
def test_bad_policies_are_refused_with_the_line_and_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse(text)


def test_cuts_are_checked_against_the_models_served() -> None:
    text = "[models.mobilenet]\nallowed_cuts = [3, 30]\n"
    with pytest.raises(PolicyError, match=r"line 2: allowed_cuts in \[models.mobilenet\]: mobilenet has cuts 1..24, not \[30\]"):
        check_models(parse(text), text, {"mobilenet": 25})
    warnings = check_models(parse("[models.ghost]\nslo_ms = 5\n"), "", {"mobilenet": 25})
    assert warnings == ["[models.ghost]: no such model here (serving mobilenet)"]
    text = "[default]\nallowed_cuts = [40]\n"
    assert "can only run LOCAL or REMOTE" in check_models(parse(text), text, {"mobilenet": 25})[0]


def test_a_model_table_cannot_unset_what_default_sets() -> None:
    policies = PolicySet(default=Policy(constraints=Constraints(slo_ms=100.0)), models={"m": Policy()})
    with pytest.raises(PolicyError, match="cannot be unset"):
        render(policies)
