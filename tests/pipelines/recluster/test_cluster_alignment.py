"""Stable cluster ids: Hungarian center matching, the relabelled checkpoint payload, drift figures (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.recluster.alignment import (
    RunLabels,
    align_heads,
    aligned_checkpoint,
    drift_metrics,
    drift_summary,
    match_centers,
    match_labels,
    permute_clusters,
    relabel,
)
from pipelines.training.checkpointing import TrainingState
from pipelines.training.coordinator_state import CoordinatorState, ShardState
from secu.config import ExperimentConfig
from secu.methods import build_method
from secu.secu_method import CENTER_KEY
from secu.state import ClusterState


def _small(method: str, ks: list[int]) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "method": method, "secu": {"ks": ks},
        "model": {"backbone": "small_cnn", "in_channels": 1, "cnn_width": 8, "feat_dim": 5},
        "augment": {"channels": 1, "mean": [0.5], "std": [0.25], "image_size": 28}})


def test_match_recovers_a_permutation_under_noise() -> None:
    rng = np.random.default_rng(0)
    prev_DK = rng.normal(size=(16, 12))
    perm = rng.permutation(12)  # new cluster j is previous cluster perm[j]
    new_DK = prev_DK[:, perm] * rng.uniform(0.5, 2.0, size=12) + 0.05 * rng.normal(size=(16, 12))
    mapping, sims = match_centers(prev_DK, new_DK)
    assert mapping.tolist() == perm.tolist()
    assert sims.min() > 0.95
    with pytest.raises(ValueError, match="same secu.ks"):
        match_centers(prev_DK, new_DK[:, :10])


def test_permuted_centers_assign_the_mapped_ids() -> None:
    """Argmax over the permuted centers == mapping[argmax over the original centers], for every image."""
    rng = np.random.default_rng(1)
    w_DK = torch.from_numpy(rng.normal(size=(8, 6)))
    z_ND = torch.from_numpy(rng.normal(size=(50, 8)))
    mapping = rng.permutation(6)
    before = (z_ND @ w_DK).argmax(dim=1).numpy()
    after = (z_ND @ permute_clusters(w_DK, mapping)).argmax(dim=1).numpy()
    assert after.tolist() == mapping[before].tolist()
    labels = np.array([0, 5, -1, 2], dtype=np.int16)
    assert relabel(labels, mapping).tolist() == [mapping[0], mapping[5], -1, mapping[2]]
    assert relabel(labels, mapping).dtype == np.int16


def test_aligned_checkpoint_permutes_centers_duals_and_memory_consistently() -> None:
    rng = np.random.default_rng(2)
    ks = [3, 4]
    prev = {CENTER_KEY.format(head=h): torch.from_numpy(rng.normal(size=(5, k))) for h, k in enumerate(ks)}
    perms = [rng.permutation(k) for k in ks]
    new_net = {CENTER_KEY.format(head=h): prev[CENTER_KEY.format(head=h)][:, torch.from_numpy(perms[h])].clone()
               for h in range(2)} | {"encoder.w": torch.ones(2)}
    duals = [torch.arange(k, dtype=torch.float64) for k in ks]
    state = TrainingState(network=new_net, optimizer={"state": 1}, cluster_state=ClusterState(duals, duals), epoch=3,
                          global_step=30, job={"run_id": "r"})
    labels_HN = np.array([[0, 1, 2, -1], [3, 0, 1, 2]], dtype=np.int16)
    shard = ShardState(lo=0, hi=4, ks=tuple(ks), epoch=4, prev_HN=labels_HN, counters=[d.numpy() for d in duals])
    coord = CoordinatorState(ranges=((0, 4),), ks=tuple(ks), shards=(shard,))
    method = build_method(_small("secu", ks), 1)
    prev_state = TrainingState(network=prev, optimizer={}, cluster_state=None, epoch=3, global_step=30, job={})
    alignments = align_heads(method, (prev_state, coord), (state, coord), ks)
    assert [a.mapping for a in alignments] == [p.tolist() for p in perms]
    new_state, new_coord = aligned_checkpoint(state, coord, alignments, method)
    new_shard = new_coord.shards[0]
    for h in range(2):
        # the aligned centers equal the previous run's, and the memory/duals/counters moved with them
        assert torch.allclose(new_state.network[CENTER_KEY.format(head=h)], prev[CENTER_KEY.format(head=h)])
        assert new_shard.prev_HN[h].tolist() == relabel(labels_HN[h], perms[h]).tolist()
        assert new_state.cluster_state is not None
        for moved in (new_state.cluster_state.duals[h], new_state.cluster_state.counters[h]):
            assert all(moved[perms[h][j]] == duals[h][j] for j in range(ks[h]))
        assert new_shard.counters is not None
        assert all(new_shard.counters[h][perms[h][j]] == duals[h][j] for j in range(ks[h]))
    assert new_shard.duals is None and new_shard.prev_HN.dtype == np.int16 and new_shard.epoch == 4
    assert new_state.optimizer == {}
    assert (new_state.epoch, new_state.global_step, new_state.job) == (3, 30, {"run_id": "r"})
    assert new_state.network["encoder.w"] is new_net["encoder.w"]
    assert coord.shards[0].prev_HN is labels_HN and state.optimizer == {"state": 1}  # the inputs are not modified


def test_drift_summary_by_hand() -> None:
    prev = RunLabels(np.array([0, 1, 2, 3]), np.array([[0, 0, 1, 1]]), "assignments")
    new = RunLabels(np.array([0, 1, 2, 3, 4, 5]), np.array([[0, 2, 1, 1, 2, 2]]), "assignments")
    summary = drift_summary(prev, new, [4])
    row = summary["heads"][0]
    assert summary["images"] == {"previous": 4, "current": 6, "common": 4, "only_current": 2, "only_previous": 0}
    assert (row["compared"], row["changed"], row["changed_frac"]) == (4, 1, 0.25)
    assert row["appeared"] == [2] and row["vanished"] == [] and row["empty_now"] == 1
    assert row["sizes_before"] == [2, 2, 0, 0] and row["sizes_now"] == [1, 2, 3, 0]
    # shares before 0.5 0.5 0 0, now 1/6 1/3 1/2 0: TV = (1/3 + 1/6 + 1/2) / 2
    assert row["size_tv"] == pytest.approx(0.5)
    assert row["largest_changes"][0]["cluster"] == 2
    flat = drift_metrics(summary)
    assert flat["drift/h0/changed_frac"] == 0.25 and flat["drift/h0/appeared"] == 1.0
    assert flat["drift/images_common"] == 4.0


def test_label_overlap_matching_recovers_a_relabelling_with_noise_and_new_ids() -> None:
    rng = np.random.default_rng(4)
    k = 6
    prev_N = rng.integers(0, k, size=500)
    perm = rng.permutation(k)  # new cluster j is previous cluster perm[j]
    inverse = np.argsort(perm)
    new_N = np.concatenate([inverse[prev_N], rng.integers(0, k, size=50)])  # 50 images the previous run never saw
    noisy = rng.random(500) < 0.1
    new_N[:500][noisy] = rng.integers(0, k, size=int(noisy.sum()))
    prev_N[:5] = -1
    mapping, kept = match_labels(prev_N, new_N, k)
    assert mapping.tolist() == perm.tolist()
    assert bool((kept > 0.8).all() and (kept <= 1).all())


def test_a_method_without_centers_aligns_by_labels_and_permutes_its_per_cluster_rows() -> None:
    ks = [3]
    exp = _small("drc", ks)
    method = build_method(exp, 1)
    network = method.state_dict()["network"]
    axes = method.cluster_axes(0)
    assert method.center_key(0) is None and axes
    prev_HN = np.array([[0, 0, 1, 1, 2, 2]], dtype=np.int16)
    new_HN = np.array([[2, 2, 0, 0, 1, 1]], dtype=np.int16)  # new 2 = old 0, new 0 = old 1, new 1 = old 2

    def run(labels_HN: np.ndarray) -> tuple[TrainingState, CoordinatorState]:
        shard = ShardState(lo=0, hi=6, ks=tuple(ks), epoch=2, prev_HN=labels_HN)
        return (TrainingState(network=network, optimizer={}, cluster_state=None, epoch=1, global_step=2, job={}),
                CoordinatorState(ranges=((0, 6),), ks=tuple(ks), shards=(shard,)))

    alignments = align_heads(method, run(prev_HN), run(new_HN), ks)
    assert alignments[0].mapping == [1, 2, 0] and alignments[0].mean_similarity == 1.0
    state, coord = aligned_checkpoint(*run(new_HN), alignments, method)
    assert state.cluster_state is None
    assert coord.shards[0].prev_HN.tolist() == prev_HN.tolist()
    for key, axis in axes.items():  # row j of the new run's head now sits at its stable id mapping[j]
        for j, stable in enumerate(alignments[0].mapping):
            assert torch.equal(state.network[key].select(axis, stable), network[key].select(axis, j))
