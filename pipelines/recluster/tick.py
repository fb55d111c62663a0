"""Scheduled reclustering of a growing image collection: one tick = ingest, warm start, train, align, infer, drift.

A *series* ``<base>`` (the ``--run-id`` of ``jobs.recluster``) is a sequence of ticks over one dataset.
Tick ``<tick>`` (default: the UTC time it started) is the training run ``<base>-<tick>``:

1. lock the series (``runs/<base>/_recluster.lock``, ``pipelines.run_lock``): two schedules firing at
   once cannot both run; a tick id that already completed is refused;
2. ingest the source's new images into the dataset (``pipelines.dataset.ingest`` skips what is there; new
   images get new ids after the existing ones);
3. train ``epochs`` epochs, warm-started from the previous completed tick's aligned checkpoint
   (network, duals and the previous labels of the old ids; ``pipelines.training.warm_start``); a tick that
   crashed and is started again with the same tick id resumes from its own checkpoint;
4. align: match the run's centers to the previous tick's per head (Hungarian, cosine similarity) and
   write ``runs/<run_id>/checkpoint-aligned/``, the final checkpoint with every per-cluster quantity
   permuted to the stable ids (``pipelines.recluster.alignment``). This is where the id mapping is
   applied; inference and the next tick read that copy, so published cluster ids are stable;
5. infer the whole collection (``infer_scope=all``) or only the shards holding images the previous
   tick did not have (``infer_scope=new``) into ``runs/<run_id>/assignments/``;
6. drift vs the previous tick (``runs/<run_id>/drift.json``, also in ``metrics.json`` under ``drift``
   and as ``drift/...`` metrics): share of common images that changed cluster, clusters that
   appeared / vanished, size changes. Computed on the published assignments when both ticks inferred
   the whole collection, else on the training memory of the aligned checkpoints (labels of the last
   epoch, every image);
7. evaluate and render the report; record the tick as completed in ``runs/<base>/recluster.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipelines.dataset.info import load_dataset_info
from pipelines.outputs.assignments import DEFAULT_NAME, read_assignments, read_marker
from pipelines.outputs.inference import InferenceOptions
from pipelines.outputs.schema import cluster_column
from pipelines.recluster.alignment import (
    DRIFT_FILE,
    HeadAlignment,
    RunLabels,
    align_heads,
    aligned_checkpoint,
    alignment_record,
    drift_metrics,
    drift_summary,
)
from pipelines.run_lock import StorageLock
from pipelines.storage import Storage, join
from pipelines.training.checkpointing import checkpoint_at, find_latest_checkpoint, publish_checkpoint, read_checkpoint
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.job_config import TrainJobConfig, apply_job_overrides
from pipelines.training.warm_start import previous_labels
from secu.methods import build_method

logger = logging.getLogger(__name__)

SERIES_FILE = "recluster.json"
LOCK_FILE = "_recluster.lock"
ALIGNED_DIR = "checkpoint-aligned"
INFER_SCOPES = ("all", "new")


class TickCompletedError(ValueError):
    """The tick id already has a completed run in the series."""


@dataclass
class ReclusterOptions:
    """How one reclustering tick runs (``--set key=value`` of ``jobs.recluster``)."""

    epochs: int = 2
    """Training epochs of each tick (``optim.epochs`` of the tick's run)."""
    infer_scope: str = "all"
    """``all``: assign every image; ``new``: only the shards with images the previous tick did not have."""
    warm_start: bool = True
    """Start from the previous tick's aligned checkpoint (False: every tick trains from scratch; the
    ids are still aligned to the previous tick)."""
    report: bool = True
    """Render the HTML report of the tick (with its drift section)."""
    lock_ttl_hours: float = 12.0
    """A lock older than this counts as abandoned (its holder crashed) and is taken over."""
    split: str = "train"
    """Split of array sources (IDX, CIFAR, STL-10) to ingest."""
    shard_size: int = 10_000
    """Images per shard written by the ingest."""
    max_pixels: int = 50_000_000
    """File sources: larger images are skipped and counted."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.infer_scope not in INFER_SCOPES:
            raise ValueError(f"infer_scope={self.infer_scope!r}: choose one of {INFER_SCOPES}")
        if self.lock_ttl_hours <= 0:
            raise ValueError(f"lock_ttl_hours={self.lock_ttl_hours} must be positive")


@dataclass
class ReclusterResult:
    """What one tick did."""

    base: str
    tick: str
    run_id: str
    previous_run_id: str | None
    added: int
    """Images the ingest added."""
    num_samples: int
    new_images: int
    """Images the previous tick did not have (all images for the first tick)."""
    warm_start_from: str | None
    epochs_run: int
    checkpoint: str
    """The aligned checkpoint (stable ids)."""
    assignments: str | None
    rows: int
    drift: dict[str, Any] = field(default_factory=dict)
    report: str | None = None


def default_tick() -> str:
    """The tick id of a run started now: its UTC time, e.g. ``20261123T030000Z``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def series_rel(base: str) -> str:
    """``runs/<base>/recluster.json``: the ticks of a series (status, checkpoint, figures)."""
    return join("runs", base, SERIES_FILE)


def load_series(storage: Storage, base: str, dataset: str) -> dict[str, Any]:
    """The series record (a new one when absent).

    Raises:
        ValueError: The series exists for another dataset.
    """
    rel = series_rel(base)
    if not storage.exists(rel):
        return {"base": base, "dataset": dataset, "ticks": []}
    series: dict[str, Any] = json.loads(storage.read_bytes(rel).decode("utf-8"))
    if series.get("dataset") != dataset:
        raise ValueError(f"reclustering series {base!r} works on dataset {series.get('dataset')!r}, not {dataset!r}: "
                         f"pass --dataset {series.get('dataset')} or use another --run-id for a new series")
    return series


def save_series(storage: Storage, base: str, series: dict[str, Any]) -> None:
    """Publish the series record atomically."""
    storage.write_bytes_atomic(series_rel(base), (json.dumps(series, indent=1) + "\n").encode())


def _previous(series: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The last completed tick before ``run_id`` (in the series order)."""
    previous = None
    for entry in series["ticks"]:
        if entry["run_id"] == run_id:
            break
        if entry.get("status") == "completed":
            previous = entry
    return previous


def tick_job(template: TrainJobConfig, run_id: str, epochs: int) -> TrainJobConfig:
    """The training job of a tick: the template's experiment/compute/dataset with its run id and epochs.

    A tick trains few epochs, so the recipe's learning-rate warm-up is shortened to fit them
    (``optim.warmup_epochs`` <= ``epochs``).
    """
    warmup = min(template.experiment.optim.warmup_epochs, epochs)
    if warmup != template.experiment.optim.warmup_epochs:
        logger.info("optim.warmup_epochs=%d shortened to %d to fit the tick's %d epoch(s)",
                    template.experiment.optim.warmup_epochs, warmup, epochs)
    job = apply_job_overrides(template, [f"optim.warmup_epochs={warmup}", f"optim.epochs={epochs}",
                                         f"run_id={run_id}"])
    # The tick's epochs are the user's (recluster.epochs): adaptation to the collection (secu.adapt) may
    # lengthen the warm-up within them, never add epochs.
    fixed = sorted(set(job.experiment.adapt.fixed) | {"optim.epochs"})
    return apply_job_overrides(job, [f"adapt.fixed={','.join(fixed)}"])


def run_recluster(storage: Storage, template: TrainJobConfig, base: str, *, tick: str | None = None,
                  source: str | None = None, options: ReclusterOptions | None = None,
                  inference: InferenceOptions | None = None) -> ReclusterResult:
    """Run one reclustering tick of series ``base`` on ``template.dataset`` (see the module docstring).

    Raises:
        LockHeldError: Another tick of the series is running.
        TickCompletedError: ``tick`` already completed.
        ValueError / FileNotFoundError: Bad configuration (the message says what to change).
    """
    import ray

    options = options or ReclusterOptions()
    tick = tick or default_tick()
    run_id = f"{base}-{tick}"
    job = tick_job(template, run_id, options.epochs)  # validates the run id
    storage.check_reachable()
    if not source:  # nothing to ingest first: the dataset must exist before the lock, the series or Ray
        load_dataset_info(storage, job.dataset)
    lock = StorageLock(storage, join("runs", base, LOCK_FILE), ttl_s=options.lock_ttl_hours * 3600,
                       purpose=f"reclustering tick {run_id}")
    with lock:
        series = load_series(storage, base, job.dataset)
        entry = next((e for e in series["ticks"] if e["run_id"] == run_id), None)
        if entry is not None and entry.get("status") == "completed":
            raise TickCompletedError(
                f"tick {tick!r} of series {base!r} completed at {entry.get('finished')} (run {run_id}): pass a new "
                "--tick (default: the current UTC time) to recluster again")
        if entry is None:
            entry = {"tick": tick, "run_id": run_id}
            series["ticks"].append(entry)
        previous = _previous(series, run_id)
        entry.update(status="running", started=_now_iso(), previous_run_id=previous["run_id"] if previous else None)
        entry.pop("error", None)
        save_series(storage, base, series)
        try:
            if not ray.is_initialized():
                ray.init()  # inside `ray job submit` this connects to the cluster; alone it starts a local Ray
            result = _tick(storage, job, base, tick, previous, source, options, inference)
        except BaseException as err:
            entry.update(status="failed", finished=_now_iso(), error=f"{type(err).__name__}: {err}"[:1000])
            try:
                save_series(storage, base, series)
            except Exception:  # keep the original error; the lock's expiry covers the rest
                logger.exception("could not record the failure of tick %s", run_id)
            raise
        entry.update(status="completed", finished=_now_iso(), num_samples=result.num_samples,
                     new_images=result.new_images, checkpoint=join("runs", run_id, ALIGNED_DIR),
                     warm_start_from=result.warm_start_from, drift=drift_metrics(result.drift) if result.drift else {})
        save_series(storage, base, series)
    return result


def _tick(storage: Storage, job: TrainJobConfig, base: str, tick: str, previous: dict[str, Any] | None,
          source: str | None, options: ReclusterOptions, inference: InferenceOptions | None) -> ReclusterResult:
    from pipelines.dataset.ingest import IngestOptions, ingest
    from pipelines.dataset.sources import open_source
    from pipelines.outputs.evaluation import evaluate_assignments, write_metrics
    from pipelines.outputs.inference import run_inference
    from pipelines.training.trainer import run_training

    started = time.monotonic()
    run_id = job.run_id
    added = 0
    if source:
        opened = open_source(source, split=options.split, s3_endpoint=storage.s3_endpoint,
                             s3_region=storage.s3_region)
        added = ingest(storage, job.dataset, opened, IngestOptions(shard_size=options.shard_size,
                                                                   max_pixels=options.max_pixels),
                       source_spec=source, split=options.split).added
    info = load_dataset_info(storage, job.dataset)
    prev_num = int(previous["num_samples"]) if previous else 0
    # The series records checkpoints relative to the storage root (it stays valid if the root moves).
    prev_checkpoint = storage.uri(previous["checkpoint"]) if previous else None
    warm_from = prev_checkpoint if options.warm_start else None
    logger.info("reclustering tick %s of series %s: dataset %s has %d images (%d added now, %d new since %s)", tick,
                base, job.dataset, info.num_samples, added, info.num_samples - prev_num,
                previous["run_id"] if previous else "the start")
    outcome = run_training(job, storage, init_from=warm_from)

    ks = list(job.experiment.secu.ks)
    aligned, alignments, coordinator, prev_coordinator = _publish_aligned(storage, run_id, ks, previous,
                                                                          prev_checkpoint)

    shards = None
    if options.infer_scope == "new":
        shards = [s.name for s in info.shards if s.first_index + s.count > prev_num]
    out_uri, rows, drift_source = None, 0, "training_memory"
    if shards is None or shards:
        inferred = run_inference(storage, run_id, checkpoint=aligned, output_name=DEFAULT_NAME,
                                 options=inference, shards=shards)
        out_uri, rows = inferred.uri, inferred.rows
        if shards is None and previous is not None and _inferred_all(storage, previous["run_id"]):
            drift_source = "assignments"
    else:
        logger.info("no new images since %s: nothing to infer (infer_scope=new)", previous and previous["run_id"])

    drift, record = _write_drift(storage, run_id, base, tick, previous, ks, alignments, drift_source,
                                 coordinator, prev_coordinator)

    report_uri = None
    if out_uri is not None:
        metrics = evaluate_assignments(storage, run_id, DEFAULT_NAME)
        metrics["drift"] = record
        metrics["metrics"].update(drift_metrics(drift))
        write_metrics(storage, run_id, metrics)
        if options.report:
            from pipelines.outputs.report import build_report

            report_uri = build_report(storage, run_id, DEFAULT_NAME).uri
    else:
        write_metrics(storage, run_id, {"run_id": run_id, "output": DEFAULT_NAME, "drift": record,
                                        "metrics": drift_metrics(drift), "note": "no new images: nothing inferred"})
    logger.info("reclustering tick %s done in %.0f s: run %s, %d rows published", tick, time.monotonic() - started,
                run_id, rows)
    previous_id = previous["run_id"] if previous else None
    return ReclusterResult(base=base, tick=tick, run_id=run_id, previous_run_id=previous_id,
                           added=added, num_samples=info.num_samples, new_images=info.num_samples - prev_num,
                           warm_start_from=warm_from, epochs_run=outcome.epochs_run, checkpoint=aligned,
                           assignments=out_uri, rows=rows, drift=drift, report=report_uri)


def _write_drift(storage: Storage, run_id: str, base: str, tick: str, previous: dict[str, Any] | None,
                 ks: list[int], alignments: list[HeadAlignment], drift_source: str, coordinator: CoordinatorState,
                 prev_coordinator: CoordinatorState | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare this tick's labels with the previous tick's (published assignments when both inferred every
    image, else the training memories), write ``runs/<run_id>/drift.json`` and log it; returns (drift, record)."""
    drift: dict[str, Any] = {}
    record: dict[str, Any] = {"run_id": run_id, "series": base, "tick": tick, "created": _now_iso(),
                              "previous_run_id": previous["run_id"] if previous else None,
                              "alignment": alignment_record(alignments)}
    if previous is not None:
        assert prev_coordinator is not None
        if drift_source == "assignments":
            before = _assignment_labels(storage, previous["run_id"], len(ks))
            now = _assignment_labels(storage, run_id, len(ks))
        else:
            before = _memory_labels(prev_coordinator)
            now = _memory_labels(coordinator)
        drift = drift_summary(before, now, ks, alignments)
        record |= drift
    else:
        record["note"] = "first tick of the series: nothing to compare with"
    storage.write_bytes_atomic(join("runs", run_id, DRIFT_FILE),
                               (json.dumps(record, indent=1, default=float) + "\n").encode())
    _log_drift(run_id, drift)
    return drift, record


def _publish_aligned(storage: Storage, run_id: str, ks: list[int], previous: dict[str, Any] | None,
                     prev_checkpoint: str | None
                     ) -> tuple[str, list[HeadAlignment], CoordinatorState, CoordinatorState | None]:
    """Align the run's final checkpoint to the previous tick's stable ids and publish the copy (which inference
    and the next tick read); returns its URI, the matches and the aligned and previous coordinator states."""
    state, coordinator = read_checkpoint(find_latest_checkpoint(storage, run_id))
    prev_state, prev_coordinator = None, None
    if previous is not None:
        assert prev_checkpoint is not None
        prev_state, prev_coordinator = read_checkpoint(checkpoint_at(prev_checkpoint, storage))
    method = build_method(state.job_config().experiment, iters_per_epoch=1)  # which entries are per cluster
    alignments = align_heads(method, None if prev_state is None or prev_coordinator is None
                             else (prev_state, prev_coordinator), (state, coordinator), ks)
    state, coordinator = aligned_checkpoint(state, coordinator, alignments, method)
    extra_meta = {"aligned_to": previous["run_id"] if previous else None, "alignment": alignment_record(alignments)}
    aligned = publish_checkpoint(storage, join("runs", run_id, ALIGNED_DIR), state, coordinator, extra_meta)
    for a in alignments:
        logger.info("head %d: centers matched to %s with mean cosine %.3f (min %.3f), %.0f%% keep their id", a.head,
                    previous["run_id"] if previous else "themselves", a.mean_similarity, a.min_similarity,
                    100 * a.identity_frac)
    return aligned, alignments, coordinator, prev_coordinator


def _inferred_all(storage: Storage, run_id: str) -> bool:
    """True when the run's published assignments cover its whole dataset."""
    try:
        return read_marker(storage, run_id, DEFAULT_NAME).get("scope", "all") == "all"
    except FileNotFoundError:
        return False


def _assignment_labels(storage: Storage, run_id: str, heads: int) -> RunLabels:
    table = read_assignments(storage, run_id, DEFAULT_NAME,
                             columns=["sample_index"] + [cluster_column(h) for h in range(heads)])
    ids = table["sample_index"].to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    labels = np.stack([table[cluster_column(h)].to_numpy().astype(np.int64)[order] for h in range(heads)])
    return RunLabels(ids[order], labels, "assignments")


def _memory_labels(coordinator: CoordinatorState) -> RunLabels:
    labels_HN = previous_labels(coordinator).astype(np.int64)
    return RunLabels(np.arange(labels_HN.shape[1], dtype=np.int64), labels_HN, "training_memory")


def _log_drift(run_id: str, drift: dict[str, Any]) -> None:
    for row in drift.get("heads", []):
        changed = row["changed_frac"]
        logger.info("drift of %s head %d: %s of %d common images changed cluster; %d appeared, %d vanished; "
                    "size TV distance %.3f", run_id, row["head"], "n/a" if changed is None else f"{changed:.1%}",
                    row["compared"], len(row["appeared"]), len(row["vanished"]), row["size_tv"])
