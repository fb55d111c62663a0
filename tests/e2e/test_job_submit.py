"""End to end through ``ray job submit`` against a local head: ingest, train, infer, evaluate, report on S3 (moto).

The head is started by the test (``ray start --head``, free ports, its own temp dir, auth disabled) without
AWS credentials in its environment: the jobs get the fake credentials only through the job's runtime env
(``--runtime-env-json`` env_vars), and the endpoint through ``--s3-endpoint``. The working dir uploaded is
the repository with the excludes of ``cluster_configs/runtime_env.yaml`` (no .venv, no data).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from pipelines.outputs.assignments import published_files, read_assignments, read_marker
from pipelines.storage import Storage
from tests.e2e.ray_head import REPO, Head, ray_cli, start_head, stop_head
from tests.fixtures import write_idx_dataset

pytestmark = pytest.mark.ray

SECRET = f"secu-e2e-{uuid.uuid4().hex}"
"""A fake secret key (moto accepts any): it must reach the workers and never appear in a job's log."""


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    started = start_head(2, dashboard=True)
    try:
        yield started
    finally:
        stop_head(started)


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    import botocore.session

    name = f"e2e-{uuid.uuid4().hex[:10]}"
    botocore.session.get_session().create_client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


def runtime_env_json() -> str:
    """cluster_configs/runtime_env.yaml's excludes and env vars, plus the fake credentials."""
    spec = yaml.safe_load((REPO / "cluster_configs" / "runtime_env.yaml").read_text())
    env_vars = dict(spec.get("env_vars", {})) | {"AWS_ACCESS_KEY_ID": "secu-e2e-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                                                  "AWS_DEFAULT_REGION": "us-east-1"}
    return json.dumps({"excludes": spec["excludes"], "env_vars": env_vars})


@dataclass
class JobRun:
    """How a submitted job ended."""

    state: str
    seconds: float
    logs: str


def submit(head: Head, name: str, *entrypoint: str, timeout_s: float = 420.0) -> JobRun:
    """``ray job submit`` (blocking) of ``python -m <entrypoint>``; checks that the logs hold no secret."""
    assert head.dashboard_url is not None
    job_id = f"{name}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    done = ray_cli(head, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
                   "--working-dir", str(REPO), "--runtime-env-json", runtime_env_json(), "--",
                   "python", "-m", *entrypoint, timeout_s=timeout_s)
    seconds = time.monotonic() - started
    client = JobSubmissionClient(head.dashboard_url)
    state = str(client.get_job_status(job_id).value)
    logs = client.get_job_logs(job_id)
    shown = ray_cli(head, "job", "logs", "--address", head.dashboard_url, job_id, timeout_s=60)
    for text in (logs, shown.stdout, shown.stderr, done.stdout, done.stderr):
        assert SECRET not in text, f"job {job_id}: the secret key appears in its logs"
    assert (done.returncode == 0) == (state == "SUCCEEDED"), (done.returncode, state)
    print(f"ray job submit {name}: {state} in {seconds:.0f} s")
    return JobRun(state, seconds, logs)


def test_ingest_train_infer_evaluate_through_job_submit(head: Head, moto_endpoint: str, bucket: str,
                                                        tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 128, 16)
    store = ["--storage", f"s3://{bucket}/secu", "--s3-endpoint", moto_endpoint]
    tiny = ["--set", "optim.warmup_epochs=1", "--set", "optim.epochs=1", "--set", "optim.batch_size=32",
            "--set", "model.cnn_width=8", "--set", "secu.ks=[3,6]", "--set", "compute.num_workers=2",
            "--set", "compute.cpus_per_worker=0.5", "--set", "compute.torch_threads=1"]
    steps = [
        ("ingest", ["jobs.ingest", "--source", f"idx:{tmp_path / 'fm'}", "--split", "train", "--dataset", "fm",
                    "--shard-size", "64", *store]),
        ("train", ["jobs.train", "--recipe", "fashion-mnist-cpu", "--dataset", "fm", "--run-id", "e2e", *tiny,
                   *store]),
        ("infer", ["jobs.infer", "--run-id", "e2e", "--set", "cpus_per_actor=0.5", "--set", "concurrency=1", *store]),
        ("evaluate", ["jobs.evaluate", "--run-id", "e2e", *store]),
        ("report", ["jobs.report", "--run-id", "e2e", "--set", "top=2", "--set", "random=1", *store]),
    ]
    for name, entrypoint in steps:
        run = submit(head, name, *entrypoint)
        assert run.state == "SUCCEEDED", f"{name} job {run.state}:\n{run.logs[-6000:]}"

    storage = Storage(f"s3://{bucket}/secu", s3_endpoint=moto_endpoint)
    marker = read_marker(storage, "e2e")
    assert marker["rows"] == 128 and marker["dataset"] == "fm"
    files = published_files(storage, "e2e")
    version = f"s3://{bucket}/secu/runs/e2e/_versions/assignments/{marker['version']}/part-"
    assert files and all(f.startswith(version) for f in files), files
    table = read_assignments(storage, "e2e")
    assert table.num_rows == 128 and sorted(table["sample_index"].to_pylist()) == list(range(128))
    assert {"sample_index", "cluster_h0", "cluster_h1", "confidence_h0", "run_id"} <= set(table.column_names)
    metrics = json.loads(storage.read_bytes("runs/e2e/metrics.json"))
    assert metrics["protocol"]["rows"] == 128 and "eval/h0/acc" in metrics["metrics"]
    assert storage.exists("runs/e2e/checkpoints") and storage.exists("datasets/fm/dataset.json")
    assert b"SeCu clusters of run e2e" in storage.read_bytes("runs/e2e/report/index.html")


def test_bad_configuration_fails_fast_with_a_clear_message(head: Head, moto_endpoint: str, bucket: str) -> None:
    run = submit(head, "bad-config", "jobs.train", "--dataset", "fm", "--run-id", "bad", "--set", "optim.lr=fast",
                 "--storage", f"s3://{bucket}/secu", "--s3-endpoint", moto_endpoint, timeout_s=180)
    assert run.state == "FAILED"
    assert "bad configuration" in run.logs and "optim.lr" in run.logs, run.logs
    assert "training run" not in run.logs  # it stopped before any Ray Train work
    assert run.seconds < 90, run.seconds  # job start + imports only (10-20 s here), no training
    # A relative local storage root inside a submitted job would land in the job's temporary working dir.
    run = submit(head, "bad-storage", "jobs.evaluate", "--run-id", "e2e", "--storage", "./data", timeout_s=180)
    assert run.state == "FAILED" and "relative path inside a `ray job submit` job" in run.logs, run.logs
