"""The jobs' figures as Ray metrics (``ray.util.metrics``): the Ray dashboard's metrics view shows them, and any
Prometheus that scrapes a node's metrics endpoint (``ray_secu_*``; Ray adds the ``ray_`` prefix, and ``_total``
to a counter).

A figure is named after its project key: ``train/loss_center`` -> ``secu_train_loss_center``,
``data/images_per_s`` -> ``secu_data_images_per_s``, and a per-head key ``clusters/h0/min_size_frac`` ->
``secu_clusters_min_size_frac{head="0"}``. Every series carries the tags ``job`` (train, infer, ingest),
``run_id`` and ``dataset``.

Gauges hold the last value. Ray's agent drops a gauge series that its process has not set again within two
export intervals (``RAY_metrics_report_interval_ms``, 10 s by default), so ``RayMetrics`` sets its gauges
again on a background thread every half interval for as long as the process lives: a per-epoch figure stays
on the endpoint between epochs, and goes when the job's process ends. Counters (totals such as images
ingested) stay on the node's endpoint after the process has ended.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from pipelines.storage import Storage

logger = logging.getLogger(__name__)

PREFIX = "secu_"
BASE_TAGS = ("job", "run_id", "dataset")
REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"
DEFAULT_REPORT_INTERVAL_MS = 10_000
"""Ray's default export interval of a process' metrics (``metrics_report_interval_ms``)."""


class IngestFigures(Protocol):
    """What ``export_ingest`` reads of a ``pipelines.dataset.ingest.IngestResult`` (which imports this module)."""

    dataset: str
    added: int
    skipped: dict[str, int]
    shards_added: list[str]
    num_samples: int
    seconds: float


class InferenceFigures(Protocol):
    """What ``export_inference`` reads of a ``pipelines.outputs.inference.InferenceResult``."""

    run_id: str
    name: str
    rows: int
    checkpoint_epoch: int
    dataset: str
    seconds: float
    images_per_s: float
    marker: dict[str, Any]


_Ingest = TypeVar("_Ingest", bound=IngestFigures)
_Inference = TypeVar("_Inference", bound=InferenceFigures)
_HEAD = re.compile(r"^h(\d+)$")
_INVALID = re.compile(r"[^A-Za-z0-9_]")

DESCRIPTIONS = {
    "secu_epoch": "the training epoch (0-based) the figures belong to",
    "secu_data_images_per_s": "images per second: training (all ranks), inference or ingest",
    "secu_train_loss": "the training loss of the epoch (mean over its steps)",
    "secu_clusters_min_size_frac": "the smallest cluster's share of the labelled images, per head",
    "secu_clusters_max_size_frac": "the largest cluster's share of the labelled images, per head",
    "secu_clusters_entropy": "entropy (nats) of the cluster-size distribution, per head",
    "secu_data_bad_inputs": "images skipped as bad input (undecodable, too large, lost) so far in the run",
}


def metric_name(key: str) -> tuple[str, dict[str, str]]:
    """The Ray metric name and extra tags of a project key: ``clusters/h2/entropy`` ->
    ``("secu_clusters_entropy", {"head": "2"})``."""
    parts, tags = [], {}
    for part in key.split("/"):
        head = _HEAD.match(part)
        if head:
            tags["head"] = head.group(1)
        elif part:
            parts.append(_INVALID.sub("_", part))
    return PREFIX + "_".join(parts), tags


def numeric_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (booleans, strings, lists and NaN left out)."""
    out = {}
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def refresh_interval_s() -> float:
    """Half of Ray's metrics export interval (at least 0.5 s): how often gauges are set again."""
    try:
        interval_ms = float(os.environ.get(REPORT_INTERVAL_ENV, DEFAULT_REPORT_INTERVAL_MS))
    except ValueError:
        interval_ms = DEFAULT_REPORT_INTERVAL_MS
    return max(0.5, max(interval_ms, 1000.0) / 2000.0)


class RayMetrics:
    """Gauges and counters under ``secu_`` with the tags of one job; a no-op when disabled (off rank 0, with
    ``tracking.ray_metrics=false``, or without a Ray connection).

    Args:
        job: ``train``, ``infer`` or ``ingest`` (the ``job`` tag).
        run_id: The run (the ``run_id`` tag; empty for an ingest).
        dataset: The dataset (the ``dataset`` tag).
        enabled: False makes every call return at once.
    """

    def __init__(self, job: str, run_id: str, dataset: str, *, enabled: bool = True) -> None:
        self.tags = {"job": job, "run_id": run_id, "dataset": dataset}
        self.enabled = enabled and _ray_connected()
        self._gauges: dict[str, Any] = {}
        self._gauge_tags: dict[str, tuple[str, ...]] = {}
        self._counters: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_gauges(self, figures: Mapping[str, Any]) -> None:
        """Set a gauge per numeric figure (project keys, see the module docstring); others are left out."""
        if not self.enabled:
            return
        with self._lock:
            for key, value in numeric_figures(figures).items():
                name, extra = metric_name(key)
                if name in self._gauge_tags and self._gauge_tags[name] != tuple(extra):
                    # One Ray metric has one set of tag keys: a figure whose name another figure took with other
                    # tags (ProPos' ``propos/kmeans_iters``, a copy of head 0's) is left out rather than fail.
                    continue
                tags = self.tags | extra
                self._gauge(name, tuple(extra)).set(value, tags=tags)
                self._last[(name, tuple(sorted(tags.items())))] = value
        self._start_refresh()

    def add(self, key: str, amount: float, **tags: str) -> None:
        """Add ``amount`` (> 0; zero and less are ignored) to the counter of ``key``, with extra ``tags``
        (e.g. ``reason="too_large"``)."""
        if not self.enabled or not amount > 0:
            return
        name, extra = metric_name(key)
        extra |= tags
        with self._lock:
            self._counter(name, tuple(sorted(extra))).inc(float(amount), tags=self.tags | extra)

    def close(self) -> None:
        """Stop setting the gauges again (they leave the endpoint within two export intervals)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _gauge(self, name: str, extra: tuple[str, ...]) -> Any:
        from ray.util.metrics import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, description=DESCRIPTIONS.get(name, name), tag_keys=BASE_TAGS + extra)
            self._gauge_tags[name] = extra
        return self._gauges[name]

    def _counter(self, name: str, extra: tuple[str, ...]) -> Any:
        from ray.util.metrics import Counter

        if name not in self._counters:
            self._counters[name] = Counter(name, description=DESCRIPTIONS.get(name, name),
                                           tag_keys=BASE_TAGS + extra)
        return self._counters[name]

    def _start_refresh(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh, name="secu-ray-metrics", daemon=True)
            self._thread.start()
            _REFRESHING.add(self)

    def _refresh(self) -> None:
        interval = refresh_interval_s()
        while not self._stop.wait(interval):
            if not _ray_connected():  # ray.shutdown() in this process: nothing to export to any more
                return
            with self._lock:
                for (name, tags), value in self._last.items():
                    self._gauges[name].set(value, tags=dict(tags))


_REFRESHING: weakref.WeakSet[RayMetrics] = weakref.WeakSet()
"""Exporters whose refresh thread may still run (ingest and inference keep theirs until the process ends)."""


@atexit.register
def _stop_refreshing() -> None:
    """Stop every refresh thread before the interpreter (and Ray, whose exit hook was registered earlier and so
    runs later) shuts down: a daemon thread inside Ray's metric calls during finalisation can crash it."""
    for metrics in list(_REFRESHING):
        metrics.close()


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized())


def export_ingest(result: _Ingest) -> _Ingest:
    """The figures of one ingest (``pipelines.dataset.ingest.IngestResult``), when this process is connected to
    Ray: counters ``secu_ingest_images_added``, ``secu_ingest_shards_added``, ``secu_ingest_skipped{reason}``;
    gauges ``secu_ingest_num_samples``, ``secu_data_images_per_s``. Returns ``result``. Never raises (a metrics
    problem must not fail the job that has done its work)."""
    try:
        metrics = RayMetrics("ingest", "", result.dataset)
        metrics.add("ingest/images_added", result.added)
        metrics.add("ingest/shards_added", len(result.shards_added))
        for reason, count in result.skipped.items():
            metrics.add("ingest/skipped", count, reason=str(reason))
        metrics.set_gauges({"ingest/num_samples": result.num_samples,
                            "data/images_per_s": result.added / max(result.seconds, 1e-9)})
    except Exception as err:  # noqa: BLE001 - reported, never fatal
        logger.warning("could not export the ingest's Ray metrics: %s", err)
    return result


def export_inference(storage: Storage, result: _Inference) -> _Inference:
    """The figures of one published inference (``pipelines.outputs.inference.InferenceResult``): counters
    ``secu_infer_images`` and ``secu_infer_bad_inputs{reason}``; gauges ``secu_data_images_per_s``,
    ``secu_infer_seconds``, ``secu_infer_checkpoint_epoch`` and head 0's cluster statistics of the output
    (``secu_clusters_{min_size_frac,max_size_frac,empty,entropy,entropy_norm}{head="0"}``, read from its
    ``cluster_h0`` column). Returns ``result``. Never raises."""
    try:
        metrics = RayMetrics("infer", result.run_id, result.dataset)
        if not metrics.enabled:
            return result
        metrics.add("infer/images", result.rows)
        for reason, count in (result.marker.get("skipped", {}).get("by_reason") or {}).items():
            metrics.add("infer/bad_inputs", count, reason=str(reason))
        metrics.set_gauges({"data/images_per_s": result.images_per_s, "infer/seconds": result.seconds,
                            "infer/checkpoint_epoch": result.checkpoint_epoch,
                            **output_cluster_stats(storage, result.run_id, result.name, int(result.marker["ks"][0]))})
    except Exception as err:  # noqa: BLE001 - reported, never fatal
        logger.warning("could not export the inference's Ray metrics: %s", err)
    return result


def output_cluster_stats(storage: Storage, run_id: str, name: str, k: int) -> dict[str, float]:
    """``clusters/h0/*`` size statistics (``secu.metrics.size_stats``) of a published output's head 0."""
    from pipelines.outputs.assignments import read_assignments
    from pipelines.outputs.schema import cluster_column
    from secu.metrics import size_stats

    labels = read_assignments(storage, run_id, name, columns=[cluster_column(0)])[cluster_column(0)].to_numpy()
    stats = size_stats(labels, k)
    return {f"clusters/h0/{key}": value for key, value in stats.items() if key != "labelled"}
