"""The training job's config read back from a dict (config files, checkpoints)."""

from __future__ import annotations

import pytest

from pipelines.training.job_config import TrainJobConfig


def test_compute_values_from_yaml_are_converted_and_unknown_keys_listed() -> None:
    job = TrainJobConfig.from_dict({"recipe": "fashion-mnist-cpu", "compute": {"num_workers": "4", "use_gpu": "false"},
                                    "dataset": "d", "run_id": "r"})
    assert job.compute.num_workers == 4 and job.compute.use_gpu is False
    with pytest.raises(ValueError, match=r"unknown config key 'compute.workers'.*num_workers"):
        TrainJobConfig.from_dict({"recipe": "fashion-mnist-cpu", "compute": {"workers": 2}})


def test_round_trip_through_to_dict() -> None:
    job = TrainJobConfig.from_dict({"recipe": "fashion-mnist-cpu", "compute": {"num_workers": 2}, "dataset": "d",
                                    "run_id": "r"})
    assert TrainJobConfig.from_dict(job.to_dict()) == job


def test_progress_line_states_rate_and_time_left() -> None:
    from pipelines.training.metrics_log import progress_line

    # 50 of 200 steps in 25 s at 256 images a step: 2 steps/s, 512 img/s, 75 s left in the epoch; finished epochs
    # took 100 s, so the run (epoch 3 of 5 running) has 75 s + 2 x 100 s left.
    line = progress_line(2, 5, 50, 200, 256, 25.0, 100.0)
    assert line == "epoch 3/5 step 50/200 (25%), 512 img/s, epoch left 1m15s, run left 4m35s"
    # Before the first epoch ends the run's pace is this epoch's: 100 s an epoch, 4 more epochs.
    assert progress_line(0, 5, 50, 200, 256, 25.0, None).endswith("run left 7m55s")
    assert progress_line(0, 500, 1, 1000, 2, 1.0, None).endswith("run left 138h53m")


def test_label_fetch_is_checked_before_any_work() -> None:
    job = TrainJobConfig.from_dict({"recipe": "fashion-mnist-cpu", "compute": {"label_fetch": "pages"}})
    assert job.compute.label_fetch == "pages"
    with pytest.raises(ValueError, match="compute.label_fetch='paged': use one of auto, all, pages"):
        TrainJobConfig.from_dict({"recipe": "fashion-mnist-cpu", "compute": {"label_fetch": "paged"}})
