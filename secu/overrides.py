"""Overrides of any config dataclass: ``key.sub=value`` strings and nested mappings merged into a copy,
every value converted to its field's type and the result re-validated by the dataclass itself.

Unknown keys are errors that list the valid keys at their level.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

_T = TypeVar("_T")


def merge(base: _T, data: Mapping[str, Any], prefix: str = "") -> _T:
    """Return a copy of dataclass ``base`` with the values of ``data`` merged in, re-validated."""
    assert dataclasses.is_dataclass(base) and not isinstance(base, type)
    names = {f.name: f for f in dataclasses.fields(base)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(
                f"unknown config key {prefix + key!r}; valid keys here: {sorted(names)}"
            )
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {prefix + key!r} needs a mapping, got {value!r}")
            values[key] = merge(current, value, prefix + key + ".")
        else:
            values[key] = _coerce(value, current, prefix + key)
    fields_now = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields_now.update(values)
    return type(base)(**copy.deepcopy(fields_now))


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a parsed value to the type of the field's current value."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, Iterable):
                raise ValueError(value)
            items = list(value)
            if not current:  # an empty default (adapt.fixed): keep the items' own types
                return tuple(v.strip() if isinstance(v, str) else v for v in items)
            kind = type(current[0])
            return tuple(kind(v) for v in items)
        return type(current)(value) if current is not None else value
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"config key {key!r}: cannot use {value!r} where a {type(current).__name__} is expected"
        ) from err


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``"optim.lr=0.1"`` into ``{"optim": {"lr": "0.1"}}`` (values coerced on merge)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr=0.1)")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {text!r} has an empty key")
    nested: dict[str, Any] = {parts[-1]: value.strip()}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _deep_merge(into: dict[str, Any], data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def apply_overrides(cfg: _T, overrides: Iterable[str]) -> _T:
    """Apply ``key.sub=value`` overrides to any config dataclass; returns a new validated config.

    All overrides are merged first and validated once, so keys that must change together (e.g.
    ``model.in_channels`` and ``augment.channels``) can be given one after the other; a key given
    twice takes its last value.
    """
    combined: dict[str, Any] = {}
    for text in overrides:
        _deep_merge(combined, parse_override(text))
    return merge(cfg, combined) if combined else cfg
