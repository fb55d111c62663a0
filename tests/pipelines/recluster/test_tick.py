"""A reclustering tick refuses a missing dataset before it takes the series lock or writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.recluster.tick import run_recluster
from pipelines.storage import Storage
from pipelines.training.job_config import ComputeConfig, TrainJobConfig
from secu.recipes import recipe


def test_missing_dataset_fails_before_the_lock_and_the_series(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    template = TrainJobConfig(experiment=recipe("fashion-mnist-cpu"), compute=ComputeConfig(num_workers=1),
                              dataset="nowhere", run_id="")
    with pytest.raises(FileNotFoundError, match="no dataset 'nowhere'.*jobs.ingest"):
        run_recluster(storage, template, "nightly", tick="t1")
    assert not (tmp_path / "runs").exists()  # no lock, no series record
