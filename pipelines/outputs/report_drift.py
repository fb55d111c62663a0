"""What moved between two reclustering ticks: the flows of images from cluster a to cluster b.

``drift.json`` (``pipelines.recluster.tick``) holds per head the share of images that changed cluster,
the appeared and vanished clusters and the largest size changes, but not who went where. The drift
page needs that, so ``drift_flows`` recomputes it from the same labels the tick compared: the
published assignments of both runs (``drift.json``'s ``source`` is ``assignments``) or the training
memories of their aligned checkpoints (``training_memory``). Cluster ids are stable across ticks (the
tick aligned them), so "a -> b" means an image was in cluster a at the previous tick and is in b now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.outputs.assignments import DEFAULT_NAME, read_assignments
from pipelines.outputs.schema import cluster_column
from pipelines.storage import Storage, join
from pipelines.training.checkpointing import checkpoint_at, read_checkpoint

ALIGNED_DIR = "checkpoint-aligned"
"""Where a tick writes its aligned checkpoint (``pipelines.recluster.tick.ALIGNED_DIR``)."""


@dataclass
class Flow:
    """Images that were in cluster ``source`` at the previous tick and are in ``target`` now."""

    source: int
    target: int
    count: int
    share_of_source: float
    """``count`` over the images of ``source`` at the previous tick that are in both ticks."""
    share_of_compared: float
    """``count`` over all images in both ticks."""


@dataclass
class DriftFlows:
    """The flows of one head between the previous tick and this run, or why they are unknown."""

    head: int
    k: int
    previous_run_id: str
    source: str
    """The labels compared: ``assignments`` or ``training_memory``."""
    compared: int = 0
    """Images labelled in both ticks."""
    stayed: int = 0
    flows: list[Flow] = field(default_factory=list)
    """The largest flows between different clusters, largest first."""
    matrix_KK: np.ndarray | None = None
    """Images per (previous cluster, current cluster)."""
    note: str = ""
    """Why there are no flows (empty when there are)."""


def _assignment_labels(storage: Storage, run_id: str, head: int) -> tuple[np.ndarray, np.ndarray]:
    table = read_assignments(storage, run_id, DEFAULT_NAME, columns=["sample_index", cluster_column(head)])
    return (table["sample_index"].to_numpy().astype(np.int64),
            table[cluster_column(head)].to_numpy().astype(np.int64))


def _memory_labels(storage: Storage, run_id: str, head: int) -> tuple[np.ndarray, np.ndarray]:
    _, coordinator = read_checkpoint(checkpoint_at(storage.uri(join("runs", run_id, ALIGNED_DIR)), storage))
    labels_HN = coordinator.labels()
    return np.arange(labels_HN.shape[1], dtype=np.int64), labels_HN[head].astype(np.int64)


def flow_matrix(prev_ids: np.ndarray, prev_labels: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                k: int) -> np.ndarray:
    """K x K counts of the images in both ticks: row = previous cluster, column = current cluster."""
    _, i, j = np.intersect1d(prev_ids, ids, assume_unique=True, return_indices=True)
    before, now = prev_labels[i], labels[j]
    both = (before >= 0) & (before < k) & (now >= 0) & (now < k)
    return np.bincount(before[both] * k + now[both], minlength=k * k).reshape(k, k)


def largest_flows(matrix_KK: np.ndarray, top: int) -> list[Flow]:
    """The ``top`` largest off-diagonal entries of a flow matrix, largest first (ties: lower ids first)."""
    k = matrix_KK.shape[0]
    off = matrix_KK.copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    flat = flat[np.lexsort((flat, -off.reshape(-1)[flat]))][:top]
    rows, total = matrix_KK.sum(axis=1), max(int(matrix_KK.sum()), 1)
    return [Flow(int(f // k), int(f % k), int(off.flat[f]), int(off.flat[f]) / max(int(rows[f // k]), 1),
                 int(off.flat[f]) / total) for f in flat]


def drift_flows(storage: Storage, run_id: str, drift: dict[str, Any], head: int, top: int = 25) -> DriftFlows | None:
    """The flows of ``head`` between ``drift.json``'s previous run and ``run_id``; None for a first tick."""
    previous = drift.get("previous_run_id")
    if not previous:
        return None
    row = next((r for r in drift.get("heads", []) if int(r.get("head", -1)) == head), None)
    source = str(drift.get("source", "assignments"))
    if row is None:
        return DriftFlows(head, 0, str(previous), source, note=f"drift.json has no head {head}")
    k = int(row["k"])
    out = DriftFlows(head, k, str(previous), source)
    read = _memory_labels if source == "training_memory" else _assignment_labels
    try:
        prev_ids, prev_labels = read(storage, str(previous), head)
        ids, labels = read(storage, run_id, head)
    except (FileNotFoundError, ValueError, KeyError) as err:
        what = "aligned checkpoints" if source == "training_memory" else "published assignments"
        out.note = f"the {what} of both ticks are needed to see who moved where: {err}"
        return out
    out.matrix_KK = flow_matrix(prev_ids, prev_labels, ids, labels, k)
    out.compared, out.stayed = int(out.matrix_KK.sum()), int(np.trace(out.matrix_KK))
    out.flows = largest_flows(out.matrix_KK, top)
    if not out.compared:
        out.note = "no image is labelled in both ticks"
    return out
