"""The report's data: what the pages of one output show, read from storage, without any HTML.

``load_report_data`` reads the published assignments of one head, the dataset's labels, the metrics
(``pipelines.outputs.evaluation``), the training history (``train_history.json``) and the drift of a
reclustering tick (``drift.json``, when the run has one), and chooses the members every cluster page
shows: its most confident images, its least confident ones (the borderline members, the first to
look at when judging where a cluster ends), a seeded random sample of the others, and for a large
cluster further pages of random members. The HTML is ``pipelines.outputs.report_html``'s, the image
files ``pipelines.outputs.thumbnails``', the embedding map ``pipelines.outputs.report_map``'s and the
flows between reclustering ticks ``pipelines.outputs.report_drift``'s.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.outputs.assignments import read_assignments, read_marker
from pipelines.outputs.evaluation import evaluate_assignments, labels_for, load_labels
from pipelines.outputs.schema import cluster_column, confidence_column, similarity_column
from pipelines.recluster.alignment import DRIFT_FILE
from pipelines.storage import Storage, join
from pipelines.training.metrics_log import HISTORY_FILE
from secu.metrics import contingency


@dataclass
class ClusterView:
    """What one cluster's page and table row show."""

    cluster: int
    size: int
    mean_confidence: float
    mean_similarity: float
    top: list[int]
    """Row indices (into the assignment table) of the most confident members, most confident first."""
    borderline: list[int]
    """Row indices of the least confident members (none of ``top``), least confident first."""
    random: list[int]
    """Row indices of random other members (neither top nor borderline), most confident first."""
    more: list[list[int]] = field(default_factory=list)
    """Further pages of random members (none shown elsewhere), each most confident first."""
    label_counts: list[tuple[str, int]] = field(default_factory=list)
    """(class name, count) of the most frequent classes, most frequent first (labelled data only)."""

    @property
    def majority(self) -> tuple[str, float] | None:
        """The most frequent class and its share of the cluster; None without labels or members."""
        if not self.label_counts or self.size == 0:
            return None
        name, count = self.label_counts[0]
        return name, count / self.size

    @property
    def shown(self) -> list[int]:
        """Every row that some page of this cluster shows."""
        return self.top + self.borderline + self.random + [i for page in self.more for i in page]


@dataclass
class ReportData:
    """Everything the report of one output and head shows."""

    run_id: str
    name: str
    marker: dict[str, Any]
    """The output's ``_SUCCESS`` content."""
    evaluation: dict[str, Any]
    """``evaluate_assignments`` of the output."""
    views: list[ClusterView]
    """One per cluster, in cluster order."""
    keys: list[str]
    """Sample key per assignment row."""
    shards: list[str]
    """Shard file name per assignment row."""
    conf: np.ndarray
    """Confidence per assignment row."""
    pred: np.ndarray
    """Cluster of head ``head`` per assignment row."""
    labelled: bool
    n: int
    k: int
    head: int
    sizes_K: np.ndarray
    """Images per cluster."""
    table_CK: np.ndarray | None
    """Contingency table (classes x clusters); None without labels."""
    class_names: list[str]
    """The dataset's label names, ``class <i>`` where it has none."""
    history: list[dict[str, Any]]
    """Training history, sorted by epoch (empty when the run has none)."""
    drift: dict[str, Any] | None = None
    """``drift.json`` of a reclustering tick (``pipelines.recluster.tick``), when the run has one."""
    named_classes: bool = False
    """True when the dataset has label names (``class_names`` are not numbers)."""
    available: set[str] = field(default_factory=set)
    """Keys whose thumbnail was written (filled in once the thumbnails are extracted)."""


@dataclass
class MemberCounts:
    """How many members of each kind a cluster's pages show (the defaults are ``ReportOptions``')."""

    top: int
    borderline: int
    random: int
    more_pages: int
    """Extra pages of random members for a cluster larger than its first page shows."""

    @property
    def per_page(self) -> int:
        """Images on one extra page (as many as the first page shows)."""
        return max(self.top + self.borderline + self.random, 1)


def select_members(pred: np.ndarray, confidence: np.ndarray, k: int, counts: MemberCounts,
                   seed: int) -> list[tuple[list[int], list[int], list[int], list[list[int]]]]:
    """Per cluster, row indices of its most confident, least confident, random and extra-page members.

    The groups never overlap: the ``top`` most confident come first, the ``borderline`` least confident
    of the rest next, then a seeded random draw (without replacement) from what is left fills the random
    group and up to ``more_pages`` extra pages.
    """
    order = np.lexsort((-confidence, pred))
    bounds = np.searchsorted(pred[order], np.arange(k + 1))
    rng = np.random.default_rng(seed)
    out = []
    for c in range(k):
        members = order[bounds[c]:bounds[c + 1]]
        top, rest = members[:counts.top], members[counts.top:]
        cut = max(rest.size - counts.borderline, 0)
        borderline, middle = rest[cut:][::-1], rest[:cut]
        wanted = min(counts.random + counts.more_pages * counts.per_page, middle.size)
        picked = rng.choice(middle, size=wanted, replace=False) if wanted else middle[:0]

        def by_confidence(rows: np.ndarray) -> list[int]:
            return [int(i) for i in rows[np.argsort(-confidence[rows], kind="stable")]]

        rnd = by_confidence(picked[:counts.random])
        extra = picked[counts.random:]
        pages = [by_confidence(extra[i:i + counts.per_page]) for i in range(0, extra.size, counts.per_page)]
        out.append(([int(i) for i in top], [int(i) for i in borderline], rnd, pages))
    return out


def read_history(storage: Storage, run_id: str) -> list[dict[str, Any]]:
    """The run's training history (``train_history.json``) sorted by epoch; empty when there is none."""
    rel = join("runs", run_id, HISTORY_FILE)
    if not storage.exists(rel):
        return []
    epochs = json.loads(storage.read_bytes(rel).decode("utf-8")).get("epochs", [])
    return sorted((e for e in epochs if isinstance(e, dict)), key=lambda e: float(e.get("epoch", 0)))


def read_drift(storage: Storage, run_id: str) -> dict[str, Any] | None:
    """The run's ``drift.json`` (written by a reclustering tick); None when there is none."""
    rel = join("runs", run_id, DRIFT_FILE)
    if not storage.exists(rel):
        return None
    data: dict[str, Any] = json.loads(storage.read_bytes(rel).decode("utf-8"))
    return data


def cluster_views(pred: np.ndarray, conf: np.ndarray, sim: np.ndarray, k: int, table_CK: np.ndarray | None,
                  class_names: list[str], counts: MemberCounts, seed: int) -> list[ClusterView]:
    """One ``ClusterView`` per cluster: size, mean scores, chosen members and (labelled) main classes."""
    sizes_K = np.bincount(pred, minlength=k)
    conf_sum = np.bincount(pred, weights=conf, minlength=k)
    sim_sum = np.bincount(pred, weights=sim, minlength=k)
    views = []
    for c, (top_rows, low, rnd, more) in enumerate(select_members(pred, conf, k, counts, seed)):
        size = int(sizes_K[c])
        mix: list[tuple[str, int]] = []
        if table_CK is not None:
            col = table_CK[:, c]
            mix = [(class_names[i], int(col[i])) for i in np.argsort(-col, kind="stable")[:5] if col[i] > 0]
        views.append(ClusterView(c, size, float(conf_sum[c] / max(size, 1)), float(sim_sum[c] / max(size, 1)),
                                 top_rows, low, rnd, more, mix))
    return views


def load_report_data(storage: Storage, run_id: str, name: str, head: int, counts: MemberCounts,
                     seed: int) -> ReportData:
    """Read what the report of output ``name``, head ``head``, shows (``counts`` members per cluster).

    Raises:
        ValueError: The output has no head ``head``.
    """
    marker = read_marker(storage, run_id, name)
    heads, ks = int(marker["num_heads"]), [int(k) for k in marker["ks"]]
    if head >= heads:
        raise ValueError(f"--head {head}: the run has heads 0..{heads - 1}")
    k = ks[head]
    table = read_assignments(storage, run_id, name, columns=[
        "sample_index", "key", "shard", cluster_column(head), confidence_column(head), similarity_column(head)])
    pred = table[cluster_column(head)].to_numpy().astype(np.int64)
    conf = table[confidence_column(head)].to_numpy()
    sim = table[similarity_column(head)].to_numpy()
    keys = [str(x) for x in table["key"].to_pylist()]
    shards = [os.path.basename(str(x)) for x in table["shard"].to_pylist()]
    labels = load_labels(storage, marker["dataset"])
    y_true = labels_for(labels, table["sample_index"].to_numpy())
    labelled = bool((y_true >= 0).any())
    table_CK = contingency(y_true, pred, num_clusters=k) if labelled else None
    classes = table_CK.shape[0] if table_CK is not None else 0
    names = list(labels.names or [])
    class_names = [names[i] if i < len(names) else f"class {i}" for i in range(classes)]
    evaluation = evaluate_assignments(storage, run_id, name)
    history = read_history(storage, run_id)
    views = cluster_views(pred, conf, sim, k, table_CK, class_names, counts, seed)
    return ReportData(run_id, name, marker, evaluation, views, keys, shards, conf, pred, labelled, len(keys), k,
                      head, np.bincount(pred, minlength=k), table_CK, class_names, history, read_drift(storage, run_id),
                      named_classes=bool(names))


def wanted_thumbnails(data: ReportData) -> dict[str, set[str]]:
    """Shard file name -> keys of the members that the cluster pages show."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for v in data.views:
        for i in v.shown:
            wanted[data.shards[i]].add(data.keys[i])
    return wanted
