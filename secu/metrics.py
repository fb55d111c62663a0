"""Clustering metrics from the contingency table: ACC (Hungarian), NMI (arithmetic), ARI (spec 7).

Everything is computed from one contingency table ``table_CK`` (rows: ground-truth classes, columns:
predicted clusters). Sharded evaluation builds one table per shard with a common shape, adds them and
calls :func:`metrics_from_contingency` once; the result equals the metrics of the concatenated labels.

Legend: N = labelled samples, C = classes (rows), K = clusters (columns).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "ari",
    "contingency",
    "evaluate_clustering",
    "hungarian_acc",
    "metrics_from_contingency",
    "nmi",
    "size_stats",
    "sum_contingency",
]


def _as_labels(name: str, labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer labels, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def contingency(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> np.ndarray:
    """Count table ``table_CK[c, k]`` = number of samples of class c put into cluster k.

    Rows and columns are indexed by the label values themselves (not by their rank among the values
    present), so tables of different shards line up when they are built with the same
    ``num_classes``/``num_clusters``; :func:`sum_contingency` pads them otherwise.

    Args:
        y_true: Ground-truth classes, shape (N,). Entries < 0 (unlabelled) are ignored.
        y_pred: Predicted clusters, shape (N,), values >= 0.
        num_classes: Rows of the table; defaults to ``max(y_true) + 1``.
        num_clusters: Columns of the table; defaults to ``max(y_pred) + 1``.

    Returns:
        An int64 array of shape (num_classes, num_clusters).

    Raises:
        ValueError: On mismatched lengths, negative predictions or labels beyond the given sizes.
    """
    true_N = _as_labels("y_true", y_true)
    pred_N = _as_labels("y_pred", y_pred)
    if true_N.shape != pred_N.shape:
        raise ValueError(f"y_true has {true_N.size} entries but y_pred has {pred_N.size}; they must match")
    keep = true_N >= 0
    true_N, pred_N = true_N[keep], pred_N[keep]
    if pred_N.size and pred_N.min() < 0:
        raise ValueError("y_pred holds negative cluster ids; every labelled sample needs a cluster >= 0")
    rows = int(true_N.max()) + 1 if true_N.size else 0
    cols = int(pred_N.max()) + 1 if pred_N.size else 0
    if num_classes is not None:
        if num_classes < rows:
            raise ValueError(f"y_true holds class {rows - 1} but num_classes={num_classes}")
        rows = num_classes
    if num_clusters is not None:
        if num_clusters < cols:
            raise ValueError(f"y_pred holds cluster {cols - 1} but num_clusters={num_clusters}")
        cols = num_clusters
    # One bincount over the flattened (row, col) index is much faster than np.add.at.
    flat = np.bincount(true_N * cols + pred_N, minlength=rows * cols) if rows * cols else np.zeros(0)
    return flat.astype(np.int64).reshape(rows, cols)


def sum_contingency(tables: Iterable[np.ndarray]) -> np.ndarray:
    """Add contingency tables of several shards, zero-padding them to a common shape.

    Args:
        tables: Tables from :func:`contingency` (any shapes).

    Returns:
        The elementwise sum, int64, shape (max rows, max columns); (0, 0) for no tables.
    """
    tables = [np.asarray(t, dtype=np.int64) for t in tables]
    rows = max((t.shape[0] for t in tables), default=0)
    cols = max((t.shape[1] for t in tables), default=0)
    total_CK = np.zeros((rows, cols), dtype=np.int64)
    for table in tables:
        if table.ndim != 2:
            raise ValueError(f"a contingency table must be 2-D, got shape {table.shape}")
        total_CK[: table.shape[0], : table.shape[1]] += table
    return total_CK


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative counts."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _acc_from_table(table_CK: np.ndarray) -> float:
    n = table_CK.sum()
    if n == 0:
        return 0.0
    # Rectangular tables are fine: with K > C only C clusters get a class, the rest count as errors.
    rows, cols = linear_sum_assignment(table_CK, maximize=True)
    return float(table_CK[rows, cols].sum() / n)


def _nmi_from_table(table_CK: np.ndarray) -> float:
    table = table_CK[table_CK.sum(axis=1) > 0][:, table_CK.sum(axis=0) > 0].astype(np.float64)
    classes, clusters = table.shape
    # Two identical trivial partitions (one group each, or nothing at all) agree perfectly.
    if classes == clusters and classes <= 1:
        return 1.0
    n = table.sum()
    a_C, b_K = table.sum(axis=1), table.sum(axis=0)
    nz = table > 0
    # MI = sum_ck p_ck log(p_ck / (p_c p_k)) with p = counts / n.
    outer = np.outer(a_C, b_K)[nz]
    mi = float((table[nz] / n * np.log(table[nz] * n / outer)).sum())
    if mi <= 0.0:
        return 0.0
    normaliser = (_entropy(a_C) + _entropy(b_K)) / 2.0
    return float(min(1.0, mi / max(normaliser, np.finfo(np.float64).eps)))


def _ari_from_table(table_CK: np.ndarray) -> float:
    # Pair counting: every unordered pair of samples is either together in both partitions (tp),
    # together only in the prediction (fp), only in the truth (fn), or apart in both (tn). Counts are
    # ordered pairs (2x) which cancels in the ratio. float64 avoids int64 overflow of products at
    # ImageNet scale (n^4 ~ 1e24).
    table = table_CK.astype(np.float64)
    n = table.sum()
    sum_sq = (table**2).sum()
    tp = sum_sq - n
    fp = (table.sum(axis=0) ** 2).sum() - sum_sq
    fn = (table.sum(axis=1) ** 2).sum() - sum_sq
    tn = n**2 - tp - fp - fn - n
    if fp == 0 and fn == 0:
        # Identical partitions (including the degenerate all-singletons / one-group cases).
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def metrics_from_contingency(table: np.ndarray) -> dict[str, float]:
    """ACC, NMI and ARI of the clustering summarised by ``table`` (classes x clusters).

    Args:
        table: Non-negative counts, e.g. the sum of per-shard :func:`contingency` tables.

    Returns:
        ``{"acc": ..., "nmi": ..., "ari": ...}``.

    Raises:
        ValueError: If the table is not 2-D, has negative entries or counts no sample.
    """
    table_CK = np.asarray(table)
    if table_CK.ndim != 2:
        raise ValueError(f"contingency table must be 2-D, got shape {table_CK.shape}")
    if (table_CK < 0).any():
        raise ValueError("contingency table has negative counts")
    if table_CK.sum() == 0:
        raise ValueError("contingency table counts no sample (no labelled sample): nothing to evaluate")
    return {"acc": _acc_from_table(table_CK), "nmi": _nmi_from_table(table_CK), "ari": _ari_from_table(table_CK)}


def _labelled_table(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    table_CK = contingency(y_true, y_pred)
    if table_CK.sum() == 0:
        raise ValueError("no labelled sample (every y_true < 0, or empty input): nothing to evaluate")
    return table_CK


def hungarian_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Clustering accuracy under the best one-to-one matching of clusters to classes.

    Works when the number of clusters differs from the number of classes (unmatched clusters count as
    errors). Entries with ``y_true < 0`` are ignored, here and in :func:`nmi` and :func:`ari`.
    """
    return _acc_from_table(_labelled_table(y_true, y_pred))


def nmi(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Normalised mutual information, MI / ((H(true) + H(pred)) / 2) (arithmetic normalisation)."""
    return _nmi_from_table(_labelled_table(y_true, y_pred))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert and Arabie)."""
    return _ari_from_table(_labelled_table(y_true, y_pred))


def evaluate_clustering(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC, NMI and ARI of a clustering; entries with ``y_true < 0`` (unlabelled) are ignored.

    Returns:
        ``{"acc": ..., "nmi": ..., "ari": ...}``.

    Raises:
        ValueError: If no entry is labelled, or on malformed inputs.
    """
    return metrics_from_contingency(contingency(y_true, y_pred))


def size_stats(labels: np.ndarray, k: int) -> dict[str, float]:
    """Balance of a clustering with K clusters (for logging, e.g. ``clusters/h0/min_size_frac``).

    Args:
        labels: Cluster ids, shape (N,); entries < 0 (not yet assigned) are ignored.
        k: Number of clusters K.

    Returns:
        ``min_size_frac`` and ``max_size_frac`` (smallest/largest cluster over the labelled count),
        ``empty`` (clusters with no member), ``entropy`` (nats, of the size distribution),
        ``entropy_norm`` (entropy / log K; 1 means perfectly balanced) and ``labelled`` (entries >= 0).
        With nothing labelled, fractions and entropies are 0 and every cluster is empty.

    Raises:
        ValueError: If ``k < 1`` or a label is >= k.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    labels_N = _as_labels("labels", labels)
    labels_N = labels_N[labels_N >= 0]
    if labels_N.size and labels_N.max() >= k:
        raise ValueError(f"labels hold cluster {labels_N.max()} but k={k}; every label must be < k")
    sizes_K = np.bincount(labels_N, minlength=k)
    labelled = int(labels_N.size)
    entropy = _entropy(sizes_K)
    fracs_K = sizes_K / labelled if labelled else np.zeros(k)
    return {
        "min_size_frac": float(fracs_K.min()),
        "max_size_frac": float(fracs_K.max()),
        "empty": float((sizes_K == 0).sum()),
        "entropy": entropy,
        "entropy_norm": entropy / float(np.log(k)) if k > 1 else 0.0,
        "labelled": float(labelled),
    }
