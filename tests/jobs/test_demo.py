"""The demo's training step: its own settings, and the user's ``--set``, ``--config``, ``--recipe`` and
``--train-limit`` over them (resolved as the demo resolves it before any work; no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobs import demo
from jobs import train as train_job


def _resolved(*argv: str) -> dict[str, Any]:
    args = demo.build_parser().parse_args(list(argv))
    train_argv = next(a for name, _, a in demo.steps(args) if name == "train")
    job: dict[str, Any] = train_job.resolve_job(train_job.build_parser().parse_args(train_argv)).to_dict()
    return job


def _setup(job: dict[str, Any]) -> tuple[Any, ...]:
    compute, optim = job["compute"], job["experiment"]["optim"]
    return (job["experiment"]["name"], compute["num_workers"], compute["cpus_per_worker"], compute["torch_threads"],
            optim["batch_size"], optim["epochs"])


def test_the_demo_trains_one_worker_of_two_threads_at_batch_128() -> None:
    assert _setup(_resolved()) == ("fashion-mnist-cpu", 1, 1.0, 2, 128, 12)


def test_a_subset_keeps_two_workers_and_the_recipe_schedule_for_the_adaptation() -> None:
    assert _setup(_resolved("--train-limit", "5000")) == ("fashion-mnist-cpu", 2, 0.5, 1, 256, 12)


def test_another_recipe_keeps_two_workers_and_its_own_schedule() -> None:
    assert _setup(_resolved("--recipe", "fashion-mnist-cpu-long")) == ("fashion-mnist-cpu-long", 2, 0.5, 1, 256, 40)


@pytest.mark.parametrize(("override", "expected"), [
    ("compute.num_workers=2", ("fashion-mnist-cpu", 2, 1.0, 2, 128, 12)),
    ("optim.batch_size=256", ("fashion-mnist-cpu", 1, 1.0, 2, 256, 12)),
    ("experiment.optim.epochs=8", ("fashion-mnist-cpu", 1, 1.0, 2, 128, 8)),
    ("recipe=fashion-mnist-cpu-long", ("fashion-mnist-cpu-long", 2, 0.5, 1, 256, 40)),
])
def test_the_users_set_wins_over_the_demo_settings(override: str, expected: tuple[Any, ...]) -> None:
    assert _setup(_resolved("--set", override)) == expected


def test_the_users_config_file_wins_over_the_demo_settings(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text("compute:\n  torch_threads: 1\noptim:\n  epochs: 3\n")
    assert _setup(_resolved("--config", str(config))) == ("fashion-mnist-cpu", 1, 1.0, 1, 128, 3)
