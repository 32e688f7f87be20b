"""The deployment policy: how the agent plans each model, as a TOML file.

``offload-tune write-policy`` writes it; ``edge-agent --policy FILE`` loads
it at start-up and again on SIGHUP. A file that does not parse, or holds one
value out of range, is refused whole with its line and the reason, and the
agent keeps the policy it had: half of a new policy is worse than all of the
old one.

Layout (every key optional; units in the names)::

    version = 1
    [default]               # every model, unless its own table says otherwise
    objective = "latency"
    [models.mobilenet]      # this model: [default] with these keys replaced
    encoding = "int8"
    [llm]                   # generation routing limits
    allow_remote = true

Pure: text in, policies out, and back to text (``render``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import tomlkit

from partitioner.choice import Objective
from partitioner.costmodel import DAG_MIN_GAIN, Constraints
from protos.codec import ENCODING_BY_NAME

VERSION = 1
ENCODING_NAMES = {"raw": ENCODING_BY_NAME["raw"], "fp16": ENCODING_BY_NAME["fp16"], "int8": ENCODING_BY_NAME["int8"]}


@dataclass(frozen=True)
class Policy:
    """How the agent plans one model."""

    objective: Objective = Objective.LATENCY
    weight_latency: float = 0.5
    constraints: Constraints = field(default_factory=Constraints)
    encoding: int = ENCODING_NAMES["raw"]    # codec for tensors sent to a node
    cloud_timeout_s: float = 10.0            # longest wait for one cloud call
    hysteresis_margin: float = 0.1           # switch plan only for a predicted gain above this (relative)
    preferred_nodes: tuple[str, ...] = ()    # plan on these nodes while one is reachable; () = any
    profile_shapes: Mapping[str, tuple[int, ...]] | None = None  # input name -> shape to profile at; None = the model's own
    max_output_error: float | None = None    # codec per request within this output error (relative); None = `encoding` always
    dag_cuts: bool = True                    # also plan splits off the chain (minimum s-t cuts of the node graph)
    dag_min_gain: float = DAG_MIN_GAIN       # ...where they beat the best chain split by more than this share


@dataclass(frozen=True)
class LlmLimits:
    allow_remote: bool = True                  # False: prompts never leave the device
    remote_tokens_per_hour: int | None = None  # cap on tokens generated in the cloud; None = no cap


@dataclass(frozen=True)
class PolicySet:
    default: Policy = field(default_factory=Policy)
    models: Mapping[str, Policy] = field(default_factory=dict)
    llm: LlmLimits = field(default_factory=LlmLimits)

    def for_model(self, name: str) -> Policy:
        return self.models.get(name, self.default)


class PolicyError(ValueError):
    """A policy file the agent must not load; the message names the line."""


# --- one key of a policy table -------------------------------------------------


def _number(value: Any, *, low: float | None = None, low_open: bool = False, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"must be <= {high:g}, got {value!r}")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0, got {value!r}")
    return value


def _choice(options: Mapping[str, Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(sorted(options))}, got {value!r}")
        return options[value]
    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _cuts(value: Any) -> frozenset[int]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of cut indices, got {value!r}")
    return frozenset(_count(k) for k in value)


def _shapes(value: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"must be a table of input name = [dims], got {value!r}")
    shapes = {}
    for name, dims in value.items():
        if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                             for d in dims):
            raise ValueError(f"{name} must be a list of dims >= 1, got {dims!r}")
        shapes[name] = tuple(dims)
    return shapes


def _nodes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of HOST:PORT strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    apply: Callable[[Policy, Any], Policy]
    show: Callable[[Policy], Any]   # the TOML value of a policy's setting; None: not set
    doc: str


def _constraint(name: str) -> tuple[Callable[[Policy, Any], Policy], Callable[[Policy], Any]]:
    return (lambda p, v: replace(p, constraints=replace(p.constraints, **{name: v})),
            lambda p: getattr(p.constraints, name))


OBJECTIVES = {o.value: o for o in Objective}
_REVERSE_ENCODINGS = {v: k for k, v in ENCODING_NAMES.items()}
MIB = 2**20

KEYS: tuple[Key, ...] = (
    Key("objective", _choice(OBJECTIVES), lambda p, v: replace(p, objective=v), lambda p: p.objective.value,
        "what the plan minimises: latency, energy (device joules) or weighted"),
    Key("weight_latency", lambda v: _number(v, low=0, high=1), lambda p, v: replace(p, weight_latency=v),
        lambda p: p.weight_latency, "weighted objective: share of latency, 0..1 (the rest is energy)"),
    Key("slo_ms", lambda v: _number(v, low=0, low_open=True), *_constraint("slo_ms"),
        "soft: a plan predicted slower than this is not chosen while another meets it, ms"),
    Key("energy_budget_j", lambda v: _number(v, low=0, low_open=True), *_constraint("energy_budget_j"),
        "soft: device energy per request, J"),
    Key("memory_limit_mb", lambda v: _number(v, low=0, low_open=True),
        lambda p, v: replace(p, constraints=replace(p.constraints, memory_limit_bytes=int(v * MIB))),
        lambda p: None if p.constraints.memory_limit_bytes is None else p.constraints.memory_limit_bytes / MIB,
        "hard: device memory the local part may use, MiB"),
    Key("privacy_min_local", _count, *_constraint("privacy_min_local"),
        "hard: segments that must run on the device (> 0 forbids REMOTE)"),
    Key("allowed_cuts", _cuts, *_constraint("allowed_cuts"),
        "hard: SPLIT only after these segments (omit: every cut)"),
    Key("allow_remote", _bool, *_constraint("allow_remote"), "hard: false keeps every request on the device"),
    Key("encoding", _choice(ENCODING_NAMES), lambda p, v: replace(p, encoding=v),
        lambda p: _REVERSE_ENCODINGS[p.encoding], "codec for tensors sent to a node: raw, fp16 or int8"),
    Key("cloud_timeout_s", lambda v: _number(v, low=0, low_open=True), lambda p, v: replace(p, cloud_timeout_s=v),
        lambda p: p.cloud_timeout_s, "longest wait for one cloud call before finishing on the device, s"),
    Key("hysteresis_margin", lambda v: _number(v, low=0), lambda p, v: replace(p, hysteresis_margin=v),
        lambda p: p.hysteresis_margin, "change plan only for a predicted gain above this (0.1 = 10 %)"),
    Key("preferred_nodes", _nodes, lambda p, v: replace(p, preferred_nodes=v),
        lambda p: list(p.preferred_nodes) or None, "plan on these nodes while one is reachable (omit: any)"),
    Key("max_output_error", lambda v: _number(v, low=0), lambda p, v: replace(p, max_output_error=v),
        lambda p: p.max_output_error,
        "choose raw, fp16 or int8 per request where the measured output error stays within this share of each "
        "output's range (e.g. 0.01); omit: always `encoding`"),
    Key("dag_cuts", _bool, lambda p, v: replace(p, dag_cuts=v), lambda p: p.dag_cuts,
        "also plan splits that are not a prefix of the layer order (a minimum s-t cut of the node graph)"),
    Key("dag_min_gain", lambda v: _number(v, low=0, high=1), lambda p, v: replace(p, dag_min_gain=v),
        lambda p: p.dag_min_gain, "offer a DAG cut only where it beats the best chain split by more than this (0.05 = 5 %)"),
    Key("profile_shapes", _shapes, lambda p, v: replace(p, profile_shapes=v),
        lambda p: None if p.profile_shapes is None else {k: list(v) for k, v in p.profile_shapes.items()},
        "input shapes to profile at, e.g. { input = [1, 3, 320, 320] } (omit: the model's own, then requests')"),
)
KEY_BY_NAME = {key.name: key for key in KEYS}

LLM_KEYS = {
    "allow_remote": (_bool, "false: prompts never leave the device"),
    "remote_tokens_per_hour": (_count, "cap on tokens generated in the cloud per hour (omit: no cap)"),
}


# --- parsing ------------------------------------------------------------------


def _line_of(text: str, table: str, key: str | None) -> int | None:
    """Line (1-based) where ``key`` is set in ``[table]`` (or the table's header)."""
    current = ""
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    for number, line in enumerate(text.splitlines(), start=1):
        found = header.match(line)
        if found:
            current = re.sub(r"\s*\.\s*", ".", found.group(1)).replace('"', "")
            if key is None and current == table:
                return number
            continue
        if key is not None and current == table and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


def _fail(text: str, table: str, key: str | None, reason: str) -> PolicyError:
    line = _line_of(text, table, key)
    where = f"[{table}]" if table else "top level"
    name = f"{key} in {where}" if key else where
    return PolicyError(f"line {line}: {name}: {reason}" if line else f"{name}: {reason}")


def _set(policy: Policy, name: str, value: Any) -> Policy:
    key = KEY_BY_NAME.get(name)
    if key is None:
        raise ValueError(f"unknown key; known: {', '.join(KEY_BY_NAME)}")
    return key.apply(policy, key.parse(value))


def _apply(text: str, table_name: str, table: Any, base: Policy) -> Policy:
    if not isinstance(table, dict):
        raise _fail(text, table_name, None, "must be a table")
    policy = base
    for name, value in table.items():
        try:
            policy = _set(policy, name, value)
        except ValueError as exc:
            raise _fail(text, table_name, name, str(exc)) from None
    try:  # the cost model's own checks, on the whole policy
        Constraints(**{f.name: getattr(policy.constraints, f.name) for f in fields(Constraints)})
    except ValueError as exc:
        raise _fail(text, table_name, None, str(exc)) from None
    return policy


def parse(text: str, base: Policy | None = None, base_llm: LlmLimits | None = None) -> PolicySet:
    """The policies in ``text``; what the file leaves out comes from ``base``
    (the agent's own flags and config). Raises PolicyError naming the line."""
    base = base or Policy()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"version", "default", "models", "llm"})
    if unknown:
        raise _fail(text, "", unknown[0], "unknown key; known: version, [default], [models.NAME], [llm]")
    if raw.get("version", VERSION) != VERSION:
        raise _fail(text, "", "version", f"this agent reads policy version {VERSION}, got {raw['version']!r}")
    default = _apply(text, "default", raw.get("default", {}), base)
    models_table = raw.get("models", {})
    if not isinstance(models_table, dict):
        raise _fail(text, "", "models", "must be tables [models.NAME]")
    models = {name: _apply(text, f"models.{name}", table, default) for name, table in models_table.items()}
    llm = base_llm or LlmLimits()
    llm_table = raw.get("llm", {})
    if not isinstance(llm_table, dict):
        raise _fail(text, "", "llm", "must be a table [llm]")
    for name, value in llm_table.items():
        if name not in LLM_KEYS:
            raise _fail(text, "llm", name, f"unknown key; known: {', '.join(LLM_KEYS)}")
        try:
            llm = replace(llm, **{name: LLM_KEYS[name][0](value)})
        except ValueError as exc:
            raise _fail(text, "llm", name, str(exc)) from None
    return PolicySet(default=default, models=models, llm=llm)


# --- writing ------------------------------------------------------------------


def _table(policy: Policy, against: Policy | None, notes: list[str]) -> tomlkit.items.Table:
    """Every setting of ``policy`` (only those differing from ``against`` if given), documented."""
    table = tomlkit.table()
    for note in notes:
        table.add(tomlkit.comment(note))
    for key in KEYS:
        value = key.show(policy)
        if against is not None and value == key.show(against):
            continue
        if value is None:
            if against is not None:  # TOML has no null: a model table cannot unset what [default] sets
                raise PolicyError(f"{key.name} is set in [default] and cannot be unset for one model; set it per model")
            table.add(tomlkit.comment(f"{key.name}: not set -- {key.doc}"))
            continue
        if isinstance(value, frozenset):
            value = sorted(value)
        table.add(key.name, tomlkit.item(value).comment(key.doc))
    return table


def render(policies: PolicySet, *, header: list[str] = (), notes: Mapping[str, list[str]] | None = None) -> str:
    """A documented TOML file that ``parse`` reads back to ``policies``."""
    notes = notes or {}
    document = tomlkit.document()
    for line in header:
        document.add(tomlkit.comment(line))
    document.add("version", VERSION)
    document.add(tomlkit.nl())
    document.add("default", _table(policies.default, None, notes.get("default", [])))
    if policies.models:
        models = tomlkit.table(is_super_table=True)
        for name, policy in sorted(policies.models.items()):
            models.add(name, _table(policy, policies.default, notes.get(name, [])))
        document.add("models", models)
    llm = tomlkit.table()
    for name, (_, doc) in LLM_KEYS.items():
        value = getattr(policies.llm, name)
        if value is None:
            llm.add(tomlkit.comment(f"{name}: not set -- {doc}"))
        else:
            llm.add(name, tomlkit.item(value).comment(doc))
    document.add("llm", llm)
    return tomlkit.dumps(document)


def check_models(policies: PolicySet, text: str, segments: Mapping[str, int]) -> list[str]:
    """Check the policy against the models the agent serves (name -> segments).
    Cuts a model does not have are an error (PolicyError, naming the line);
    tables for models the agent does not serve are returned as warnings (the
    model may be added later)."""
    warnings = []
    for name, policy in policies.models.items():
        if name not in segments:
            warnings.append(f"[models.{name}]: no such model here (serving {', '.join(sorted(segments)) or 'none'})")
            continue
        cuts = policy.constraints.allowed_cuts
        bad = sorted(k for k in cuts or () if not 1 <= k < segments[name])
        if bad:
            table = f"models.{name}" if _line_of(text, f"models.{name}", "allowed_cuts") else "default"
            raise _fail(text, table, "allowed_cuts", f"{name} has cuts 1..{segments[name] - 1}, not {bad}")
    default_cuts = policies.default.constraints.allowed_cuts
    if default_cuts:
        for name, n in segments.items():
            if name not in policies.models and all(not 1 <= k < n for k in default_cuts):
                warnings.append(f"[default] allowed_cuts: none of {sorted(default_cuts)} is a cut of {name} "
                                f"(1..{n - 1}): it can only run LOCAL or REMOTE")
    return warnings


def policy_from_values(values: Mapping[str, Any], base: Policy | None = None) -> Policy:
    """A policy from key -> value (as a [default] table would hold them, e.g.
    from command-line flags); PolicyError names the key and the reason."""
    policy = base or Policy()
    for name, value in values.items():
        try:
            policy = _set(policy, name, value)
        except ValueError as exc:
            raise PolicyError(f"{name}: {exc}") from None
    return policy
