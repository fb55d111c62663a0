"""The infer, evaluate and report entrypoints: arguments, exit codes, errors, the inference lock (no Ray cluster
needed)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import cli, evaluate, infer, report
from jobs.common import EXIT_LOCKED
from pipelines.dataset.info import load_dataset_info, read_manifest
from pipelines.outputs.assignments import output_dir
from pipelines.outputs.publish import lock_path, output_lock
from pipelines.run_lock import LockInfo
from pipelines.storage import Storage
from tests.pipelines.run_builders import add_checkpoint, make_dataset, publish_assignments


@pytest.fixture()
def published(tmp_path: Path) -> Storage:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 9, shard_size=9)
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    labels = manifest["label"].to_pylist()
    publish_assignments(storage, "r", "tiny", list(range(9)), manifest["key"].to_pylist(),
                        manifest["shard"].to_pylist(), [labels], ks=[3], files=1)
    return storage


def test_parsers_have_the_documented_options() -> None:
    args = infer.build_parser().parse_args(["--storage", "/x", "--run-id", "r", "--with-embeddings",
                                            "--set", "batch_size=8", "--dataset", "d"])
    assert (args.run_id, args.with_embeddings, args.overrides, args.dataset) == ("r", True, ["batch_size=8"], "d")
    assert evaluate.build_parser().parse_args(["--storage", "/x", "--run-id", "r"]).output_name is None
    assert report.build_parser().parse_args(["--storage", "/x", "--run-id", "r", "--head", "1"]).head == 1
    with pytest.raises(SystemExit):
        infer.build_parser().parse_args(["--storage", "/x"])  # --run-id is required


def test_infer_fails_clearly_without_a_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code = infer.main(["--storage", str(tmp_path), "--run-id", "missing"])
    assert code == 2
    assert "no complete checkpoint" in caplog.text and "jobs.train" in caplog.text


def test_infer_rejects_unknown_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert infer.main(["--storage", str(tmp_path), "--run-id", "r", "--set", "bogus=1"]) == 2
    assert "bogus" in caplog.text
    with caplog.at_level(logging.ERROR):
        assert infer.main(["--storage", str(tmp_path), "--run-id", "r", "--set", "batch_size=0"]) == 2
    assert "batch_size=0" in caplog.text


def test_evaluate_prints_a_table_and_writes_metrics(published: Storage,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--storage", published.root, "--run-id", "r"]) == 0
    out = capsys.readouterr().out
    assert "ACC" in out and "1.0000" in out
    metrics = json.loads(Path(published.path("runs/r/metrics.json")).read_text())
    assert metrics["heads"][0]["acc"] == 1.0 and metrics["protocol"]["dataset"] == "tiny"
    assert evaluate.main(["--storage", published.root, "--run-id", "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heads"][0]["nmi"] == 1.0


def test_evaluate_refuses_unpublished_output(published: Storage, caplog: pytest.LogCaptureFixture) -> None:
    Path(published.path("runs/r/assignments/_SUCCESS")).unlink()
    with caplog.at_level(logging.ERROR):
        assert evaluate.main(["--storage", published.root, "--run-id", "r"]) == 2
    assert "_SUCCESS is missing" in caplog.text and "jobs.infer" in caplog.text


def test_report_through_the_console_script(published: Storage, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--storage", published.root, "--run-id", "r", "--set", "top=2"]) == 0
    index = Path(capsys.readouterr().out.strip())
    assert index == Path(published.path("runs/r/report/index.html")) and index.exists()
    assert report.main(["--storage", published.root, "--run-id", "r", "--head", "3"]) == 2


def test_a_second_infer_of_the_same_output_is_refused_in_seconds_naming_the_holder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 9, shard_size=9)
    add_checkpoint(storage, "r", "tiny", 1)
    caplog.set_level(logging.ERROR)
    with output_lock(storage, output_dir("r"), "inference of run r into assignments (the first one)"):
        start = time.monotonic()
        code = infer.main(["--storage", storage.root, "--run-id", "r"])
        elapsed = time.monotonic() - start
    assert code == EXIT_LOCKED and elapsed < 15, (code, elapsed)
    assert "refused: another run holds lock" in caplog.text and "runs/r/_infer-assignments.lock" in caplog.text
    assert "inference of run r into assignments (the first one)" in caplog.text and "since" in caplog.text
    assert not (tmp_path / "runs" / "r" / "_staging").exists()  # it touched nothing of the first one's work
    assert not (tmp_path / "runs" / "r" / "assignments").exists()


def test_the_lock_of_a_dead_inference_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    holder = LockInfo(f"{socket.gethostname()}:{int(dead.stdout)}:0badf00d", "inference of run r into assignments",
                      time.time() - 60, time.time() + 3600)
    storage.write_bytes_atomic(lock_path(output_dir("r")), holder.to_bytes())
    with caplog.at_level(logging.WARNING), output_lock(storage, output_dir("r"), "the next inference") as lock:
        assert lock.read() is not None and lock.read() == lock.info
    assert "its holder's process is gone" in caplog.text and "0badf00d" in caplog.text
    assert not storage.exists(lock_path(output_dir("r")))  # released after the block
