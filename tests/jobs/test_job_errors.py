"""Every job's errors that a user can fix: exit 2 (3 for a held lock), one message, no traceback, before any work.

Bad keys, unreachable or forbidden S3 endpoints, missing datasets and held locks; none of these tests starts Ray.
"""

from __future__ import annotations

import http.server
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobs import demo, evaluate, infer, ingest, recluster, report, self_label, train
from jobs.common import EXIT_LOCKED
from pipelines.run_lock import StorageLock
from pipelines.storage import Storage
from tests.fixtures import write_idx_dataset
from tests.pipelines.run_builders import make_dataset

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
Main = Callable[[list[str]], int]

# module -> its required arguments (--storage and --set are added by the tests)
JOBS = {
    "evaluate": ["--run-id", "r"],
    "ingest": ["--source", "/nonexistent", "--dataset", "d"],
    "train": ["--dataset", "d"],
    "infer": ["--run-id", "r"],
    "report": ["--run-id", "r"],
    "self_label": ["--from-run", "r"],
    "recluster": ["--run-id", "r"],
    "demo": ["--source", "/nonexistent"],
}
VALID_KEYS = {
    "ingest": "valid keys: limit, lock_ttl_hours, max_in_flight, max_pixels, shard_size, use_ray",
    "infer": ("valid keys: batch_size, concurrency, cpus_per_actor, max_bad_fraction, min_rows_per_file, model_in, "
              "use_gpu"),
    "report": "valid keys: borderline, head, map_layout, map_points, more_pages, page_size, random, seed, threads, "
              "thumb_px, top",
    "demo": "valid keys: compute.*, experiment.*, recipe, tracking.*;",  # the demo names its datasets and run itself
}
TRAINING_KEYS = "valid keys: compute.*, dataset, experiment.*"


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Fake keys: without any, the AWS SDK would first ask the EC2 metadata service (slow timeouts).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def run_module(name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"jobs.{name}", *argv], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=120)


def errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("name", sorted(set(JOBS) - {"evaluate"}))
def test_unknown_set_key_names_the_valid_ones(name: str, tmp_path: Path) -> None:
    storage = [] if name == "demo" else ["--storage", str(tmp_path)]
    done = run_module(name, [*JOBS[name], "--set", "nope=1", *storage])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = errors_of(done.stderr)
    assert "--set nope=1: unknown key 'nope'; " + VALID_KEYS.get(name, TRAINING_KEYS) in line
    assert not any(tmp_path.iterdir())  # nothing was written


def test_evaluate_takes_no_set(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--run-id", "r", "--storage", "x", "--set", "nope=1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --set nope=1" in capsys.readouterr().err


@pytest.mark.parametrize(("main", "argv", "text", "message"), [
    (train.main, [], "optim:\n  nope: 1\n", "unknown key 'optim.nope'; valid keys in optim: batch_size,"),
    (train.main, [], "compute:\n  num_worker: 2\n", "unknown key 'compute.num_worker'; valid keys in compute: "),
    (recluster.main, ["--run-id", "r"], "recluster:\n  epoch: 3\n",
     "unknown key 'recluster.epoch'; valid keys in recluster: epochs, infer_scope, lock_ttl_hours,"),
    (recluster.main, ["--run-id", "r"], "inference:\n  batch: 3\n",
     "unknown key 'inference.batch'; valid keys in inference: batch_size, concurrency,"),
    (infer.main, ["--run-id", "r"], "batch: 8\n", f"unknown key 'batch'; {VALID_KEYS['infer']}"),
    (report.main, ["--run-id", "r"], "tops: 8\n", f"unknown key 'tops'; {VALID_KEYS['report']}"),
    (ingest.main, ["--source", "/x", "--dataset", "d"], "shards: 8\n", f"unknown key 'shards'; {VALID_KEYS['ingest']}"),
    (self_label.main, ["--from-run", "r"], "self_label:\n  epoch: 3\n",
     "unknown key 'self_label.epoch'; valid keys in self_label: "),
    (self_label.main, ["--from-run", "r"], "recipe: cifar10\n",
     "unknown key 'recipe'; valid keys: compute.*, dataset,"),
])
def test_unknown_config_file_keys_name_the_valid_ones(main: Main, argv: list[str], text: str, message: str,
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--config", str(cfg), "--storage", str(tmp_path / "st")]) == 2
    assert f"bad configuration: config file {cfg}: {message}" in caplog.text
    assert not (tmp_path / "st").exists()


def test_config_file_missing_or_not_a_mapping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    assert train.main(["--config", str(tmp_path / "nope.yaml"), "--storage", str(tmp_path)]) == 2
    assert f"not found: config file {tmp_path / 'nope.yaml'} does not exist" in caplog.text
    listed = tmp_path / "list.yaml"
    listed.write_text("- optim.lr=0.1\n")
    assert recluster.main(["--run-id", "r", "--config", str(listed), "--storage", str(tmp_path)]) == 2
    assert "must hold a mapping of keys to values at the top level" in caplog.text


@pytest.mark.parametrize("name", ["train", "infer"])
def test_unreachable_s3_endpoint_exits_2_with_a_message(name: str) -> None:
    done = run_module(name, [*JOBS[name], "--storage", "s3://bucket/x", "--s3-endpoint", UNREACHABLE])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = errors_of(done.stderr)
    assert f"storage: cannot reach S3 endpoint {UNREACHABLE} for bucket 'bucket'" in line
    assert "Fix --s3-endpoint or start the server" in line


MAINS: dict[str, Main] = {"train": train.main, "infer": infer.main, "evaluate": evaluate.main, "report": report.main,
                          "self_label": self_label.main, "recluster": recluster.main, "ingest": ingest.main}


@pytest.mark.parametrize("name", ["evaluate", "report", "self_label", "recluster", "ingest"])
def test_unreachable_s3_endpoint_in_the_other_jobs(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_idx_dataset(tmp_path / "fm", 2, 1)
    argv = ["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "d"] if name == "ingest" else JOBS[name]
    with caplog.at_level(logging.ERROR):
        assert MAINS[name]([*argv, "--storage", "s3://bucket/x", "--s3-endpoint", UNREACHABLE]) == 2
    assert f"cannot reach S3 endpoint {UNREACHABLE}" in caplog.text


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request with 403 AccessDenied (wrong credentials or policy)."""

    BODY = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _deny

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def forbidden_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", ["train", "infer", "evaluate", "report"])
def test_forbidden_s3_endpoint_exits_2_with_a_message(name: str, forbidden_endpoint: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert MAINS[name]([*JOBS[name], "--storage", "s3://bucket/x", "--s3-endpoint", forbidden_endpoint]) == 2
    assert f"storage: cannot access bucket 'bucket' at endpoint {forbidden_endpoint}" in caplog.text
    assert "ACCESS_DENIED" in caplog.text and "credentials from AWS_ACCESS_KEY_ID" in caplog.text


def test_missing_dataset_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    assert train.main(["--dataset", "missing", "--storage", str(tmp_path)]) == 2
    assert "not found: " in caplog.text and "missing" in caplog.text
    caplog.clear()
    assert recluster.main(["--run-id", "lake", "--storage", str(tmp_path)]) == 2  # no --source: the dataset must exist
    assert "not found: " in caplog.text and "lake" in caplog.text
    assert not (tmp_path / "runs").exists()  # refused before the lock and the series record
    caplog.clear()
    assert evaluate.main(["--run-id", "missing", "--storage", str(tmp_path)]) == 2
    assert "not found: " in caplog.text


def test_demo_checks_its_source_before_any_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert demo.main(["--source", str(tmp_path / "none"), "--storage", str(tmp_path / "st")]) == 2
    assert "Fashion-MNIST is not at" in caplog.text and not (tmp_path / "st").exists()


def test_held_locks_exit_3_naming_the_holder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage(str(tmp_path / "st"))
    make_dataset(storage, "lake", 9, shard_size=9)
    caplog.set_level(logging.ERROR)
    with StorageLock(storage, "runs/lake/_recluster.lock", ttl_s=600, purpose="reclustering tick lake-other"):
        assert recluster.main(["--run-id", "lake", "--tick", "t9", "--storage", storage.root]) == EXIT_LOCKED
    assert "refused: another run holds lock" in caplog.text and "reclustering tick lake-other" in caplog.text
    assert not storage.exists("runs/lake-t9")
    write_idx_dataset(tmp_path / "fm", 4, 1)
    with StorageLock(storage, "datasets/fm/_ingest.lock", ttl_s=600, purpose="ingest into dataset fm"):
        assert ingest.main(["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "fm", "--ray", "off",
                            "--storage", storage.root]) == EXIT_LOCKED
    assert "another ingest into this dataset is running" in caplog.text
