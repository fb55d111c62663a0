"""The MLflow run of a training run against a local file store (no Ray): params, one value per epoch and key,
resume into the same run, artifacts, and failures that warn instead of stopping training."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.storage import Storage
from pipelines.tracking import mlflow_run
from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.mlflow_run import EpochLogger, finish_run, log_run_outputs, open_run, require_mlflow

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingConfig:
    # MLflow 3 keeps the file store in maintenance mode behind this switch; it needs no database.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return TrackingConfig(mlflow_uri=(tmp_path / "mlruns").as_uri(), mlflow_experiment="tests")


def _client(tracking: TrackingConfig) -> Any:
    return mlflow.MlflowClient(tracking.mlflow_uri)


JOB = {"experiment": {"optim": {"lr": 0.5, "epochs": 3}, "secu": {"ks": [3, 6]}}, "run_id": "r1", "dataset": "d"}


def test_params_and_one_value_per_epoch_and_key(tracking: TrackingConfig, tmp_path: Path) -> None:
    mlflow_id = open_run(tracking, JOB, "r1", tags={"secu.method": "secu"})
    epochs = EpochLogger(tracking.mlflow_uri, mlflow_id)
    for epoch in range(3):
        epochs.log(epoch, {"epoch": epoch, "train/loss": 3.0 - epoch, "clusters/h0/entropy": 1.0 + epoch,
                           "note": "not a number"})
    epochs.log(1, {"epoch": 1, "train/loss": 99.0})  # a replayed epoch is not logged twice
    epochs.close()
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes_atomic("runs/r1/train_history.json", json.dumps({"epochs": []}).encode())
    finish_run(tracking.mlflow_uri, mlflow_id, storage, "r1", "FINISHED")

    client = _client(tracking)
    run = client.get_run(mlflow_id)
    assert run.data.params["experiment.optim.lr"] == "0.5"
    assert run.data.params["experiment.secu.ks"] == "[3, 6]"
    assert run.data.tags["secu.run_id"] == "r1" and run.data.tags["secu.method"] == "secu"
    assert run.info.status == "FINISHED"
    for key, values in (("train/loss", [3.0, 2.0, 1.0]), ("clusters/h0/entropy", [1.0, 2.0, 3.0]),
                        ("epoch", [0.0, 1.0, 2.0])):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, key))
        assert history == list(enumerate(values)), key
    assert "note" not in run.data.metrics
    assert [f.path for f in client.list_artifacts(mlflow_id)] == ["train_history.json"]


def test_a_resumed_run_logs_into_the_same_mlflow_run(tracking: TrackingConfig, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    first = open_run(tracking, JOB, "r2")
    EpochLogger(tracking.mlflow_uri, first).close()
    changed = {**JOB, "experiment": {"optim": {"lr": 0.5, "epochs": 6}, "secu": {"ks": [3, 6]}}}
    with caplog.at_level(logging.WARNING):
        again = open_run(tracking, changed, "r2")
    assert again == first
    assert "experiment.optim.epochs" in caplog.text  # MLflow params are immutable: named, not relogged
    assert _client(tracking).get_run(first).data.params["experiment.optim.epochs"] == "3"
    other = open_run(tracking, JOB, "r3")
    assert other != first


def test_a_failing_server_mid_run_warns_and_training_goes_on(tracking: TrackingConfig, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    mlflow_id = open_run(tracking, JOB, "r4")
    real = mlflow_run._client

    class Failing:
        def __init__(self, uri: str) -> None:
            self.inner = real(uri)

        def get_metric_history(self, *args: Any) -> Any:
            return self.inner.get_metric_history(*args)

        def log_batch(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("server gone")

    monkeypatch.setattr(mlflow_run, "_client", Failing)
    with caplog.at_level(logging.WARNING):
        epochs = EpochLogger(tracking.mlflow_uri, mlflow_id)
        epochs.log(0, {"epoch": 0, "train/loss": 1.0})  # returns at once; the failure is logged on the thread
        epochs.close()
    assert "could not log epoch 0" in caplog.text and "training goes on" in caplog.text


def test_an_unreachable_store_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 then refuses a file store
    tracking = TrackingConfig(mlflow_uri=(tmp_path / "mlruns").as_uri())
    with pytest.raises(ValueError, match=r"tracking.mlflow_uri=file://.*could not open the MLflow run"):
        open_run(tracking, JOB, "r5")


def test_missing_mlflow_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'secu-ray\[mlflow\]'"):
        require_mlflow(TrackingConfig(mlflow_uri="http://127.0.0.1:5000"))
    require_mlflow(TrackingConfig())  # off by default: nothing needed


def test_report_folder_and_metrics_json_as_artifacts(tracking: TrackingConfig, tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes_atomic("runs/r6/report/index.html", b"<html></html>")
    storage.write_bytes_atomic("runs/r6/report/clusters/c0000.html", b"<html></html>")
    storage.write_bytes_atomic("runs/r6/metrics.json", b"{}")
    logged = log_run_outputs(tracking, storage, "r6", ["runs/r6/report", "runs/r6/metrics.json", "runs/r6/absent"])
    assert logged == ["report", "metrics.json"]
    client = _client(tracking)
    run_id = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                "tags.`secu.run_id` = 'r6'")[0].info.run_id
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["metrics.json", "report"]
    assert sorted(f.path for f in client.list_artifacts(run_id, "report")) == ["report/clusters", "report/index.html"]


def test_report_of_another_dataset_names_its_own_folder_and_metrics(tracking: TrackingConfig, tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes_atomic("runs/r7/report-test/index.html", b"<html></html>")
    storage.write_bytes_atomic("runs/r7/metrics-test.json", b"{}")
    storage.write_bytes_atomic("runs/r7/metrics.json", b"{}")  # another output's: not logged
    assert mlflow_run.log_report(tracking, storage, "r7", "assignments-test") == ["report-test", "metrics-test.json"]
