"""`key=value` command lines for flat dataclass configs.

Each config field carries its documentation in `field(metadata={"help": ...})`; `--help`
prints them. Unknown keys and values that do not parse as the field's type are errors that
name the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from rl.errors import InvalidRequestError

C = TypeVar("C")


def doc(default: Any, help: str) -> Any:
    """A dataclass field with its documentation."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls: type[C], argv: Sequence[str], **overrides: Any) -> C:
    """Builds `cls` from `key=value` arguments (later ones win), then keyword overrides."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(describe(cls))
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise InvalidRequestError(f"argument {arg!r} is not of the form key=value")
        if key not in fields:
            raise InvalidRequestError(
                f"unknown config key {key!r} for {cls.__name__}; known keys: {', '.join(fields)}"
            )
        values[key] = _convert(key, raw, hints[key])
    for key, value in overrides.items():
        if key not in fields:
            raise InvalidRequestError(f"unknown config key {key!r} for {cls.__name__}")
        values[key] = value
    return cls(**values)


def describe(cls: type) -> str:
    lines = [f"{cls.__name__} (set with key=value):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  {f.name}={f.default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _convert(key: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        return _convert(key, raw, options[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if raw == str(choice):
                return choice
        raise InvalidRequestError(f"{key}={raw!r}: expected one of {list(choices)}")
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidRequestError(f"{key}={raw!r}: expected true or false")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise InvalidRequestError(f"{key}={raw!r}: expected {hint.__name__}") from None
    return raw
