"""The optional MLflow run of a training run (``tracking.mlflow_uri``): params, per-epoch metrics, artifacts.

One MLflow run per project run id, found again by its tag ``secu.run_id``, so that a resubmitted (resumed) run
keeps logging into the same MLflow run. Who calls what:

- the driver, before any Ray work: ``require_mlflow`` (fails with the install command when mlflow is missing)
  and ``open_run`` (the experiment, the run, the params: the resolved job config flattened to dotted keys;
  an unreachable server fails the job here, before training starts);
- rank 0, once per epoch: ``EpochLogger.log`` (one value per metric key and epoch, ``step`` = the epoch), on a
  background thread so that a slow or unreachable server never holds up training; a failed call is a warning;
- the driver at the end: ``finish_run`` (``train_history.json`` as an artifact, status FINISHED or FAILED);
- the demo and ``secu report --mlflow-uri``: ``log_run_outputs`` (the report folder, ``metrics.json``).

MLflow is imported only when a URI is set.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.storage import Storage
from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.ray_metrics import numeric_figures
from pipelines.training.metrics_log import HISTORY_FILE

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'secu-ray[mlflow]'"
RUN_ID_TAG = "secu.run_id"
FORWARDED_ENV = ("MLFLOW_ALLOW_FILE_STORE",)
"""Settings of MLflow's client (no credentials) that travel from the driver to the rank-0 worker."""
_MAX_PARAMS, _MAX_METRICS = 100, 1000
"""MLflow's limits per ``log_batch`` call."""


def require_mlflow(tracking: TrackingConfig) -> None:
    """With ``tracking.mlflow_uri`` set, check that mlflow can be imported.

    Raises:
        ValueError: mlflow is not installed (the message names the install command).
    """
    if not tracking.mlflow_enabled:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"tracking.mlflow_uri is set but MLflow is not installed ({err}): run {INSTALL_HINT} (on the driver and "
            "the training workers, e.g. in the runtime_env's pip list), or leave tracking.mlflow_uri empty"
        ) from None


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys of a nested config with string values (lists as JSON), as MLflow params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out |= flatten_params(value, f"{prefix}{key}.")
        elif isinstance(value, list | tuple):
            out[f"{prefix}{key}"] = json.dumps(list(value))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_or_create(client: Any, experiment: str, run_id: str, tags: Mapping[str, str]) -> Any:
    """The MLflow run tagged ``secu.run_id=run_id`` in ``experiment`` (both created when missing)."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    # run ids are letters, digits, '-', '_' and '.' (TrainJobConfig), so the filter needs no escaping
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if runs:
        return runs[0]
    return client.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id, **tags})


def open_run(tracking: TrackingConfig, job_config: Mapping[str, Any], run_id: str,
             tags: Mapping[str, str] | None = None) -> str:
    """Find or create the MLflow run of ``run_id``, mark it running and log the config as params; returns the
    MLflow run id. Params already logged (by an earlier attempt) keep their first value: MLflow's params are
    immutable, so a changed one is named in a warning and not logged again.

    Raises:
        ValueError: The server or store cannot be reached or refuses the calls (before any training work).
    """
    from mlflow.entities import Param

    uri, experiment = tracking.mlflow_uri, tracking.mlflow_experiment
    try:
        client = _client(uri)
        run = _find_or_create(client, experiment, run_id, dict(tags or {}))
        mlflow_run_id = str(run.info.run_id)
        client.update_run(mlflow_run_id, status="RUNNING")
        logged = dict(run.data.params)
        params = flatten_params(job_config)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), _MAX_PARAMS):
            client.log_batch(mlflow_run_id, params=new[start:start + _MAX_PARAMS])
    except Exception as err:  # mlflow's own errors, connection errors, a refused store
        raise ValueError(
            f"tracking.mlflow_uri={uri}: could not open the MLflow run of {run_id!r} in experiment {experiment!r}: "
            f"{' '.join(str(err).split())[:500]}. Check the URI and that the server is reachable from here, or "
            "leave tracking.mlflow_uri empty") from None
    if changed:
        logger.warning("MLflow run %s keeps the first logged value of params %s (MLflow params cannot change); "
                       "the run's config holds the new ones", mlflow_run_id, changed)
    logger.info("MLflow: run %s of experiment %r at %s (secu run %s)", mlflow_run_id, experiment, uri, run_id)
    return mlflow_run_id


def finish_run(uri: str, mlflow_run_id: str, storage: Storage, run_id: str, status: str) -> None:
    """Log ``runs/<run_id>/train_history.json`` as an artifact and end the MLflow run with ``status`` (FINISHED,
    FAILED); a failure is a warning (the training itself is done)."""
    try:
        client = _client(uri)
        rel = storage.join("runs", run_id, HISTORY_FILE)
        if storage.exists(rel):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp, HISTORY_FILE)
                local.write_bytes(storage.read_bytes(rel))
                client.log_artifact(mlflow_run_id, str(local))
        client.set_terminated(mlflow_run_id, status=status)
    except Exception as err:  # noqa: BLE001 - reported, never fatal
        logger.warning("MLflow: could not finish run %s (%s): %s", mlflow_run_id, status, err)


def log_run_outputs(tracking: TrackingConfig, storage: Storage, run_id: str, rels: Iterable[str]) -> list[str]:
    """Attach files or folders under the storage root (the report folder, ``metrics.json``) as artifacts of the
    MLflow run of ``run_id`` (created when the run was trained without MLflow); returns the artifact paths
    logged. A failure is a warning: the outputs are published already."""
    if not tracking.mlflow_enabled:
        return []
    logged: list[str] = []
    try:
        client = _client(tracking.mlflow_uri)
        mlflow_run_id = str(_find_or_create(client, tracking.mlflow_experiment, run_id, {}).info.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            for rel in rels:
                name = rel.rstrip("/").rsplit("/", 1)[-1]
                kind = storage.filesystem.get_file_info(storage.path(rel)).type
                if kind == pafs.FileType.File:
                    Path(tmp, name).write_bytes(storage.read_bytes(rel))
                    client.log_artifact(mlflow_run_id, str(Path(tmp, name)))
                elif kind == pafs.FileType.Directory:  # copied (from S3 too) and logged under its own name
                    for entry in storage.list(rel, recursive=True):
                        target = Path(tmp, name, entry.path)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(storage.read_bytes(storage.join(rel, entry.path)))
                    client.log_artifacts(mlflow_run_id, str(Path(tmp, name)), artifact_path=name)
                else:
                    continue
                logged.append(name)
        logger.info("MLflow: logged %s to run %s", logged, mlflow_run_id)
    except Exception as err:  # noqa: BLE001 - reported, never fatal
        logger.warning("MLflow: could not log %s of run %s: %s", list(rels), run_id, err)
    return logged


class EpochLogger:
    """Rank 0's per-epoch ``log_batch`` into the MLflow run, on a background thread.

    An epoch already in the run (logged by an attempt that died before its checkpoint, then replayed) is not
    logged again, so every key has one value per epoch; ``train_history.json`` holds the replayed values.

    Args:
        uri: The tracking URI.
        mlflow_run_id: The run ``open_run`` returned.
        env: MLflow client settings from the driver (``FORWARDED_ENV``), set in this process.
    """

    def __init__(self, uri: str, mlflow_run_id: str, env: Mapping[str, str] | None = None) -> None:
        self.uri, self.mlflow_run_id = uri, mlflow_run_id
        for key, value in (env or {}).items():
            os.environ.setdefault(key, value)
        self._queue: queue.Queue[tuple[int, dict[str, float]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="secu-mlflow", daemon=True)
        self._thread.start()

    def log(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Queue the numeric metrics of ``epoch`` (returns at once)."""
        self._queue.put((epoch, numeric_figures(metrics)))

    def close(self, timeout_s: float = 60.0) -> None:
        """Wait up to ``timeout_s`` for the queued epochs to be logged (a warning when they are not)."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("MLflow: %d epoch(s) not logged to run %s after %.0f s; training is done, they are "
                           "in train_history.json", self._queue.qsize(), self.mlflow_run_id, timeout_s)

    def _work(self) -> None:
        client, done = None, set()
        try:
            client = _client(self.uri)
            done = {int(m.step) for m in client.get_metric_history(self.mlflow_run_id, "epoch")}
        except Exception as err:  # noqa: BLE001 - reported, never fatal
            logger.warning("MLflow: cannot reach run %s (%s); training goes on, the epochs are logged to "
                           "train_history.json only", self.mlflow_run_id, err)
        while True:
            item = self._queue.get()
            if item is None:
                return
            epoch, metrics = item
            if client is None or epoch in done:
                continue
            try:
                self._log(client, epoch, metrics)
                done.add(epoch)
            except Exception as err:  # noqa: BLE001 - reported, never fatal
                logger.warning("MLflow: could not log epoch %d to run %s: %s; training goes on", epoch,
                               self.mlflow_run_id, err)

    def _log(self, client: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows: Sequence[Any] = [Metric(key, value, now, epoch) for key, value in metrics.items()]
        for start in range(0, len(rows), _MAX_METRICS):
            client.log_batch(self.mlflow_run_id, metrics=rows[start:start + _MAX_METRICS])


def log_report(tracking: TrackingConfig, storage: Storage, run_id: str, output_name: str) -> list[str]:
    """``log_run_outputs`` of the report folder of assignment output ``output_name`` and its metrics JSON
    (``metrics.json`` or ``metrics-<suffix>.json``, when evaluated)."""
    from pipelines.outputs.evaluation import metrics_file
    from pipelines.outputs.report import report_dir

    return log_run_outputs(tracking, storage, run_id,
                           [report_dir(run_id, output_name), storage.join("runs", run_id, metrics_file(output_name))])
