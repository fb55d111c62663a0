"""The training run's figures on their way out: the driver's part (``start_tracking``, ``TrackingHandle``) and rank
0's (``TrainingTracker``), over ``ray_metrics`` and ``mlflow_run``.

The driver opens the MLflow run before any Ray work and hands the workers a small ``TrackingHandle``; rank 0
sets the Ray gauges at every progress line (images/s, epoch, time left) and at every epoch end (every numeric
figure of the epoch: loss terms, cluster statistics, bad inputs, throughput) and queues the epoch for MLflow.
Other ranks get a tracker that does nothing (decided once, like the rank-0 logger).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.storage import Storage
from pipelines.tracking import mlflow_run
from pipelines.tracking.ray_metrics import RayMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingHandle:
    """What the driver hands every training worker (picklable; no credentials)."""

    run_id: str
    dataset: str
    ray_metrics: bool = True
    mlflow_uri: str = ""
    mlflow_run_id: str = ""
    """The MLflow run ``mlflow_run.open_run`` found or created; empty without MLflow."""
    env: dict[str, str] = field(default_factory=dict)
    """MLflow client settings of the driver's environment (``mlflow_run.FORWARDED_ENV``)."""

    @contextlib.contextmanager
    def finishing(self, storage: Storage) -> Iterator[None]:
        """Around ``trainer.fit()``: the MLflow run ends FINISHED (with ``train_history.json``) when the block
        returns, FAILED when it raises (the error propagates)."""
        try:
            yield
        except BaseException:
            if self.mlflow_run_id:
                mlflow_run.finish_run(self.mlflow_uri, self.mlflow_run_id, storage, self.run_id, "FAILED")
            raise
        if self.mlflow_run_id:
            mlflow_run.finish_run(self.mlflow_uri, self.mlflow_run_id, storage, self.run_id, "FINISHED")


def start_tracking(job: Any) -> TrackingHandle:
    """The handle of ``job`` (a ``TrainJobConfig``), its MLflow run opened when ``tracking.mlflow_uri`` is set.

    Raises:
        ValueError: MLflow is not installed, or the run cannot be opened (before any training work).
    """
    tracking = job.tracking
    mlflow_run.require_mlflow(tracking)
    mlflow_run_id = ""
    if tracking.mlflow_enabled:
        mlflow_run_id = mlflow_run.open_run(tracking, job.to_dict(), job.run_id, tags={
            "secu.dataset": job.dataset, "secu.method": job.experiment.method})
    env = {k: os.environ[k] for k in mlflow_run.FORWARDED_ENV if k in os.environ}
    return TrackingHandle(run_id=job.run_id, dataset=job.dataset, ray_metrics=tracking.ray_metrics,
                          mlflow_uri=tracking.mlflow_uri, mlflow_run_id=mlflow_run_id, env=env)


class TrainingTracker:
    """Rank 0's exporter of the training figures; does nothing when ``enabled`` is False (other ranks) or without
    a handle.

    Args:
        handle: The driver's ``TrackingHandle`` (None: nothing is exported).
        enabled: True on rank 0 only.
    """

    def __init__(self, handle: TrackingHandle | None, enabled: bool) -> None:
        on = enabled and handle is not None
        self.metrics = RayMetrics("train", handle.run_id if handle else "", handle.dataset if handle else "",
                                  enabled=on and bool(handle and handle.ray_metrics))
        self.mlflow: mlflow_run.EpochLogger | None = None
        if on and handle is not None and handle.mlflow_run_id:
            self.mlflow = mlflow_run.EpochLogger(handle.mlflow_uri, handle.mlflow_run_id, handle.env)

    def progress(self, figures: Mapping[str, float]) -> None:
        """The figures of a progress line (``metrics_log.Progress.figures``) as gauges."""
        self.metrics.set_gauges(figures)

    def epoch_end(self, metrics: Mapping[str, Any]) -> None:
        """Every numeric figure of a closed epoch as gauges, and the epoch queued for MLflow."""
        self.metrics.set_gauges(metrics)
        if self.mlflow is not None:
            self.mlflow.log(int(metrics["epoch"]), metrics)

    def close(self) -> None:
        """Wait (bounded) for MLflow's queue; stop refreshing the gauges."""
        if self.mlflow is not None:
            self.mlflow.close()
        self.metrics.close()
