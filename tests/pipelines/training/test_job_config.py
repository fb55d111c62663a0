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
