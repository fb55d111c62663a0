"""The ``tracking.*`` keys: validation, ``--set``/config-file/checkpoint round trips, and the early failure when
MLflow is asked for but not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs import train as train_job
from pipelines.tracking.config import TrackingConfig
from pipelines.training.job_config import TrainJobConfig, apply_job_overrides


def test_off_by_default_and_set_from_the_command_line() -> None:
    job = train_job.resolve_job(train_job.build_parser().parse_args(
        ["--storage", "/tmp/x", "--dataset", "d", "--set", "tracking.mlflow_uri=http://mlflow:5000",
         "--set", "tracking.ray_metrics=false"]))
    assert job.tracking == TrackingConfig(ray_metrics=False, mlflow_uri="http://mlflow:5000")
    assert TrainJobConfig().tracking.mlflow_enabled is False and TrainJobConfig().tracking.ray_metrics is True
    same = apply_job_overrides(TrainJobConfig(dataset="d"), ["tracking.mlflow_experiment=team-a"])
    assert same.tracking.mlflow_experiment == "team-a"
    # tracking is not part of what is trained: the derived run id does not change with it
    assert same.run_id == TrainJobConfig(dataset="d").run_id


def test_round_trip_and_configs_saved_before_tracking_existed() -> None:
    job = TrainJobConfig(dataset="d", run_id="r", tracking=TrackingConfig(mlflow_uri="sqlite:///m.db"))
    assert TrainJobConfig.from_dict(job.to_dict()) == job
    old = {k: v for k, v in job.to_dict().items() if k != "tracking"}
    assert TrainJobConfig.from_dict(old).tracking == TrackingConfig()
    with pytest.raises(ValueError, match=r"unknown config key 'tracking.uri'"):
        TrainJobConfig.from_dict({**old, "tracking": {"uri": "x"}})


def test_a_password_in_the_uri_is_refused_without_repeating_it() -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD") as err:
        TrackingConfig(mlflow_uri="https://alice:s3cret@mlflow.example.com")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="spaces"):
        TrackingConfig(mlflow_uri="http://a b")
    TrackingConfig(mlflow_uri="https://alice@mlflow.example.com")  # a user name alone is no secret


def test_train_job_without_mlflow_fails_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    storage = tmp_path / "root"
    code = train_job.main(["--storage", str(storage), "--dataset", "d",
                           "--set", "tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert code == 2
    assert "pip install 'secu-ray[mlflow]'" in caplog.text
    assert not storage.exists()  # nothing was touched
