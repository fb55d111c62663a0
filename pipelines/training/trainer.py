"""Driver side of training: validate, build the dataset and the coordinator, run ``TorchTrainer``.

Everything a user can get wrong (config, missing dataset, unreachable storage) is checked before
any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.dataset.bad_input import BadInputPolicy, new_bad_input_counter
from pipelines.dataset.info import DatasetInfo, load_dataset_info, load_manifest_labels
from pipelines.dataset.streams import build_eval_dataset, build_train_dataset
from pipelines.run_lock import StorageLock
from pipelines.storage import Storage, join
from pipelines.tracking.mlflow_run import require_mlflow
from pipelines.tracking.training import start_tracking
from pipelines.training.checkpoint_integrity import set_aside_stale_ray_snapshot
from pipelines.training.checkpointing import CHECKPOINTS_DIR, checkpoint_at, list_checkpoints
from pipelines.training.coordinator import CoordinatorClient
from pipelines.training.fail_fast import StopOnDeterministicErrors
from pipelines.training.id_ranges import shard_ranges
from pipelines.training.job_config import TrainJobConfig
from pipelines.training.train_loop import WorkerInputs, train_loop_per_worker, views_on_device
from pipelines.training.warm_start import WarmStart, prepare_warm_start
from secu.adapt import adapt_to_collection
from secu.diagnose import collapsed_heads
from secu.methods import method_class

logger = logging.getLogger(__name__)

TRAIN_LOCK = "_train.lock"
"""Held under ``runs/<run_id>/`` for as long as a driver trains the run."""
TRAIN_LOCK_TTL_S = 7 * 24 * 3600.0
"""After this a lock left by a driver on another host counts as abandoned (one on this host is taken over as
soon as its process is gone, ``pipelines.run_lock.holder_is_gone``)."""


@dataclass
class TrainOutcome:
    """What the driver reports after training."""

    run_id: str
    checkpoint_path: str | None
    metrics: dict[str, Any]
    epochs_run: int
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Collapse warnings for the last epoch (empty clusters, one cluster holding most images)."""


def run_training(job: TrainJobConfig, storage: Storage, *, init_from: str | None = None) -> TrainOutcome:
    """Train (or resume) ``job.run_id`` on the dataset, with checkpoints under the run prefix.

    Args:
        job: The validated job config.
        storage: Where the dataset and the run live.
        init_from: A checkpoint directory (local or ``s3://``), e.g. the previous reclustering run's, to
            warm-start from (``pipelines.training.warm_start``) while this run has no checkpoint of its own; once
            it has one, the run resumes from it and ``init_from`` is not used.
    """
    require_mlflow(job.tracking)  # tracking.mlflow_uri without mlflow installed: fail before anything else
    storage.check_reachable()
    info: DatasetInfo = load_dataset_info(storage, job.dataset)
    job = adapt_job(job, info.num_samples)
    if info.num_samples < job.experiment.optim.batch_size:
        raise ValueError(
            f"dataset {job.dataset!r} has {info.num_samples} images, fewer than the global batch "
            f"optim.batch_size={job.experiment.optim.batch_size}; lower the batch size or ingest more images"
        )
    check_clusters_fit(job, info.num_samples)
    lock = StorageLock(storage, join("runs", job.run_id, TRAIN_LOCK), ttl_s=TRAIN_LOCK_TTL_S,
                       purpose=f"training run {job.run_id}")
    with lock:  # a second training of the same run id is refused (LockHeldError) instead of sharing its checkpoints
        return _fit(job, storage, info, init_from)


def _datasets(job: TrainJobConfig, storage: Storage, policy: BadInputPolicy, counter: Any) -> dict[str, Any]:
    """``train``: the method's training inputs (two views, or with ``augment.views_on_device`` the decoded images
    the workers make them from, or the evaluation image for a method without views);
    ``features``, for a method with a feature pass (ProPos' k-means): every image through the evaluation
    transform, split across the workers like ``train``, its bad input counted by a counter of its own."""
    method = method_class(job.experiment.method)
    augment = job.experiment.augment
    datasets = {"train": build_train_dataset(storage, job.dataset, augment, seed=job.experiment.seed, policy=policy,
                                             counter=counter, views="view1" in method.batch_inputs,
                                             views_on_device=views_on_device(job, method.batch_inputs))}
    if method.needs_feature_pass:
        datasets["features"] = build_eval_dataset(storage, job.dataset, augment, policy=policy).select_columns(
            ["sample_index", "image"])
    return datasets


def _fit(job: TrainJobConfig, storage: Storage, info: DatasetInfo, init_from: str | None) -> TrainOutcome:
    """Everything after the checks: warm start, Ray, dataset, coordinator, ``TorchTrainer.fit``."""
    tracking = start_tracking(job)  # the MLflow run is opened (or refused) before any Ray work
    warm_start = _warm_start(job, storage, init_from, info.num_samples) if init_from else None
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init()
    job = _fit_cpus(job, float(ray.cluster_resources().get("CPU", 0)), local)

    labels = load_manifest_labels(storage, job.dataset, info.num_samples)
    true_labels = labels if bool((labels >= 0).any()) else None
    policy = BadInputPolicy(max_bad_fraction=job.compute.max_bad_fraction)
    bad_input_counter = new_bad_input_counter(info.num_samples, policy)
    datasets = _datasets(job, storage, policy, bad_input_counter)
    coordinator = CoordinatorClient.create(
        run_id=job.run_id, num_samples=info.num_samples, ks=list(job.experiment.secu.ks),
        num_shards=job.compute.coordinator_shards, true_labels=true_labels, label_fetch=job.compute.label_fetch,
    )
    fs, run_path = storage.pyarrow_fs_and_path(storage.join("runs", job.run_id))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": WorkerInputs(
            job=job, storage=storage, coordinator=coordinator, num_samples=info.num_samples,
            bad_input_counter=bad_input_counter, warm_start=None if warm_start is None else ray.put(warm_start),
            tracking=tracking)},
        torch_config=TorchConfig(backend="nccl" if job.compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.compute.num_workers, use_gpu=job.compute.use_gpu,
            resources_per_worker={"CPU": job.compute.cpus_per_worker} | ({"GPU": 1} if job.compute.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=run_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.compute.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.compute.num_to_keep),
            callbacks=[StopOnDeterministicErrors()],  # type: ignore[list-item]  # Ray types the V1 Callback
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(datasets)),
    )
    logger.info("training run %s: %d workers, dataset %s (%d images), checkpoints under %s",
                job.run_id, job.compute.num_workers, job.dataset, info.num_samples,
                storage.join("runs", job.run_id, CHECKPOINTS_DIR))
    set_aside_stale_ray_snapshot(storage, job.run_id)
    try:
        with tracking.finishing(storage):
            result = trainer.fit()
    finally:
        coordinator.shutdown()
    checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    metrics = dict(result.metrics or {})
    return TrainOutcome(run_id=job.run_id, checkpoint_path=checkpoint_path, metrics=metrics,
                        epochs_run=int(metrics.get("epoch", -1)) + 1,
                        warnings=final_warnings(job, metrics, info.num_samples))


def check_clusters_fit(job: TrainJobConfig, num_samples: int) -> None:
    """Every head needs fewer clusters than the collection has images (ValueError before any work)."""
    ks = list(job.experiment.secu.ks)
    if max(ks) > num_samples:
        raise ValueError(
            f"dataset {job.dataset!r} has {num_samples} images but secu.ks={ks} asks for up to {max(ks)} clusters: "
            f"every head needs K <= {num_samples} (and many images per cluster to be useful); lower secu.ks, "
            "e.g. --set secu.ks=[10], or ingest more images")


DATA_CPUS = 1.0
"""CPUs a CPU training run leaves to Ray Data (reading, decoding, augmenting) on a cluster of fixed size."""


def cpus_per_worker_that_fit(workers: int, cpus_per_worker: float, cluster_cpus: float) -> float | None:
    """A smaller ``compute.cpus_per_worker`` when ``workers`` of them leave less than ``DATA_CPUS`` of
    ``cluster_cpus`` to the data stage (which would then wait forever), else None (it fits as asked)."""
    if cluster_cpus - workers * cpus_per_worker >= DATA_CPUS:
        return None
    return max(0.1, int(20 * (cluster_cpus - DATA_CPUS) / workers) / 20)


def _fit_cpus(job: TrainJobConfig, cluster_cpus: float, local: bool) -> TrainJobConfig:
    """On the local Ray this driver started (fixed size), shrink the workers' CPU reservation so that the
    data stage keeps ``DATA_CPUS``; on a cluster that may autoscale, say what the run waits for."""
    if job.compute.use_gpu:
        return job
    workers, per_worker = job.compute.num_workers, job.compute.cpus_per_worker
    fitted = cpus_per_worker_that_fit(workers, per_worker, cluster_cpus)
    if fitted is None:
        return job
    if local:
        logger.warning(
            "%d workers x %.2f CPUs would take %.0f of this machine's %.0f CPUs and leave none to read and augment "
            "the data (Ray Data would wait forever): using compute.cpus_per_worker=%.2f (set it, or fewer "
            "compute.num_workers, to choose)", workers, per_worker, workers * per_worker, cluster_cpus, fitted)
        return dataclasses.replace(job, compute=dataclasses.replace(job.compute, cpus_per_worker=fitted))
    logger.warning(
        "the run asks for %d workers x %.2f CPUs and the cluster has %.0f CPUs now, leaving less than %.0f for the "
        "data stage: it waits for the autoscaler to add nodes (on a fixed-size cluster set "
        "compute.cpus_per_worker=%.2f or fewer compute.num_workers)", workers, per_worker, cluster_cpus, DATA_CPUS,
        fitted)
    return job


def adapt_job(job: TrainJobConfig, num_samples: int) -> TrainJobConfig:
    """``job`` with the schedule adapted to the collection (``secu.adapt``), logged; the run id is kept."""
    adapted = adapt_to_collection(job.experiment, num_samples, job.compute.num_workers)
    logger.info("run %s: %s", job.run_id, adapted.describe(num_samples))
    if not adapted.changes:
        return job
    return dataclasses.replace(job, experiment=adapted.experiment)


def final_warnings(job: TrainJobConfig, metrics: dict[str, Any], num_samples: int) -> list[str]:
    """Collapse warnings (``secu.diagnose``) for the last epoch's memory, for the job's final lines."""
    return collapsed_heads(metrics, job.experiment, num_samples) if "epoch" in metrics else []


def _warm_start(job: TrainJobConfig, storage: Storage, init_from: str, num_samples: int) -> WarmStart | None:
    """The warm start from ``init_from`` (recorded in runs/<run_id>/warm_start.json), or None when the run
    already has a checkpoint of its own (it resumes from that instead)."""
    if list_checkpoints(storage, job.run_id):
        logger.info("run %s has checkpoints of its own: resuming from them, not warm-starting from %s",
                    job.run_id, init_from)
        return None
    ref = checkpoint_at(init_from, storage)
    warm = prepare_warm_start(ref, job, num_samples, shard_ranges(num_samples, job.compute.coordinator_shards))
    record = warm.summary()
    storage.write_bytes_atomic(storage.join("runs", job.run_id, "warm_start.json"),
                               (json.dumps(record, indent=1) + "\n").encode())
    logger.info("run %s warm-starts from %s (epoch %d): %d previous labels, %d new images start unlabelled",
                job.run_id, ref.label, warm.source_epoch, warm.previous_num_samples, record["new_samples"])
    return warm
