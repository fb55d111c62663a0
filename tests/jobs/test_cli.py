"""The console script and the training job's config resolution (no Ray started)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs import train as train_job


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("secu 0.")
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("ingest", "train", "infer", "evaluate", "report", "recluster"):
        assert command in out
    assert cli.main(["frobnicate"]) == 2


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "secu"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("secu ")


def test_train_config_resolution(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("recipe: fashion-mnist-cpu\ndataset: fashion-mnist\ncompute:\n  num_workers: 2\n"
                   "experiment:\n  optim:\n    epochs: 3\n")
    args = train_job.build_parser().parse_args(
        ["--config", str(cfg), "--set", "optim.lr=0.05", "--set", "compute.checkpoint_every=2", "--storage", "x"])
    job = train_job.resolve_job(args)
    assert job.experiment.optim.epochs == 3 and job.experiment.optim.lr == 0.05
    assert job.compute.checkpoint_every == 2 and job.compute.num_workers == 2
    assert job.run_id.startswith("fashion-mnist-cpu-fashion-mnist-")
    # the derived run id follows the config: a different lr is a different run
    other = train_job.resolve_job(train_job.build_parser().parse_args(["--config", str(cfg), "--storage", "x"]))
    assert other.run_id != job.run_id


def test_keys_the_user_sets_are_kept_by_the_adaptation(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("recipe: fashion-mnist-cpu\ndataset: fm\nexperiment:\n  optim:\n    epochs: 3\n")
    args = train_job.build_parser().parse_args(
        ["--config", str(cfg), "--set", "experiment.optim.batch_size=32", "--set", "optim.lr=0.05", "--storage", "x"])
    job = train_job.resolve_job(args)
    assert job.experiment.adapt.fixed == ("optim.batch_size", "optim.epochs")  # lr is not adapted
    plain = train_job.resolve_job(train_job.build_parser().parse_args(["--dataset", "fm", "--storage", "x"]))
    assert plain.experiment.adapt.fixed == () and plain.experiment.adapt.enabled


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    code = train_job.main(["--recipe", "fashion-mnist-cpu", "--set", "optim.batch_size=255",
                           "--storage", str(tmp_path)])
    assert code == 2  # 255 is not divisible by 2 workers
    code = train_job.main(["--set", "secu.constraint=balanced", "--dataset", "fm", "--storage", str(tmp_path)])
    assert code == 2
    assert not any(tmp_path.iterdir())  # nothing was written


def test_train_needs_a_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No silent fallback to a dataset the user did not name."""
    caplog.set_level(logging.ERROR)
    assert train_job.main(["--recipe", "fashion-mnist-cpu", "--storage", str(tmp_path)]) == 2
    assert "no dataset given" in caplog.text and "--dataset NAME" in caplog.text
    assert "Traceback" not in caplog.text
    assert not any(tmp_path.iterdir())


def test_print_config_shows_the_config_adapted_to_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """``--print-config`` printed the recipe before its adaptation, not what training would run."""
    from pipelines.storage import Storage
    from secu.adapt import adapt_to_collection
    from secu.recipes import recipe
    from tests.pipelines.run_builders import make_dataset

    make_dataset(Storage(str(tmp_path)), "small", 300, shard_size=150)
    argv = ["--recipe", "fashion-mnist-cpu", "--storage", str(tmp_path), "--print-config"]
    assert train_job.main([*argv, "--dataset", "small"]) == 0
    printed = json.loads(capsys.readouterr().out)["experiment"]["optim"]
    adapted = adapt_to_collection(recipe("fashion-mnist-cpu"), 300, 2).experiment.optim
    assert (printed["batch_size"], printed["epochs"]) == (adapted.batch_size, adapted.epochs)
    assert (adapted.batch_size, adapted.epochs) != (recipe("fashion-mnist-cpu").optim.batch_size,
                                                    recipe("fashion-mnist-cpu").optim.epochs)
    caplog.set_level(logging.WARNING)
    assert train_job.main([*argv, "--dataset", "not-ingested"]) == 0  # still prints, and says so
    unadapted = json.loads(capsys.readouterr().out)["experiment"]["optim"]
    assert unadapted["epochs"] == recipe("fashion-mnist-cpu").optim.epochs
    assert "before its adaptation to the collection" in caplog.text
