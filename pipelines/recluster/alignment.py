"""Stable cluster ids across reclustering runs: center or label matching, a relabelled checkpoint, drift figures.

A new run's cluster k is not the previous run's cluster k by construction (a warm start keeps them
close, a fresh start does not). Per head, the new clusters are matched one-to-one to the previous
run's by the Hungarian algorithm: on the cosine similarity of their centers where the method has centers
(SeCu, ProPos: ``match_centers``), else on the overlap of the two runs' stored labels over the images
both labelled (DRC, PFCA: ``match_labels``). The match is applied once, to a copy of the new run's final
checkpoint (``aligned_checkpoint``; the reclustering tick writes it with
``pipelines.training.checkpointing.publish_checkpoint``): every per-cluster entry of the method's networks
(``ClusteringMethod.cluster_axes``: center columns, classifier rows), per-cluster duals and counters and
the assignment memory are permuted, so that everything read from
that copy (inference, the next tick's warm start) uses the stable ids. The Ray Train checkpoints of the
run are left untouched.

``drift_summary`` compares two runs' labels over the images both runs labelled.

Legend: D = feature dim, K = clusters of a head, H = heads, N = images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipelines.training.checkpointing import TrainingState
from pipelines.training.coordinator_state import CoordinatorState, ShardState
from secu.method import ClusteringMethod
from secu.state import ClusterState

DRIFT_FILE = "drift.json"
"""``runs/<run_id>/drift.json``: the drift of a reclustering tick vs the previous one (read by the report)."""



@dataclass
class HeadAlignment:
    """The match of one head: new cluster j of the run gets the stable id ``mapping[j]``."""

    head: int
    k: int
    mapping: list[int]
    mean_similarity: float
    """Mean cosine similarity of the matched center pairs."""
    min_similarity: float
    identity_frac: float
    """Fraction of clusters that keep their id (close to 1 after a warm start)."""


def match_centers(prev_DK: np.ndarray, new_DK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of new to previous centers on cosine similarity.

    Returns:
        ``mapping_K`` (new cluster j -> previous id) and the similarity of every matched pair.

    Raises:
        ValueError: Different shapes (the runs have different K or feature dimension).
    """
    if prev_DK.shape != new_DK.shape:
        raise ValueError(f"centers of shape {new_DK.shape} cannot be matched to {prev_DK.shape}: the runs must "
                         "have the same secu.ks and model.feat_dim (start a new series otherwise)")
    prev = prev_DK / np.maximum(np.linalg.norm(prev_DK, axis=0, keepdims=True), 1e-12)
    new = new_DK / np.maximum(np.linalg.norm(new_DK, axis=0, keepdims=True), 1e-12)
    sim_KK = new.T.astype(np.float64) @ prev.astype(np.float64)  # rows: new clusters, columns: previous ids
    rows, cols = linear_sum_assignment(sim_KK, maximize=True)
    mapping_K = np.empty(new_DK.shape[1], dtype=np.int64)
    mapping_K[rows] = cols
    return mapping_K, sim_KK[rows, cols]


def match_labels(prev_N: np.ndarray, new_N: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of new to previous clusters on the images both runs labelled (ids ``[0, min(N))``,
    label >= 0 in both): the match that keeps the most images in a cluster of the same id.

    Returns:
        ``mapping_K`` (new cluster j -> previous id) and, per new cluster, the share of its shared images
        that the matched previous cluster holds (1 where it has none).
    """
    n = min(prev_N.size, new_N.size)
    prev, new = prev_N[:n].astype(np.int64), new_N[:n].astype(np.int64)
    both = (prev >= 0) & (new >= 0)
    overlap_KK = np.zeros((k, k), dtype=np.float64)  # rows: new clusters, columns: previous ids
    np.add.at(overlap_KK, (new[both], prev[both]), 1.0)
    rows, cols = linear_sum_assignment(overlap_KK, maximize=True)
    mapping_K = np.empty(k, dtype=np.int64)
    mapping_K[rows] = cols
    sizes = overlap_KK.sum(axis=1)
    kept = np.where(sizes > 0, overlap_KK[np.arange(k), mapping_K] / np.maximum(sizes, 1.0), 1.0)
    return mapping_K, kept


RunState = tuple[TrainingState, CoordinatorState]
"""A run's final training state and its coordinator state (what the matching reads)."""


def align_heads(method: ClusteringMethod, prev: RunState | None, new: RunState, ks: list[int]) -> list[HeadAlignment]:
    """The match of every head of ``method`` (identity when there is no previous run)."""
    out = []
    new_labels_HN = new[1].labels()
    prev_labels_HN = None if prev is None else prev[1].labels()
    for h, k in enumerate(ks):
        key = method.center_key(h)
        if prev is None or prev_labels_HN is None:
            mapping, sims = np.arange(k), np.ones(k)
        elif key is not None:
            mapping, sims = match_centers(prev[0].network[key].detach().cpu().numpy(),
                                          new[0].network[key].detach().cpu().numpy())
        else:
            mapping, sims = match_labels(prev_labels_HN[h], new_labels_HN[h], k)
        out.append(HeadAlignment(h, k, [int(x) for x in mapping], float(sims.mean()), float(sims.min()),
                                 float(np.mean(mapping == np.arange(k)))))
    return out


def relabel(labels_N: np.ndarray, mapping_K: np.ndarray) -> np.ndarray:
    """Labels with ids replaced by ``mapping_K[label]``; -1 (no label) stays -1."""
    out = labels_N.copy()
    known = labels_N >= 0
    out[known] = mapping_K[labels_N[known].astype(np.int64)].astype(labels_N.dtype)
    return out


def permute_clusters(values_K: torch.Tensor | np.ndarray, mapping_K: np.ndarray, axis: int = -1) -> Any:
    """Per-cluster values (along ``axis``: the last axis of a D x K matrix, the first of a K x F classifier
    weight) moved so that entry j lands at ``mapping_K[j]``."""
    inverse = np.argsort(mapping_K)  # position p holds the cluster j with mapping[j] == p
    if isinstance(values_K, torch.Tensor):
        return values_K.index_select(axis, torch.from_numpy(inverse).to(values_K.device)).clone()
    return np.take(np.asarray(values_K), inverse, axis=axis)


def aligned_checkpoint(state: TrainingState, coordinator: CoordinatorState, alignments: list[HeadAlignment],
                       method: ClusteringMethod) -> tuple[TrainingState, CoordinatorState]:
    """The training and coordinator states with every per-cluster quantity in stable ids (new values).

    The optimizer state is dropped: the copy serves inference and warm starts (which start a fresh
    optimizer), not the resumption of the run.
    """
    maps = [np.asarray(a.mapping, dtype=np.int64) for a in alignments]
    network = dict(state.network)
    for h, mapping in enumerate(maps):
        for key, axis in method.cluster_axes(h).items():
            network[key] = permute_clusters(network[key], mapping, axis)
    cluster, cluster_state = state.cluster_state, None
    if cluster is not None:
        cluster_state = ClusterState(counters=[permute_clusters(c, maps[h]) for h, c in enumerate(cluster.counters)],
                                     duals=[permute_clusters(d, maps[h]) for h, d in enumerate(cluster.duals)])
    new_state = dataclasses.replace(state, network=network, optimizer={}, cluster_state=cluster_state)
    shards = tuple(_aligned_shard(shard, maps) for shard in coordinator.shards)
    return new_state, dataclasses.replace(coordinator, shards=shards)


def _aligned_shard(shard: ShardState, maps: list[np.ndarray]) -> ShardState:
    def permuted(values: list[np.ndarray] | None) -> list[np.ndarray] | None:
        return None if values is None else [permute_clusters(v, maps[h]) for h, v in enumerate(values)]

    prev_HN = np.stack([relabel(shard.prev_HN[h], maps[h]) for h in range(len(maps))])
    return dataclasses.replace(shard, prev_HN=prev_HN, counters=permuted(shard.counters), duals=permuted(shard.duals))


# --------------------------------------------------------------------------------------------------
# Drift between two runs
# --------------------------------------------------------------------------------------------------


@dataclass
class RunLabels:
    """Labels of one run: ``labels_HN[h, i]`` is image ``ids_N[i]``'s cluster in head h (-1: none)."""

    ids_N: np.ndarray
    labels_HN: np.ndarray
    source: str
    """Where they come from: ``assignments`` (published inference) or ``training_memory``."""


def drift_summary(prev: RunLabels, new: RunLabels, ks: list[int], alignments: list[HeadAlignment] | None = None,
                  top: int = 10) -> dict[str, Any]:
    """How the clustering moved from ``prev`` to ``new`` (both in stable ids).

    Per head: ``changed_frac`` over the images labelled in both runs, cluster sizes before and now,
    ``appeared`` (empty before, not now) and ``vanished`` (not empty before, empty now) clusters,
    ``size_tv`` (total variation distance of the size distributions, 0 = same shares, 1 = disjoint)
    and the ``top`` largest size changes. Also image counts (common, only new, only previous).
    """
    common, prev_pos, new_pos = np.intersect1d(prev.ids_N, new.ids_N, assume_unique=True, return_indices=True)
    heads = []
    for h, k in enumerate(ks):
        before_N, now_N = prev.labels_HN[h].astype(np.int64), new.labels_HN[h].astype(np.int64)
        both = (before_N[prev_pos] >= 0) & (now_N[new_pos] >= 0)
        changed = int(np.count_nonzero(before_N[prev_pos][both] != now_N[new_pos][both]))
        sizes_before = np.bincount(before_N[before_N >= 0], minlength=k)[:k]
        sizes_now = np.bincount(now_N[now_N >= 0], minlength=k)[:k]
        share_before = sizes_before / max(int(sizes_before.sum()), 1)
        share_now = sizes_now / max(int(sizes_now.sum()), 1)
        delta = sizes_now - sizes_before
        order = np.argsort(-np.abs(share_now - share_before), kind="stable")[:top]
        row: dict[str, Any] = {
            "head": h, "k": k, "compared": int(both.sum()), "changed": changed,
            "changed_frac": changed / int(both.sum()) if both.any() else None,
            "appeared": [int(c) for c in np.flatnonzero((sizes_before == 0) & (sizes_now > 0))],
            "vanished": [int(c) for c in np.flatnonzero((sizes_before > 0) & (sizes_now == 0))],
            "empty_before": int(np.count_nonzero(sizes_before == 0)),
            "empty_now": int(np.count_nonzero(sizes_now == 0)),
            "size_tv": float(0.5 * np.abs(share_now - share_before).sum()),
            "largest_changes": [{"cluster": int(c), "before": int(sizes_before[c]), "now": int(sizes_now[c]),
                                 "delta": int(delta[c]), "share_before": float(share_before[c]),
                                 "share_now": float(share_now[c])} for c in order],
            "sizes_before": [int(x) for x in sizes_before],
            "sizes_now": [int(x) for x in sizes_now],
        }
        if alignments is not None:
            a = alignments[h]
            row["match"] = {"mean_similarity": a.mean_similarity, "min_similarity": a.min_similarity,
                            "identity_frac": a.identity_frac}
        heads.append(row)
    return {
        "source": new.source if new.source == prev.source else f"{prev.source}->{new.source}",
        "images": {"previous": int(prev.ids_N.size), "current": int(new.ids_N.size), "common": int(common.size),
                   "only_current": int(new.ids_N.size - common.size),
                   "only_previous": int(prev.ids_N.size - common.size)},
        "heads": heads,
    }


def drift_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat, namespaced figures of a drift summary for metrics files: ``drift/h{h}/...``, ``drift/images_*``."""
    out: dict[str, float] = {f"drift/images_{k}": float(v) for k, v in summary.get("images", {}).items()}
    for row in summary.get("heads", []):
        prefix = f"drift/h{row['head']}/"
        if row.get("changed_frac") is not None:
            out[prefix + "changed_frac"] = float(row["changed_frac"])
        out[prefix + "appeared"] = float(len(row["appeared"]))
        out[prefix + "vanished"] = float(len(row["vanished"]))
        out[prefix + "size_tv"] = float(row["size_tv"])
        if "match" in row:
            out[prefix + "match_similarity"] = float(row["match"]["mean_similarity"])
            out[prefix + "match_identity_frac"] = float(row["match"]["identity_frac"])
    return out


def alignment_record(alignments: list[HeadAlignment]) -> list[dict[str, Any]]:
    """JSON form of the matches (for the aligned checkpoint's metadata and drift.json)."""
    return [asdict(a) for a in alignments]
