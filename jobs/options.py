"""Job settings from ``--config FILE.yaml`` and ``--set KEY=VALUE``: one YAML loader, one key check, typed values.

A job's settings form a ``KeySpace``: dotted keys (``batch_size``, ``compute.num_workers``, ``optim.lr``) whose
leaves are fields of config dataclasses. The config file is a mapping of the same keys (nested or dotted),
``--set`` gives one key at a time, and the job's shortcut options (``--batch-size``) name keys too. ``collect``
checks every key before anything runs, so a misspelt key fails at once and the message lists the valid
ones; ``build_options`` turns the values into a dataclass with the field's type (``"4"`` -> 4, ``"no"`` ->
False), so a wrong type is a ValueError naming the key.

The training keys (jobs.train, jobs.recluster, jobs.self_label, jobs.demo): ``recipe``, ``dataset``, ``run_id``,
``compute.<ComputeConfig field>``, ``tracking.<TrackingConfig field>`` and ``experiment.<key>``, where
``experiment.`` may be left out (``optim.lr=0.1``). ``build_train_job`` makes the one ``TrainJobConfig`` of the
collected values: the recipe, then the values, validated together, then the run id, derived from that final
config when none is given (so that the same settings resume the same run).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipelines.tracking.config import TrackingConfig
from pipelines.training.job_config import ComputeConfig, TrainJobConfig
from secu.adapt import ADAPTED_KEYS
from secu.config import ExperimentConfig
from secu.overrides import apply_overrides
from secu.recipes import recipe

_T = TypeVar("_T")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def load_yaml(path: Path) -> dict[str, Any]:
    """The mapping at the top level of a YAML config file (empty for an empty file).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not a file, not valid YAML, or its top level is not a mapping.
    """
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a file: pass a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values at the top level (key: value "
                         f"lines), not a {type(loaded).__name__}")
    return loaded


def split_override(text: str) -> tuple[str, str]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", "0.1")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r} is not KEY=VALUE (e.g. --set optim.lr=0.1)")
    return key.strip(), value.strip()


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted ``(key, value)`` pairs of a nested mapping; empty (null) values are left out (they keep defaults)."""
    pairs: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            pairs.extend(flatten(value, f"{prefix}{key}."))
        elif value is not None:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


@dataclass(frozen=True)
class KeySpace:
    """The keys a job takes: top-level names, each a config dataclass instance (a section) or None (a value)."""

    sections: Mapping[str, Any]
    shorthand: str | None = None
    """A section whose keys may be given without its name (``optim.lr`` for ``experiment.optim.lr``)."""

    @classmethod
    def of(cls, options_cls: type) -> KeySpace:
        """The flat key space of an options dataclass (one value per field)."""
        return cls({name: None for name in _field_names(options_cls)})

    def valid(self) -> str:
        """The top-level keys in words: ``name`` for a value, ``name.*`` for a section."""
        def shown(node: Any, names: list[str]) -> str:
            return ", ".join(f"{n}.*" if dataclasses.is_dataclass(getattr(node, n, None)) else n for n in names)

        text = ", ".join(f"{n}.*" if dataclasses.is_dataclass(v) else n for n, v in sorted(self.sections.items()))
        if self.shorthand:
            section = self.sections[self.shorthand]
            text += (f"; the keys of {self.shorthand} also without '{self.shorthand}.': "
                     f"{shown(section, sorted(_field_names(section)))}")
        return text

    def canonical(self, key: str) -> str:
        """The full dotted key (the shorthand section's name added); ValueError naming the valid keys."""
        given = key.strip().split(".")
        if not all(given):
            raise ValueError(f"key {key!r} has an empty part")
        parts = given
        if given[0] not in self.sections and self.shorthand:
            if given[0] in _field_names(self.sections[self.shorthand]):
                parts = [self.shorthand, *given]
        if parts[0] not in self.sections:
            raise ValueError(f"unknown key {key!r}; valid keys: {self.valid()}")
        skip = len(parts) - len(given)  # the shorthand's name, left out of messages as the user left it out
        node = self.sections[parts[0]]
        for depth, part in enumerate(parts[1:], 1):
            where = ".".join(parts[skip:depth])
            if not dataclasses.is_dataclass(node):
                raise ValueError(f"unknown key {key!r}: {where} is a value, not a section of keys")
            if part not in _field_names(node):
                raise ValueError(f"unknown key {key!r}; valid keys in {where}: {', '.join(sorted(_field_names(node)))}")
            node = getattr(node, part)
        if dataclasses.is_dataclass(node):
            names = sorted(_field_names(node))
            raise ValueError(f"key {key!r} is a section: set its keys ({', '.join(names)}), e.g. {key}.{names[0]}=...")
        return ".".join(parts)


def collect(space: KeySpace, config: Path | None, overrides: Sequence[str],
            shortcuts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Canonical key -> value from the config file, then the non-None ``shortcuts``, then ``--set`` (later wins).

    Raises:
        FileNotFoundError: The config file is missing.
        ValueError: An unknown key (the message lists the valid ones) or a malformed file or ``--set``.
    """
    sources: list[tuple[str, list[tuple[str, Any]]]] = []
    if config is not None:
        sources.append((f"config file {config}", flatten(load_yaml(config))))
    sources.append(("option", [(k, v) for k, v in (shortcuts or {}).items() if v is not None]))
    sources.extend((f"--set {text}", [split_override(text)]) for text in overrides)
    values: dict[str, Any] = {}
    for where, pairs in sources:
        for key, value in pairs:
            try:
                values[space.canonical(key)] = value
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return values


def section(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The values under ``name.`` with that prefix removed."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def nest(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A nested mapping: a copy of ``base`` with every dotted key of ``values`` set in it."""
    out: dict[str, Any] = copy.deepcopy(dict(base or {}))
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """``key=value`` strings of the values (lists as JSON), for APIs that take ``--set`` overrides."""
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(list(value)) if isinstance(value, list | tuple) else str(value)

    return [f"{key}={text(value)}" for key, value in values.items()]


def build_options(cls: type[_T], values: Mapping[str, Any], prefix: str = "") -> _T:
    """``cls(**values)`` with every value converted to its field's type; ``prefix`` names the section in errors.

    Raises:
        ValueError: An unknown field, a value of the wrong type, or the dataclass' own validation.
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(_field_names(cls)))
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: "
                         f"{', '.join(prefix + n for n in sorted(_field_names(cls)))}")
    return cls(**{k: _typed(prefix + k, v, hints[k]) for k, v in values.items()})


def resolve_options(cls: type[_T], config: Path | None, overrides: Sequence[str],
                    shortcuts: Mapping[str, Any] | None = None) -> _T:
    """The options dataclass of a job with flat keys: defaults, then the config file, shortcuts and ``--set``."""
    return build_options(cls, collect(KeySpace.of(cls), config, overrides, shortcuts))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` of the field ``key`` (``X | None`` takes none/null too)."""
    kinds: tuple[Any, ...] = (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = tuple(k for k in typing.get_args(hint) if k is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
    kind = kinds[0] if len(kinds) == 1 else None
    if kind not in (bool, int, float, str):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif isinstance(value, bool):
        pass  # true/false where a number or a string is expected
    elif kind is str:
        return str(value)
    elif kind is float and (isinstance(value, int | float) or text is not None):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        return int(value)
    elif kind is int and text is not None and text.lstrip("+-").isdigit():
        return int(text)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise ValueError(f"{key}={value!r}: expected {expected}")


DEFAULT_RECIPE = "fashion-mnist-cpu"
DEFAULT_DATASET = "fashion-mnist"
TRAIN_HELP = ("a training key: optim.lr=0.1, secu.ks=[10,20], compute.num_workers=4, dataset=NAME, run_id=ID "
              "or recipe=NAME")


def train_keys(*, without: Sequence[str] = (), **sections: Any) -> KeySpace:
    """The training key space, less the top-level names ``without``, plus extra ``sections`` (name=dataclass)."""
    base: dict[str, Any] = {"recipe": None, "dataset": None, "run_id": None, "experiment": ExperimentConfig(),
                            "compute": ComputeConfig(), "tracking": TrackingConfig()}
    return KeySpace({k: v for k, v in (base | sections).items() if k not in without}, shorthand="experiment")


def build_train_job(values: Mapping[str, Any]) -> TrainJobConfig:
    """The validated ``TrainJobConfig`` of canonical training values (``jobs.options.collect``), built once.

    The adaptation of the schedule to the collection (``secu.adapt``) keeps the keys of ``ADAPTED_KEYS`` that
    the values set (``experiment.adapt.fixed``).
    """
    name = str(values.get("recipe") or DEFAULT_RECIPE)
    chosen = section(values, "experiment")
    experiment = ExperimentConfig.from_dict(nest(chosen, base=recipe(name).to_dict()))
    fixed = set(experiment.adapt.fixed) | (set(chosen) & set(ADAPTED_KEYS))
    if fixed != set(experiment.adapt.fixed):
        experiment = apply_overrides(experiment, [f"adapt.fixed={','.join(sorted(fixed))}"])
    return TrainJobConfig(
        experiment=experiment,
        compute=build_options(ComputeConfig, section(values, "compute"), "compute."),
        dataset=str(values.get("dataset") or DEFAULT_DATASET),
        run_id=str(values.get("run_id") or ""),
        tracking=build_options(TrackingConfig, section(values, "tracking"), "tracking."),
    )
