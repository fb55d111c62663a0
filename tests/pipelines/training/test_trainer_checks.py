"""The training driver's checks before any work: clusters that fit the collection, CPUs that leave the
data stage its share on a machine of fixed size."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.storage import Storage
from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
from pipelines.training.trainer import cpus_per_worker_that_fit, run_training
from secu.recipes import recipe
from tests.pipelines.run_builders import make_dataset


def tiny_run(root: Path, run_id: str, ks: str) -> tuple[Storage, TrainJobConfig]:
    """40 ingested pattern images and a job on them with batch 32 and heads ``ks``."""
    storage = Storage(str(root))
    make_dataset(storage, "tiny", 40, shard_size=20)
    job = apply_job_overrides(TrainJobConfig(experiment=recipe("fashion-mnist-cpu"), compute=ComputeConfig(),
                                             dataset="tiny", run_id=run_id),
                              ["optim.batch_size=32", f"secu.ks={ks}", "adapt.enabled=false"])
    return storage, job


def test_more_clusters_than_images_is_refused_before_any_work(tmp_path: Path) -> None:
    storage, job = tiny_run(tmp_path, "k", "[10,50]")
    with pytest.raises(ValueError, match=r"has 40 images but secu.ks=\[10, 50\] asks for up to 50 clusters"):
        run_training(job, storage)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("workers", "per_worker", "cpus", "expected"), [
    (2, 1.0, 2, 0.5),    # the default on a 2-core machine: both CPUs to training, none to Ray Data
    (2, 0.5, 2, None),   # what the demo sets: one CPU left
    (4, 1.0, 16, None),
    (8, 2.0, 16, 1.85),
    (3, 1.0, 1, 0.1),    # never below 0.1
])
def test_cpus_per_worker_leave_one_cpu_to_the_data(workers: int, per_worker: float, cpus: float,
                                                   expected: float | None) -> None:
    got = cpus_per_worker_that_fit(workers, per_worker, cpus)
    assert got == expected
    if got is not None and cpus > 1:
        assert cpus - workers * got >= 1.0


def test_a_second_training_of_a_running_run_id_is_refused(tmp_path: Path) -> None:
    """Two drivers on one run id would write two checkpoints per epoch into one run: the second is refused."""
    import socket
    import subprocess
    import sys
    import time

    from pipelines.run_lock import LockHeldError, LockInfo
    from pipelines.training.trainer import TRAIN_LOCK

    storage, job = tiny_run(tmp_path, "busy", "[3]")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the first driver, alive
    try:
        now = time.time()
        storage.write_bytes_atomic(f"runs/busy/{TRAIN_LOCK}", LockInfo(
            f"{socket.gethostname()}:{other.pid}:0001", "training run busy", now, now + 3600).to_bytes())
        with pytest.raises(LockHeldError, match="training run busy"):
            run_training(job, storage)
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in (tmp_path / "runs" / "busy").iterdir()) == [TRAIN_LOCK]  # nothing else written
