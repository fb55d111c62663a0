"""Options dataclasses of the inference-side jobs from ``--config FILE.yaml`` and ``--set key=value``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from secu.config import apply_overrides

_T = TypeVar("_T")


def resolve_options(cls: type[_T], config: Path | None, overrides: list[str], shortcuts: dict[str, Any]) -> _T:
    """``cls()`` updated by the config file's mapping, then the non-None ``shortcuts``, then ``overrides``.

    Raises:
        FileNotFoundError: If the config file is missing.
        ValueError: On unknown keys or values of the wrong type (the message names the key).
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config is not None:
        if not config.exists():
            raise FileNotFoundError(f"config file {config} does not exist")
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {config} must hold a mapping of option names to values")
        values.update(loaded)
    values.update({k: v for k, v in shortcuts.items() if v is not None})
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(fields)}")
    options = cls(**{k: v for k, v in values.items()})
    return apply_overrides(options, overrides)
