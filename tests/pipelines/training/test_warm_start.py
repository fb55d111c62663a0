"""Warm start from a previous checkpoint: network, duals, seeded memory for old ids, -1 for new ids (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.storage import Storage
from pipelines.training.checkpointing import TrainingState, checkpoint_at, save_checkpoint
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.id_ranges import shard_ranges
from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
from pipelines.training.memory import AssignmentMemory
from pipelines.training.warm_start import prepare_warm_start
from secu.network import build_network
from secu.recipes import recipe
from secu.state import ClusterState
from tests.pipelines.training.memory_builders import close_epoch

KS = [3, 6]


def job(*overrides: str) -> TrainJobConfig:
    base = TrainJobConfig(experiment=recipe("fashion-mnist-cpu"), compute=ComputeConfig(num_workers=2),
                          dataset="d", run_id="prev")
    return apply_job_overrides(base, ["optim.batch_size=32", "model.cnn_width=8", "secu.ks=[3,6]", *overrides])


def previous_checkpoint(directory: Path, n_old: int, constraint: str = "size") -> tuple[dict[str, torch.Tensor],
                                                                                         np.ndarray, ClusterState]:
    prev_job = job(f"secu.constraint={constraint}", "seed=7")
    net = build_network(prev_job.experiment)
    with torch.no_grad():
        net.centers.weights[0].add_(1.0)  # differs from a fresh network of any seed
    rng = np.random.default_rng(0)
    labels_HN = np.stack([rng.integers(0, k, n_old) for k in KS]).astype(np.int16)
    state = ClusterState([torch.full((k,), 2.0, dtype=torch.float64) for k in KS],
                         [torch.linspace(0, 1, k, dtype=torch.float64) for k in KS])
    shards = []
    for lo, hi in shard_ranges(n_old, 2):  # the previous run had 2 coordinator shards
        memory = AssignmentMemory(lo, hi, KS)
        memory.write(np.arange(lo, hi), labels_HN[:, lo:hi], epoch=0)
        close_epoch(memory)
        shards.append(memory.state_dict())
    coordinator = CoordinatorState(ranges=tuple(shard_ranges(n_old, 2)), ks=tuple(KS), shards=tuple(shards))
    network = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_checkpoint(directory, TrainingState(network=network, optimizer={}, cluster_state=state, epoch=4,
                                             global_step=40, job=prev_job.to_dict() | {"history": []}), coordinator)
    return network, labels_HN, state


@pytest.mark.parametrize("constraint", ["size", "entropy"])
def test_warm_start_seeds_old_ids_and_leaves_new_ids_unlabelled(tmp_path: Path, constraint: str) -> None:
    network, labels_HN, state = previous_checkpoint(tmp_path / "ckpt", 50, constraint)
    ref = checkpoint_at(str(tmp_path / "ckpt"), Storage(str(tmp_path)))
    new_job = job(f"secu.constraint={constraint}")  # another seed: the weights must come from the checkpoint
    warm = prepare_warm_start(ref, new_job, 70, shard_ranges(70, 3))
    assert all(torch.equal(warm.network[k], network[k]) for k in network)
    assert not torch.equal(build_network(new_job.experiment).state_dict()["centers.weights.0"],
                           network["centers.weights.0"])
    memory = warm.coordinator_state.labels()
    assert memory.shape == (2, 70)
    assert (memory[:, :50] == labels_HN).all() and (memory[:, 50:] == -1).all()
    assert [s.epoch for s in warm.coordinator_state.shards] == [0, 0, 0]
    assert warm.coordinator_state.ranges == tuple(shard_ranges(70, 3))
    assert all(s.prev_HN.dtype == np.int16 and s.counters is None and s.duals is None
               for s in warm.coordinator_state.shards)
    for h, k in enumerate(KS):
        assert torch.equal(warm.cluster_state.duals[h], state.duals[h])
        expected = np.bincount(labels_HN[h], minlength=k) if constraint == "entropy" else np.zeros(k)
        assert warm.cluster_state.counters[h].tolist() == expected.astype(float).tolist()
    # The seeded state loads into a coordinator of the new run's layout.
    for (lo, hi), shard in zip(shard_ranges(70, 3), warm.coordinator_state.shards, strict=True):
        AssignmentMemory(lo, hi, KS).load_state_dict(shard)
    assert warm.summary()["new_samples"] == 20 and warm.summary()["source_epoch"] == 4


def test_warm_start_refuses_incompatible_runs(tmp_path: Path) -> None:
    previous_checkpoint(tmp_path / "ckpt", 50)
    ref = checkpoint_at(str(tmp_path / "ckpt"), Storage(str(tmp_path)))
    with pytest.raises(ValueError, match="ks=\\[3, 6\\], this run ks=\\[3, 5\\]"):
        prepare_warm_start(ref, job("secu.ks=[3,5]"), 70, shard_ranges(70, 1))
    with pytest.raises(ValueError, match="does not fit this run's model config"):
        prepare_warm_start(ref, job("model.cnn_width=16"), 70, shard_ranges(70, 1))
    with pytest.raises(ValueError, match="the dataset now has 40"):
        prepare_warm_start(ref, job(), 40, shard_ranges(40, 1))
