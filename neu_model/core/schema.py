"""Typed frozen dataclasses from plain YAML mappings, as the config loader builds them.

Dataclasses do not check what they are given; ``build`` does: no unknown key, no missing key,
every value of its field's type, each refusal one line naming the key and what it may be.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A params file or an override that cannot be used; the message says how to fix it."""


def plain(value: Any) -> Any:
    """Dataclasses and mappings as dicts, tuples as lists: what YAML, JSON and ``torch.save``
    with ``weights_only`` loading take."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# What a wrong value is told it should be: by key, else by field type.
EXPECTED = {"data.expected_per_class": 'an integer or "any"', int: "an integer",
            float: "a number (e.g. 0.001 or 1.0e-3)", str: "a string", bool: "true or false"}


def typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the field type ``hint`` (dataclasses do not check); an int passes as a float.

    Raises:
        ConfigError: one line naming ``key``, the value and the type expected.
    """
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        fixed = len(args) > 1 and args[-1] is not Ellipsis  # tuple[float, float]: exactly two
        if fixed and len(value) != len(args):
            kind = "numbers" if set(args) <= {int, float} else "values"
            raise ConfigError(f"params.yaml: {key}={list(value)!r} must be a list of {len(args)} {kind}")
        return tuple(typed(v, args[i] if fixed else args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Mapping and isinstance(value, Mapping):
        return {k: typed(v, args[1], join_key(key, k)) for k, v in value.items()}
    # 1e-3 is a float to YAML 1.2 (what DVC's -S writes) but a string to PyYAML's YAML 1.1.
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)) or bool(
              isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v)),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool), Any: lambda v: True}
    if hint in ok and ok[hint](value):
        return float(value) if hint is float and isinstance(value, str) else value
    expected = EXPECTED.get(key) or EXPECTED.get(hint) or ("a list" if origin is tuple else "a section")
    raise ConfigError(f"params.yaml: {key}={value!r} must be {expected}")


def build(cls: type, raw: Any, key: str) -> Any:
    """Dataclass ``cls`` from the mapping ``raw`` at ``key``: no unknown, no missing keys, typed values."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params.yaml: {key or 'the file'} must be a section of key: value lines, not {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            raise ConfigError(f"params.yaml: unknown key {join_key(key, name)}; check the spelling; keys "
                              f"{'under ' + key if key else 'at the top'}: {', '.join(fields)}")
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params.yaml: {join_key(key, name)} is missing; compare with the params.yaml in git")
    hints = typing.get_type_hints(cls)
    return cls(**{name: typed(value, hints[name], join_key(key, name)) for name, value in raw.items()})


def join_key(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)
