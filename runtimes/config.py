"""One validated settings object per daemon, from TOML, environment and flags.

Each field of a daemon's config dataclass carries its help text in
``field(metadata={"help": ...})``; that text becomes the ``--flag`` help, the
environment variable is ``<PREFIX>_<FIELD>`` and the TOML key is the field
name. Precedence: defaults < TOML file < environment < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


def _base_type(hint: Any) -> tuple[type, bool]:
    """(element type, is_list) for the field types configs use."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(hint)[0], True
    return hint, False


def _table(name: str, kind: type, value: Any) -> Any:
    """A TOML table as the dataclass ``kind`` (each key one of its fields, coerced by its type)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be TOML tables ([[{name}]]), got {value!r}")
    fields = typing.get_type_hints(kind)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown keys {unknown}; known: {sorted(fields)}")
    try:
        return kind(**{key: _coerce(f"{name}.{key}", fields[key], item) for key, item in value.items()})
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{name}: {exc}") from None


def _coerce(name: str, hint: Any, value: Any) -> Any:
    kind, is_list = _base_type(hint)
    if dataclasses.is_dataclass(kind):
        if not is_list:
            return _table(name, kind, value)
        return tuple(_table(name, kind, item) for item in (value if isinstance(value, list) else [value]))
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, kind, item) for item in items if item != "")
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is Path:
            return Path(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


def _shown_default(value: Any) -> str | None:
    """A default as the user would type it, or None when there is none to show."""
    if value is None or value == () or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, env_prefix: str) -> None:
    """One flag per field. A boolean is a switch (``--plaintext``) that also
    takes a value (``--plaintext false``)."""
    parser.add_argument("--config", type=Path, help="TOML file with these settings (flags override it)")
    tables = []
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(typing.get_type_hints(cls)[f.name])
        if dataclasses.is_dataclass(kind):  # tables: in the TOML file only
            tables.append(f"[[{f.name}]]: {f.metadata.get('help', '')}")
            continue
        flag = "--" + f.name.replace("_", "-")
        extra = f.metadata.get("flags", ())
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = _shown_default(f.default) if f.default is not dataclasses.MISSING else None
        if default is not None and "default" not in help_text:  # a help text that explains its default keeps it
            help_text += f" (default: {default})"
        if is_list:
            parser.add_argument(flag, *extra, dest=f.name, action="append", default=None, help=help_text + "; repeat for more")
        elif kind is bool:
            parser.add_argument(flag, *extra, dest=f.name, nargs="?", const="true", default=None, metavar="true|false",
                                help=help_text)
        else:
            parser.add_argument(flag, *extra, dest=f.name, default=None, help=help_text)
    parser.epilog = (f"Every setting is also a key of the --config TOML file (its name with underscores: "
                     f"max_queue) and an environment variable ({env_prefix}_MAX_QUEUE); "
                     "flags override the environment, which overrides the file."
                     + "".join(f" In the file only: {text}." for text in tables))


def load(cls: type[C], args: argparse.Namespace | None = None, *, env_prefix: str, environ: dict[str, str] | None = None) -> C:
    """Build and validate ``cls`` from defaults, ``args.config``, environment and flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) if args else None
    if config_file:
        try:
            table = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc}") from None
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"{config_file}: unknown settings {unknown}; known: {sorted(names)}")
        values.update(table)
    for name in names:
        key = f"{env_prefix}_{name.upper()}"
        if key in environ and not dataclasses.is_dataclass(_base_type(hints[name])[0]):
            values[name] = environ[key]
    if args is not None:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
    coerced = {name: _coerce(name, hints[name], value) for name, value in values.items()}
    config = cls(**coerced)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config
