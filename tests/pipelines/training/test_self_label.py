"""The self-labeling stage on Ray Train (``pipelines.training.self_label`` / ``jobs.self_label``) on a local cluster:
it starts from a run's checkpoint, writes checkpoints of its own that inference takes, and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs import self_label as self_label_job
from pipelines.outputs.inference import InferenceOptions, run_inference
from pipelines.storage import Storage
from pipelines.training.checkpointing import (
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_coordinator_state,
    load_training_state,
)
from pipelines.training.metrics_log import HISTORY_FILE
from tests.pipelines.run_builders import add_checkpoint, make_dataset

pytestmark = pytest.mark.ray

TINY = ["--set", "self_label.batch_size=32", "--set", "compute.num_workers=2", "--set", "compute.cpus_per_worker=0.5",
        "--set", "compute.torch_threads=1"]


def test_self_label_starts_from_the_run_checkpoints_and_resumes(tmp_path: Path, ray_cluster: None) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 96, shard_size=32)
    add_checkpoint(storage, "base", "tiny", epoch=3)
    source = load_checkpoint(find_latest_checkpoint(storage, "base"))
    args = ["--from-run", "base", "--storage", storage.root, *TINY]

    assert self_label_job.main([*args, "--set", "self_label.epochs=1"]) == 0
    first = list_checkpoints(storage, "base-sl")
    assert [c.epoch for c in first] == [0]
    state = load_training_state(first[0].location.root)
    assert state.job["run_id"] == "base-sl" and state.job["history"][0]["stage"] == "self_label"
    assert 0.5 <= state.job["history"][0]["self_label/confident_frac"] <= 1.0
    # Only the encoder and head 0's centers moved; the other heads are the source's.
    src = source.method.state_dict()["network"]
    assert not torch.equal(state.network["centers.weights.0"], src["centers.weights.0"])
    assert torch.equal(state.network["centers.weights.1"], src["centers.weights.1"])
    assert load_coordinator_state(first[0].location.root).epoch == 4  # the source's, carried over for warm starts

    # The same run id resumes: epoch 1 is trained from the epoch-0 checkpoint, epoch 0 is not repeated.
    assert self_label_job.main([*args, "--set", "self_label.epochs=2"]) == 0
    assert [c.epoch for c in list_checkpoints(storage, "base-sl")] == [0, 1]
    history = load_training_state(list_checkpoints(storage, "base-sl")[-1].location.root).job["history"]
    assert [row["epoch"] for row in history] == [0, 1]
    assert Path(storage.path("runs", "base-sl", HISTORY_FILE)).is_file()

    result = run_inference(storage, "base-sl", options=InferenceOptions(batch_size=32, concurrency=1,
                                                                        cpus_per_actor=0.5))
    assert result.rows == 96 and result.checkpoint_epoch == 1


def test_self_label_refuses_bad_requests(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 24, shard_size=24)
    add_checkpoint(storage, "base", "tiny", epoch=0)
    common = ["--from-run", "base", "--storage", storage.root]
    assert self_label_job.main([*common, "--run-id", "base"]) == 2  # would overwrite the source
    assert self_label_job.main([*common, "--set", "self_label.batch_size=64"]) == 2  # more than the 24 images
    assert self_label_job.main(["--from-run", "missing", "--storage", storage.root]) == 2
    assert self_label_job.main([*common, "--set", "self_label.head=7"]) == 2  # the recipe has 3 heads
