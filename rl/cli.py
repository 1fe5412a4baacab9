"""`key=value` command lines for typed dataclass configs, sub-configs set with dotted keys.

Every field is documented once, by the docstring under it (as cleanrl's `Args`), and `help`
prints those. A field whose type is itself a dataclass is a sub-config (an entry point holds the
trainer's and the samplers' own configs so): `trainer.num_gpus=1 sampler.engine=vllm` sets its
fields, starting from the entry point's default for it. Unknown keys and values that do not
parse as the field's type are errors naming the key; a config class may map keys it no longer
has to their new spelling (`RENAMED`), and an old key then gets an error that names the new one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from rl.errors import InvalidRequestError
from rl.placement import parse_resources

C = TypeVar("C")


def parse_config(cls: type[C], argv: Sequence[str]) -> C:
    """Builds `cls` from `key=value` / `sub.key=value` arguments (later ones win); `help`,
    `-h` or `--help` prints every key and exits."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(describe(cls))
        sys.exit(0)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise InvalidRequestError(f"argument {arg!r} is not of the form key=value")
        values[key] = raw
    return build_config(cls, values)


def build_config(cls: type[C], values: Mapping[str, Any]) -> C:
    """`cls` from {key or sub.key: value}; string values are parsed as the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in renamed:
            raise InvalidRequestError(f"{key!r} is now {renamed[key]!r} ({cls.__name__})")
        name, dot, sub_key = key.partition(".")
        if name not in fields or bool(dot) != _is_config(hints[name]):
            known = ", ".join(keys(cls))
            raise InvalidRequestError(
                f"unknown config key {key!r} for {cls.__name__}; known keys: {known}"
            )
        if dot:
            nested.setdefault(name, {})[sub_key] = value
        else:
            own[name] = _convert(key, value, hints[name])
    for name, sub_values in nested.items():
        sub_cls = hints[name]
        sub_hints = typing.get_type_hints(sub_cls)
        sub_fields = [f.name for f in dataclasses.fields(sub_cls)]
        for sub_key in sub_values:
            if sub_key not in sub_fields:
                raise InvalidRequestError(
                    f"unknown config key '{name}.{sub_key}' for {cls.__name__}; {name}.* keys: "
                    + ", ".join(sub_fields)
                )
        parsed = {k: _convert(f"{name}.{k}", v, sub_hints[k]) for k, v in sub_values.items()}
        own[name] = dataclasses.replace(_default(fields[name]), **parsed)
    return cls(**own)


def keys(cls: type) -> list[str]:
    """Every key of `cls`, sub-config keys dotted."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            out.extend(f"{f.name}.{sub.name}" for sub in dataclasses.fields(hints[f.name]))
        else:
            out.append(f.name)
    return out


def describe(cls: type) -> str:
    """Every key of `cls` with its default (the entry point's, for sub-configs) and its doc."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = [f"{cls.__name__} (set with key=value; sub-configs with sub.key=value):"]
    for f in dataclasses.fields(cls):
        if not _is_config(hints[f.name]):
            lines.append(_entry(f.name, _default(f), docs.get(f.name, "")))
            continue
        header = f"{f.name}.*: {docs.get(f.name, '')}"
        lines.append(
            "\n" + textwrap.fill(header, 96, initial_indent="  ", subsequent_indent="      ")
        )
        default, sub_docs = _default(f), field_docs(hints[f.name])
        for sub in dataclasses.fields(hints[f.name]):
            value = getattr(default, sub.name)
            lines.append(_entry(f"{f.name}.{sub.name}", value, sub_docs.get(sub.name, "")))
    return "\n".join(lines)


def flat_dict(config: Any) -> dict[str, Any]:
    """The config's values as {key or sub.key: value} (run records, resume checks)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _entry(key: str, default: Any, doc: str) -> str:
    text = textwrap.fill(doc, 92, initial_indent="      ", subsequent_indent="      ")
    return f"  {key}={default!r}\n{text}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _convert(key: str, raw: Any, hint: Any) -> Any:
    if not isinstance(raw, str):
        return raw  # a value given in Python, not text
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
    if origin is dict:  # custom Ray resources, 'name=1,other=0.5'
        return parse_resources(raw, key)
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
