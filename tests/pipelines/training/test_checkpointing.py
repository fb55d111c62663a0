"""The checkpoint format: checkpoints written before the typed states still load, new ones keep the same
layout, and writing, finding and reading go through ``pipelines.training.checkpointing`` (no Ray).

``write_old_checkpoint`` builds, by hand with raw dicts and ``torch.save``, exactly the files the code of
before the typed states wrote (``save_checkpoint`` of a ``CoordinatorClient.state_dict()``; its layout was
dumped from that code: keys, containers, dtypes; the values are chosen here).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.storage import Storage, join
from pipelines.training.checkpointing import (
    COORDINATOR_FILE,
    META_FILE,
    MODEL_FILE,
    TrainingState,
    checkpoint_at,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_coordinator_state,
    load_training_state,
    publish_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
from pipelines.training.memory import AssignmentMemory
from pipelines.training.warm_start import prepare_warm_start
from secu.network import build_network
from secu.recipes import recipe
from tests.pipelines.training.memory_builders import assert_same

KS = [3, 5]
RANGES = [(0, 3), (3, 7)]
HISTORY = [{"epoch": 0, "train/loss": 2.5}]


def old_job() -> dict[str, Any]:
    job = TrainJobConfig(experiment=recipe("fashion-mnist-cpu"), compute=ComputeConfig(num_workers=1),
                         dataset="d", run_id="old-run")
    job = apply_job_overrides(job, ["model.cnn_width=8", "secu.ks=[3,5]"])
    return job.to_dict() | {"history": list(HISTORY)}


def old_shard(lo: int, hi: int) -> dict[str, Any]:
    """One shard as ``AssignmentMemory.state_dict`` returned it (format 1, with its statistics history)."""
    ids = np.arange(lo, hi)
    return {"format": 1, "lo": lo, "hi": hi, "ks": list(KS), "epoch": 1,
            "prev_HN": np.stack([ids % k for k in KS]).astype(np.int16),
            "counters": [np.arange(k, dtype=np.float64) + lo for k in KS],
            "duals": [np.linspace(-1.0, 1.0, k) * (lo + 1) for k in KS],
            "history": [{"clusters/epoch": 0.0, "clusters/written_frac": 1.0}]}


def write_old_checkpoint(directory: Path) -> dict[str, Any]:
    """The three files of a checkpoint of before (completed epoch 0, global step 3); returns its network."""
    directory.mkdir(parents=True, exist_ok=True)
    job = old_job()
    network = {k: v.detach().clone() for k, v in build_network(TrainJobConfig.from_dict(job).experiment)
               .state_dict().items()}
    torch.save({"network": network, "optimizer": {},
                "cluster_state": {"counters": [torch.arange(k, dtype=torch.float64) for k in KS],
                                  "duals": [torch.full((k,), 0.25, dtype=torch.float64) for k in KS]},
                "epoch": 0, "global_step": 3, "job": job, "format_version": 1}, directory / MODEL_FILE)
    torch.save({"format": 1, "ranges": list(RANGES), "ks": list(KS),
                "shards": [old_shard(lo, hi) for lo, hi in RANGES]}, directory / COORDINATOR_FILE)
    (directory / META_FILE).write_text(json.dumps(
        {"epoch": 0, "global_step": 3, "run_id": "old-run", "format_version": 1}, indent=2))
    return network


def layout(x: Any) -> Any:
    """The structure of a file's content: dict keys, containers, array and tensor dtypes (not values)."""
    if isinstance(x, dict):
        return {k: layout(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return (type(x).__name__, [layout(v) for v in x])
    if isinstance(x, np.ndarray | torch.Tensor):
        return (type(x).__name__, str(x.dtype), x.ndim)
    return type(x).__name__


def raw(directory: Path, name: str) -> Any:
    return torch.load(directory / name, map_location="cpu", weights_only=False)


def assert_old_values(state: TrainingState, coord: CoordinatorState, network: dict[str, Any]) -> None:
    assert (state.epoch, state.global_step, state.optimizer) == (0, 3, {})
    assert state.network.keys() == network.keys() and all(torch.equal(state.network[k], network[k]) for k in network)
    for h, k in enumerate(KS):
        assert torch.equal(state.cluster_state.counters[h], torch.arange(k, dtype=torch.float64))
        assert torch.equal(state.cluster_state.duals[h], torch.full((k,), 0.25, dtype=torch.float64))
    assert state.job["history"] == HISTORY and state.job_config().run_id == "old-run"
    assert (coord.ranges, coord.ks, coord.epoch, coord.num_samples) == (tuple(RANGES), tuple(KS), 1, 7)
    for shard, (lo, hi) in zip(coord.shards, RANGES, strict=True):
        old = old_shard(lo, hi)
        assert (shard.lo, shard.hi, shard.epoch) == (lo, hi, 1) and shard.prev_HN.dtype == np.int16
        assert_same(shard.prev_HN, old["prev_HN"])
        assert_same(shard.counters, old["counters"])
        assert_same(shard.duals, old["duals"])


def test_an_old_checkpoint_loads_with_its_values(tmp_path: Path) -> None:
    network = write_old_checkpoint(tmp_path / "ckpt")
    state, coord = load_training_state(tmp_path / "ckpt"), load_coordinator_state(tmp_path / "ckpt")
    assert_old_values(state, coord, network)
    for shard in coord.shards:  # the memory (what CoordinatorClient.load_state_dict restores on each shard)
        memory = AssignmentMemory(shard.lo, shard.hi, KS, restored=False)
        memory.load_state_dict(shard)
        assert memory.restored and memory.epoch == 1
        assert_same(memory.state_dict(), shard)


def test_an_old_checkpoint_is_found_and_read_on_storage(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    network = write_old_checkpoint(Path(storage.path("runs", "old-run", "checkpoints", "checkpoint_0")))
    ref = find_latest_checkpoint(storage, "old-run")
    assert [c.label for c in list_checkpoints(storage, "old-run")] == [ref.label]
    assert (ref.epoch, ref.global_step, ref.run_id) == (0, 3, "old-run")
    assert checkpoint_at(storage.path(ref.label), storage).epoch == 0
    assert_old_values(*read_checkpoint(ref), network)
    loaded = load_checkpoint(ref)
    assert loaded.epoch == 0 and loaded.history == HISTORY and list(loaded.job.experiment.secu.ks) == KS
    assert torch.equal(loaded.method.state_dict()["network"]["centers.weights.0"], network["centers.weights.0"])


def test_an_old_checkpoint_warm_starts_a_run(tmp_path: Path) -> None:
    network = write_old_checkpoint(tmp_path / "ckpt")
    job = TrainJobConfig.from_dict({k: v for k, v in old_job().items() if k != "history"})
    warm = prepare_warm_start(checkpoint_at(str(tmp_path / "ckpt"), Storage(str(tmp_path))), job, 9, [(0, 4), (4, 9)])
    assert all(torch.equal(warm.network[k], network[k]) for k in network)
    labels = warm.coordinator_state.labels()
    np.testing.assert_array_equal(labels[:, :7], np.stack([np.arange(7) % k for k in KS]))
    assert (labels[:, 7:] == -1).all() and warm.coordinator_state.epoch == 0
    assert warm.summary() | {"source": None} == {"source": None, "source_run_id": "old-run", "source_epoch": 0,
                                                 "previous_num_samples": 7, "num_samples": 9, "new_samples": 2}


def test_new_checkpoints_keep_the_old_layout_and_round_trip(tmp_path: Path) -> None:
    write_old_checkpoint(tmp_path / "old")
    state, coord = load_training_state(tmp_path / "old"), load_coordinator_state(tmp_path / "old")
    save_checkpoint(tmp_path / "new", state, coord)
    for name in (MODEL_FILE, COORDINATOR_FILE):  # what the code of before reads, key by key
        assert layout(raw(tmp_path / "new", name)) == layout(raw(tmp_path / "old", name)) | (
            {"shards": ("list", [layout(old_shard(lo, hi)) | {"history": ("list", [])} for lo, hi in RANGES])}
            if name == COORDINATOR_FILE else {})
    meta = [json.loads((tmp_path / d / META_FILE).read_text()) for d in ("new", "old")]
    files = meta[0].pop("files")  # new: the size and SHA-256 of both files, for verification
    assert meta[0] == meta[1]
    for name in (MODEL_FILE, COORDINATOR_FILE):
        body = (tmp_path / "new" / name).read_bytes()
        assert files[name] == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    again = load_training_state(tmp_path / "new")
    assert_same(again.to_dict(), state.to_dict())
    assert_same(load_coordinator_state(tmp_path / "new"), coord)


def test_a_bad_model_file_is_refused_with_its_path(tmp_path: Path) -> None:
    write_old_checkpoint(tmp_path / "ckpt")
    data = raw(tmp_path / "ckpt", MODEL_FILE)
    without_step = {k: v for k, v in data.items() if k != "global_step"}
    for broken, match in ((data | {"format_version": 2}, "checkpoint format 2 is not 1"),
                          (without_step, r"keys \['global_step'\] are missing"),
                          (data | {"cluster_state": {"counters": []}}, "unreadable training checkpoint")):
        torch.save(broken, tmp_path / "ckpt" / MODEL_FILE)
        with pytest.raises(ValueError, match=f"model.pt: {match}"):
            load_training_state(tmp_path / "ckpt")
    torch.save({"epoch": 3}, tmp_path / "ckpt" / COORDINATOR_FILE)  # the fake state of the old test builders
    with pytest.raises(ValueError, match="coordinator.pt: coordinator state format None is not 1"):
        load_coordinator_state(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a SeCu training checkpoint"):
        load_training_state(tmp_path)


def test_publish_checkpoint_replaces_a_copy_with_metadata_written_last(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    write_old_checkpoint(tmp_path / "ckpt")
    state, coord = load_training_state(tmp_path / "ckpt"), load_coordinator_state(tmp_path / "ckpt")
    rel = join("runs", "old-run", "checkpoint-aligned")
    storage.write_bytes_atomic(join(rel, META_FILE), b"{not json")  # a previous, interrupted copy
    uri = publish_checkpoint(storage, rel, state, coord, {"aligned_to": None, "alignment": [{"head": 0}]})
    ref = checkpoint_at(uri, storage)
    meta = json.loads(storage.read_bytes(join(rel, META_FILE)))
    assert set(meta.pop("files")) == {MODEL_FILE, COORDINATOR_FILE}
    assert meta == {"epoch": 0, "global_step": 3, "run_id": "old-run", "format_version": 1, "aligned_to": None,
                    "alignment": [{"head": 0}]}
    again, coord_again = read_checkpoint(ref)
    assert_same(again.to_dict(), state.to_dict())
    assert_same(coord_again, coord)
