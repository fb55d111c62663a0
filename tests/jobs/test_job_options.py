"""``jobs.options``: the YAML loader, the key check, typed values, the training config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.options import (
    KeySpace,
    as_overrides,
    build_options,
    build_train_job,
    collect,
    load_yaml,
    resolve_options,
    train_keys,
)


@dataclass
class Opts:
    size: int = 8
    rate: float = 0.5
    fast: bool = False
    mode: str = "auto"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size={self.size} must be >= 1")


def test_load_yaml_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="is not a file"):
        load_yaml(tmp_path)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping .* not a list"):
        load_yaml(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        load_yaml(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_yaml(empty) == {}


def test_file_then_shortcuts_then_set_with_typed_values(tmp_path: Path) -> None:
    cfg = tmp_path / "o.yaml"
    cfg.write_text("size: 4\nrate: 2\nmode: fast\nlimit: 7\n")
    opts = resolve_options(Opts, cfg, ["rate=0.25", "fast=yes", "limit=none"], {"size": 16, "mode": None})
    assert opts == Opts(size=16, rate=0.25, fast=True, mode="fast", limit=None)
    assert resolve_options(Opts, None, ["limit=3", "fast=0"], {}) == Opts(limit=3, fast=False)


@pytest.mark.parametrize(("override", "message"), [
    ("size=many", "size='many': expected an integer"),
    ("size=1.5", "size='1.5': expected an integer"),
    ("fast=maybe", "fast='maybe': expected true or false"),
    ("rate=fast", "rate='fast': expected a number"),
    ("size=0", "size=0 must be >= 1"),
    ("sise=3", "--set sise=3: unknown key 'sise'; valid keys: fast, limit, mode, rate, size"),
    ("size", "--set 'size' is not KEY=VALUE"),
])
def test_bad_values_and_keys_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        resolve_options(Opts, None, [override])


def test_yaml_types_are_checked_too(tmp_path: Path) -> None:
    cfg = tmp_path / "o.yaml"
    cfg.write_text("mode: true\n")  # YAML reads an unquoted yes/true as a bool
    with pytest.raises(ValueError, match="mode=True: expected a string"):
        resolve_options(Opts, cfg, [])
    cfg.write_text("nested:\n  size: 2\n")
    with pytest.raises(ValueError, match=f"config file {cfg}: unknown key 'nested.size'; valid keys: fast,"):
        resolve_options(Opts, cfg, [])


def test_key_space_with_sections_and_a_shorthand() -> None:
    space = KeySpace({"opts": Opts(), "name": None, "extra": Opts()}, shorthand="extra")
    assert space.canonical("opts.size") == "opts.size"
    assert space.canonical("size") == "extra.size"  # the shorthand section's keys alone
    assert space.valid() == ("extra.*, name, opts.*; the keys of extra also without 'extra.': "
                             "fast, limit, mode, rate, size")
    with pytest.raises(ValueError, match="unknown key 'opts.sise'; valid keys in opts: fast, limit, mode, rate, size"):
        space.canonical("opts.sise")
    with pytest.raises(ValueError, match="'opts' is a section: set its keys .* e.g. opts.fast=..."):
        space.canonical("opts")
    with pytest.raises(ValueError, match="name is a value, not a section"):
        space.canonical("name.first")
    with pytest.raises(ValueError, match="has an empty part"):
        space.canonical("opts..size")


def test_as_overrides_round_trips_through_set() -> None:
    values = {"experiment.secu.ks": [3, 6], "compute.use_gpu": False, "experiment.optim.lr": 0.05}
    assert as_overrides(values) == ["experiment.secu.ks=[3, 6]", "compute.use_gpu=false", "experiment.optim.lr=0.05"]
    again = collect(train_keys(), None, as_overrides(values))
    job = build_train_job(again)
    assert job.experiment.secu.ks == (3, 6) and job.compute.use_gpu is False and job.experiment.optim.lr == 0.05


def test_train_job_is_built_from_recipe_file_and_sets(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("recipe: fashion-mnist-cpu\ncompute:\n  num_workers: '4'\noptim:\n  epochs: 3\n"
                   "experiment:\n  model:\n    cnn_width: 8\n")
    values = collect(train_keys(), cfg, ["secu.alpha=0.2", "dataset=lake"], {"compute.num_workers": None})
    job = build_train_job(values)
    assert job.compute.num_workers == 4  # a quoted number in YAML is converted like --set's text
    assert (job.experiment.optim.epochs, job.experiment.model.cnn_width, job.experiment.secu.alpha) == (3, 8, 0.2)
    assert job.dataset == "lake" and job.experiment.name == "fashion-mnist-cpu"
    assert job.experiment.adapt.fixed == ("optim.epochs", "secu.alpha")  # the schedule keys the user set
    # No run id given: it is derived from the final config, so another value is another run.
    other = build_train_job(values | {"experiment.secu.alpha": 0.3})
    assert job.run_id.startswith("fashion-mnist-cpu-lake-") and other.run_id != job.run_id
    assert build_train_job(values | {"run_id": "mine"}).run_id == "mine"


def test_experiment_values_are_validated_together() -> None:
    """Channels of model and augment change together (one at a time, each state alone would be refused)."""
    sets = ["model.in_channels=3", "augment.channels=3", "augment.mean=[0.5,0.5,0.5]", "augment.std=[0.2,0.2,0.2]"]
    job = build_train_job(collect(train_keys(), None, sets))
    assert job.experiment.model.in_channels == job.experiment.augment.channels == 3
    assert job.experiment.augment.mean == (0.5, 0.5, 0.5)


def test_build_options_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['recluster.nope'\]; valid keys: recluster.fast"):
        build_options(Opts, {"nope": 1}, "recluster.")
