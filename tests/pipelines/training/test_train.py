"""Training through Ray Train with 2 CPU workers (gloo) and the coordinator actor: recovery from a
killed worker and a killed coordinator, and resume of a stopped run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.common import classify_error
from pipelines.storage import Storage
from pipelines.training.checkpoint_integrity import RAY_SNAPSHOT_FILE
from pipelines.training.checkpointing import (
    MODEL_FILE,
    list_checkpoints,
    load_coordinator_state,
    load_training_state,
)
from pipelines.training.fail_fast import deterministic_error
from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
from pipelines.training.trainer import run_training
from secu.recipes import recipe
from tests.pipelines.run_builders import make_dataset

pytestmark = pytest.mark.ray

N = 200
"""Not a multiple of the global batch (32): each of the 2 ranks gets 100 images, 6 batches of 16 and a short one
of 4, which is labelled without training on it."""


def make_job(run_id: str, *overrides: str) -> TrainJobConfig:
    job = TrainJobConfig(
        experiment=recipe("fashion-mnist-cpu"),
        compute=ComputeConfig(num_workers=2, cpus_per_worker=0.5, torch_threads=1, log_every=1000),
        dataset="patterns", run_id=run_id,
    )
    # These tests check mechanics (recovery, resume, counters) on short explicit schedules: no adaptation.
    return apply_job_overrides(job, ["optim.batch_size=32", "model.cnn_width=8", "secu.ks=[3,6]",
                                     "adapt.enabled=false", *overrides])


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Storage:
    st = Storage(str(tmp_path_factory.mktemp("train-root")))
    make_dataset(st, "patterns", N, shard_size=50)
    return st


def history(storage: Storage, run_id: str) -> list[dict[str, float]]:
    data = json.loads(storage.read_bytes(storage.join("runs", run_id, "train_history.json")))
    rows: list[dict[str, float]] = data["epochs"]
    return rows


def test_worker_and_coordinator_killed_mid_run_recover(storage: Storage) -> None:
    """A worker dies in epoch 1 and a coordinator shard in epoch 2; the run completes from the last
    checkpoints, and the entropy counters equal a recount of the memory (nothing counted twice or lost).
    The workers read labels by pages (the mode of collections over 256 MiB of labels)."""
    job = make_job("faults", "optim.epochs=4", "secu.constraint=entropy", "secu.alpha=50",
                   "compute.fault_injection=worker:1:2,coordinator:2:3", "compute.coordinator_shards=2",
                   "compute.label_fetch=pages")
    outcome = run_training(job, storage)
    assert outcome.epochs_run == 4
    for marker in ("_fault_worker_1_2_fired", "_fault_coordinator_2_3_fired"):
        assert storage.exists(storage.join("runs", "faults", marker)), f"{marker}: the fault never fired"
    rows = history(storage, "faults")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # replayed epochs appear once
    for row in rows:
        assert row["clusters/written_frac"] == 1.0 and row["data/labelled_only"] == 8, row  # short batches too
        for h in range(2):
            assert row[f"clusters/h{h}/counter_gap_frac"] == 0.0, row
            assert row[f"clusters/h{h}/labelled_frac"] == 1.0
            # Recorded every epoch: >= 1/K by pigeonhole once any step was counted (0.0 if none were).
            assert 1 / (3, 6)[h] <= row[f"clusters/h{h}/largest_batch_share"] <= 1.0, row
    assert outcome.checkpoint_path is not None
    saved = load_training_state(outcome.checkpoint_path)
    coord = load_coordinator_state(outcome.checkpoint_path)
    assert saved.epoch == 3
    memory = coord.labels()
    assert memory.shape == (2, N) and (memory >= 0).all()
    for h, k in enumerate((3, 6)):
        recount = np.bincount(memory[h], minlength=k)
        assert torch.equal(saved.cluster_state.counters[h], torch.from_numpy(recount).double())


def test_stopped_run_resumes_from_its_checkpoint(storage: Storage) -> None:
    first = run_training(make_job("resume", "optim.epochs=3", "compute.stop_after_epoch=0"), storage)
    assert first.epochs_run == 1 and first.checkpoint_path is not None
    at_stop = load_training_state(first.checkpoint_path)
    coord_at_stop = load_coordinator_state(first.checkpoint_path)
    second = run_training(make_job("resume", "optim.epochs=3"), storage)
    assert second.epochs_run == 3
    rows = history(storage, "resume")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    # The resumed run continued the step counter and the labels of the checkpoint, not a fresh start.
    assert second.checkpoint_path is not None
    final = load_training_state(second.checkpoint_path)
    assert final.global_step == at_stop.global_step + 2 * rows[1]["train/steps"]
    assert at_stop.global_step == rows[0]["train/steps"]
    assert rows[1]["clusters/h0/changed_frac"] < 1.0  # compared against the restored epoch-0 labels
    prev0 = coord_at_stop.labels()
    assert (prev0 >= 0).all()


@pytest.mark.slow  # two Ray trainings; the checks themselves are covered without Ray in test_damaged_checkpoints.py
def test_damaged_and_deleted_checkpoints_resume_from_the_newest_intact_one(storage: Storage) -> None:
    """Issue 17: the latest checkpoint's folder deleted (Ray's snapshot still names it, which made Ray refuse
    to start) and the one before it cut short (Ray would have resumed from it and failed on torch's zip
    error, 3 retries): the run resumes from the newest intact checkpoint, epoch 0, and completes."""
    first = run_training(make_job("damaged", "optim.epochs=4", "compute.stop_after_epoch=2",
                                  "compute.num_to_keep=3"), storage)
    assert first.epochs_run == 3
    ckpts = list_checkpoints(storage, "damaged")
    assert [c.epoch for c in ckpts] == [0, 1, 2]
    rows_before = history(storage, "damaged")
    shutil.rmtree(storage.path(ckpts[2].label))
    model = Path(storage.path(ckpts[1].label, MODEL_FILE))
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    second = run_training(make_job("damaged", "optim.epochs=4", "compute.num_to_keep=3"), storage)
    assert second.epochs_run == 4
    snapshots = [e.path for e in storage.list(storage.join("runs", "damaged", "checkpoints"))]
    assert RAY_SNAPSHOT_FILE + ".stale-0" in snapshots  # set aside with the reason logged
    rows = history(storage, "damaged")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert rows[0] == rows_before[0]  # epoch 0 came from its checkpoint, not from a fresh start
    assert rows[1]["time/epoch_s"] != rows_before[1]["time/epoch_s"]  # epoch 1 was trained again
    assert second.checkpoint_path is not None
    final = load_training_state(second.checkpoint_path)
    assert final.global_step == ckpts[0].global_step + sum(int(r["train/steps"]) for r in rows[1:])


def corrupt_one_image(storage: Storage, dataset: str) -> None:
    """Overwrite the header of the first PNG member of the first shard (same size: only decoding finds it)."""
    path = storage.path("datasets", dataset, "shards", "shard-000000.tar")
    data = bytearray(open(path, "rb").read())
    at = data.find(b"\x89PNG")
    data[at + 8: at + 40] = b"\xff" * 32
    open(path, "wb").write(bytes(data))


def test_bad_input_over_budget_stops_at_once_without_retries(storage: Storage) -> None:
    """Issue 17: one undecodable image with no budget (max_bad_fraction 0) used to be retried 3 times by Ray
    Train (4.5 min, exit 1); now the controller raises it on the first attempt and the job names it (exit 2)."""
    make_dataset(storage, "one-bad", 64, shard_size=32)
    corrupt_one_image(storage, "one-bad")
    job = apply_job_overrides(make_job("one-bad", "optim.epochs=3", "compute.max_bad_fraction=0"),
                              ["dataset=one-bad"])
    with pytest.raises(Exception) as caught:  # noqa: B017 - Ray's ControllerError carrying ours
        run_training(job, storage)
    failure = classify_error(caught.value)
    assert failure is not None and failure.exit_code == 2 and failure.kind == "bad input", caught.value
    assert "too much bad input" in failure.message and "undecodable" in failure.message
    # Ray Train raises a ControllerError only when a controller callback fails: ours, which Ray calls at every
    # worker error before it decides to retry, raised at the first one (exhausted retries raise the workers'
    # WorkerGroupError instead).
    assert type(caught.value).__name__ == "ControllerError", repr(caught.value)
    assert deterministic_error(caught.value.controller_failure) is not None  # type: ignore[attr-defined]
    assert not list_checkpoints(storage, "one-bad")  # it failed in epoch 0, before any checkpoint


def test_missing_dataset_fails_before_training(storage: Storage, tmp_path: Path) -> None:
    job = apply_job_overrides(make_job("nodata"), ["dataset=not-ingested"])
    with pytest.raises(FileNotFoundError, match="no dataset 'not-ingested'"):
        run_training(job, storage)


@pytest.mark.slow  # a Ray training; the views' distributions are checked without Ray in test_views_of_canvas.py
def test_views_on_the_workers_label_every_image(storage: Storage) -> None:
    """``augment.views_on_device=true`` on CPU workers: Ray Data only reads and decodes, each worker makes both
    views from its batches (``pipelines.dataset.streams.device_views``), and every image is labelled."""
    job = make_job("device-views", "optim.epochs=2", "augment.views_on_device=true")
    assert job.experiment.augment.views_on_device_for(job.compute.use_gpu)
    outcome = run_training(job, storage)
    assert outcome.epochs_run == 2
    rows = history(storage, "device-views")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert row["data/images"] == 192 and row["data/labelled_only"] == 8  # full batches; the short ones
        for h in range(2):
            assert row[f"clusters/h{h}/labelled_frac"] == 1.0, row
    assert outcome.checkpoint_path is not None
    memory = load_coordinator_state(outcome.checkpoint_path).labels()
    assert memory.shape == (2, N) and (memory >= 0).all()
