"""The Ray Train worker: an adapter that runs ``secu.epoch.run_epoch`` over the worker's dataset shard with
the coordinator as the label store (``train_loop_per_worker``).

Per worker: context and device, the method of the config (``secu.methods.build_method``) with its networks
wrapped for DDP, restore,
then per epoch ``coordinator.begin_epoch``, ``run_epoch`` (which flushes the label writes), a barrier,
the epoch's counts reduced across ranks, the rank-0 duties in one place (``_close_epoch_on_rank_zero``:
bad-input check, the coordinator's epoch close and statistics, warnings, checkpoint, history) and
``ray.train.report`` on every rank.

Restart semantics: on (re)start rank 0 picks the run's newest intact checkpoint from storage
(``checkpointing.newest_intact_checkpoint``: sizes and checksums checked, a damaged one skipped with a
warning), not Ray Train's record of the last reported one, which can point at a damaged checkpoint or be
missing; every rank loads the one rank 0 picked, and the coordinator is restored to exactly its state,
so labels written after the checkpoint are discarded and the epoch is replayed from its beginning. A run
without a checkpoint of its own starts from the warm start in ``WorkerInputs.warm_start`` when the driver
gave one (``pipelines.training.warm_start``), else fresh.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from pipelines.dataset.bad_input import verify_epoch
from pipelines.dataset.streams import device_views
from pipelines.errors import disk_full
from pipelines.storage import Storage
from pipelines.tracking.training import TrackingHandle, TrainingTracker
from pipelines.training.checkpointing import (
    CheckpointRef,
    TrainingState,
    load_training_state,
    local_checkpoint_dir,
    newest_intact_checkpoint,
    save_checkpoint,
)
from pipelines.training.coordinator import CoordinatorClient
from pipelines.training.fail_fast import no_space
from pipelines.training.job_config import TrainJobConfig
from pipelines.training.metrics_log import MetricsLog, progress
from pipelines.training.warm_start import WarmStart
from secu import distributed
from secu.config import ModelConfig
from secu.cross_rank_bn import convert_cross_rank_batchnorm
from secu.diagnose import collapsed_heads, warn_if_duals_cycle
from secu.epoch import EpochResult, run_epoch
from secu.method import Batch, ClusteringMethod, EpochContext
from secu.methods import build_method

logger = logging.getLogger(__name__)


@dataclass
class WorkerInputs:
    """Everything the driver hands every worker (``train_loop_config={"inputs": WorkerInputs(...)}``)."""

    job: TrainJobConfig
    storage: Storage
    coordinator: CoordinatorClient
    num_samples: int
    bad_input_counter: Any
    """The bad-input counter actor (``pipelines.dataset.bad_input``)."""
    warm_start: Any = None
    """An object ref to a ``WarmStart``, or None."""
    tracking: TrackingHandle | None = None
    """Where rank 0 exports the figures (Ray metrics, the MLflow run); None: nowhere."""


class _RankZeroLogger:
    """Logs on rank 0; a no-op elsewhere (decided once, not in loop bodies)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.info(msg, *args)


def _maybe_fire_fault(job: TrainJobConfig, storage: Storage, kind: str, epoch: int, step: int,
                      coordinator: CoordinatorClient) -> None:
    """Test-only fault injection, fired at most once per run (a marker file records it)."""
    wanted = {tuple(part.split(":")) for part in job.compute.fault_injection.split(",") if part}
    if (kind, str(epoch), str(step)) not in wanted:
        return
    marker = storage.join("runs", job.run_id, f"_fault_{kind}_{epoch}_{step}_fired")
    if storage.exists(marker):
        return
    storage.write_bytes_atomic(marker, b"fired\n")
    if kind == "worker":
        logger.warning("fault injection: killing this training worker at epoch %d step %d", epoch, step)
        os._exit(1)
    logger.warning("fault injection: killing coordinator shard 0 at epoch %d step %d", epoch, step)
    coordinator.kill_shard(0)


_RAY_REPORT_LOGGER_SUFFIX = os.path.join("train", "v2", "_internal", "execution", "context.py")


def _quiet_ray_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` call with the whole metrics dict at INFO, from every rank
    (150 cluster statistics per epoch here); rank 0 already logs one line per epoch. Ray names that logger
    by its source file's path, so it is found among the existing loggers by that suffix (no private import;
    with another Ray layout nothing matches and nothing changes)."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(_RAY_REPORT_LOGGER_SUFFIX):
            logging.getLogger(name).setLevel(logging.WARNING)


def convert_batchnorm(net: nn.Module, model: ModelConfig, world: int, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch when two or more workers train with ``model.sync_bn``: torch's
    SyncBatchNorm on GPUs; on CPU workers (where SyncBatchNorm refuses CPU tensors) ``secu.cross_rank_bn``,
    only with ``model.sync_bn_cpu``. Otherwise ``net`` unchanged: each worker's own batch statistics."""
    if world < 2 or not model.sync_bn:
        return net
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return convert_cross_rank_batchnorm(net) if model.sync_bn_cpu else net


def _prepare_network(job: TrainJobConfig, world: int, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """The DDP wrapper for ``ClusteringMethod.wrap_networks``: ``convert_batchnorm``, then Ray's
    ``prepare_model`` (device placement and DDP)."""
    def wrap(net: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(convert_batchnorm(net, job.experiment.model, world, device))
    return wrap


def _restore(method: ClusteringMethod, inputs: WorkerInputs, rank: int, log: _RankZeroLogger
             ) -> tuple[int, MetricsLog]:
    """Checkpoint of this run, else the warm start, else a fresh start; returns (first epoch, history).

    Rank 0 brings the coordinator to the same point: the checkpoint's state, the warm start's labels,
    or empty (a fresh run must start from an empty memory even if the coordinator saw writes from an
    attempt that died before its first checkpoint)."""
    saved = _resume_state(inputs, rank)
    if saved is not None:
        method.load_state_dict({"network": saved.network, "optimizer": saved.optimizer,
                                "cluster_state": saved.cluster_state, "global_step": saved.global_step})
        return saved.epoch + 1, MetricsLog.from_list(saved.job.get("history", []))
    if inputs.warm_start is not None:
        # Every attempt before the first checkpoint starts from the warm start again.
        warm: WarmStart = ray.get(inputs.warm_start)
        method.load_state_dict({"network": warm.network, "cluster_state": warm.cluster_state})
        if rank == 0:
            inputs.coordinator.load_state_dict(warm.coordinator_state)
        log.info("warm start of run %s from %s (epoch %d of run %s)", inputs.job.run_id, warm.source,
                 warm.source_epoch, warm.source_run_id)
    elif rank == 0:
        inputs.coordinator.reset()
    return 0, MetricsLog()


def _resume_state(inputs: WorkerInputs, rank: int) -> TrainingState | None:
    """The training state of the checkpoint to resume from, the same on every rank (None: no checkpoint).

    Rank 0 chooses the newest intact checkpoint on storage, restores the coordinator from it and tells the
    other ranks which it is; they read its model file."""
    chosen: CheckpointRef | None = None
    state: TrainingState | None = None
    if rank == 0:
        found = newest_intact_checkpoint(inputs.storage, inputs.job.run_id)
        if found is not None:
            chosen, state, coordinator_state = found
            inputs.coordinator.load_state_dict(coordinator_state)
            _log_resume(inputs.job.run_id, chosen, ray.train.get_checkpoint())
    chosen = distributed.broadcast_object(chosen)  # type: ignore[assignment]
    if chosen is None or state is not None:
        return state
    with local_checkpoint_dir(chosen) as directory:
        return load_training_state(directory)


def _log_resume(run_id: str, chosen: CheckpointRef, ray_checkpoint: ray.train.Checkpoint | None) -> None:
    """Say which checkpoint the run resumes from, and when Ray Train's record names another (or none)."""
    logger.info("resumed run %s from the checkpoint of epoch %d (%s)", run_id, chosen.epoch, chosen.label)
    name = os.path.basename(chosen.label.rstrip("/"))
    if ray_checkpoint is None:
        logger.warning("Ray Train has no record of a checkpoint of run %s (its snapshot is missing); resuming from "
                       "the newest intact checkpoint on storage, %s", run_id, name)
    elif os.path.basename(ray_checkpoint.path.rstrip("/")) != name:
        logger.warning("Ray Train's latest checkpoint of run %s is %s, which is damaged or missing; resuming from "
                       "the newest intact one, %s", run_id, os.path.basename(ray_checkpoint.path), name)


def _epoch_metrics(epoch: int, result: EpochResult, elapsed: float) -> tuple[dict[str, Any], int]:
    """The method's metrics with the images trained on, those of the last short batches (labelled, not
    trained on) and the throughput, summed over ranks; and the rows delivered to all ranks (for the
    bad-input check)."""
    summed = distributed.all_reduce_sum(torch.tensor([float(result.images), float(result.delivered),
                                                      float(result.labelled_only)], dtype=torch.float64))
    images_all, delivered_all = float(summed[0]), int(summed[1])
    metrics: dict[str, Any] = {"epoch": epoch, **result.summary.metrics, "data/images": images_all,
                               "data/labelled_only": float(summed[2]),
                               "data/images_per_s": images_all / max(elapsed, 1e-9), "time/epoch_s": elapsed}
    return metrics, delivered_all


def _close_epoch_on_rank_zero(inputs: WorkerInputs, method: ClusteringMethod, result: EpochResult,
                              metrics: dict[str, Any], delivered_all: int, history: MetricsLog, save_now: bool,
                              tmp: str) -> ray.train.Checkpoint | None:
    """Every rank-0 duty at an epoch end; adds the coordinator's statistics to ``metrics``."""
    epoch = int(metrics["epoch"])
    job, world = inputs.job, ray.train.get_context().get_world_size()
    # Rows that never arrived (a damaged shard) count against the bad-input budget. The split gives
    # every rank the same number of rows and may drop up to world - 1 of them.
    bad = verify_epoch(inputs.bad_input_counter, rows_seen=delivered_all + world - 1)
    metrics["data/bad_inputs"] = float(bad.bad)
    closing = result.summary.cluster_state
    metrics.update(inputs.coordinator.end_epoch(
        None if closing is None else [c.numpy() for c in closing.counters],
        None if closing is None else [d.numpy() for d in closing.duals], epoch=epoch))
    if job.experiment.method == "secu":  # SeCu's constraints: the size duals or the entropy term
        warn_if_duals_cycle(metrics, job.experiment)
    for msg in collapsed_heads(metrics, job.experiment, inputs.num_samples):
        logger.warning("%s", msg)
    history.append(metrics)
    if not save_now:
        return None
    state = method.state_dict()  # only when saving: it copies the network to the CPU
    try:
        save_checkpoint(tmp, TrainingState(
            network=state["network"], optimizer=state["optimizer"], cluster_state=state["cluster_state"],
            epoch=epoch, global_step=state["global_step"], job=job.to_dict() | {"history": history.to_list()}),
            inputs.coordinator.state_dict())
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        raise no_space(err, f"the checkpoint of epoch {epoch}", f"the local temporary folder {tmp}",
                       _dir_bytes(tmp)) from err
    try:
        history.write(inputs.storage, job.run_id)
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        raise no_space(err, f"the training history and the checkpoint of epoch {epoch}",
                       inputs.storage.uri("runs", job.run_id), _dir_bytes(tmp)) from err
    return ray.train.Checkpoint.from_directory(tmp)


def _dir_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (what a checkpoint needs, or the part written before the disk filled)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def views_on_device(job: TrainJobConfig, batch_inputs: tuple[str, ...]) -> bool:
    """Whether the workers compute the views from a decode-only stream (``augment.views_on_device``, 'auto'
    = on with GPUs); never for a method without views. The trainer builds the stream by the same answer."""
    return "view1" in batch_inputs and job.experiment.augment.views_on_device_for(job.compute.use_gpu)


def _epoch_context(method: ClusteringMethod, job: TrainJobConfig) -> EpochContext:
    """The feature pass over this worker's part of the ``features`` dataset, for a method that needs one."""
    if not method.needs_feature_pass:
        return EpochContext()
    features = ray.train.get_dataset_shard("features")

    def feature_batches() -> Iterable[Batch]:
        return features.iter_torch_batches(batch_size=job.local_batch_size, dtypes=None, device="cpu")

    return EpochContext(feature_batches=feature_batches)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``loop_config["inputs"]`` is a ``WorkerInputs``)."""
    _quiet_ray_report_log()
    inputs: WorkerInputs = loop_config["inputs"]
    job, coordinator = inputs.job, inputs.coordinator
    exp = job.experiment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _RankZeroLogger(rank == 0)
    tracker = TrainingTracker(inputs.tracking, enabled=rank == 0)
    torch.set_num_threads(job.compute.torch_threads or max(1, int(job.compute.cpus_per_worker)))
    device = ray.train.torch.get_device()
    iters_per_epoch = max(1, (inputs.num_samples // world) // job.local_batch_size)
    method = build_method(exp, iters_per_epoch, device)
    method.wrap_networks(_prepare_network(job, world, device))
    start_epoch, history = _restore(method, inputs, rank, log)
    distributed.barrier()
    shard = ray.train.get_dataset_shard("train")
    context = _epoch_context(method, job)
    on_device = views_on_device(job, method.batch_inputs)
    log.info("training views computed %s", f"on the workers' devices ({device})" if on_device
             else "in the Ray Data stream")

    for epoch in range(start_epoch, exp.optim.epochs):
        t_epoch = time.perf_counter()
        coordinator.begin_epoch(epoch)
        finished = [float(r["time/epoch_s"]) for r in history.to_list() if "time/epoch_s" in r]
        per_epoch = sum(finished) / len(finished) if finished else None

        def on_step(steps: int, epoch: int = epoch, t_epoch: float = t_epoch, per_epoch: float | None = per_epoch
                    ) -> None:
            if steps % job.compute.log_every == 0:
                now = progress(epoch, exp.optim.epochs, steps, iters_per_epoch, job.local_batch_size * world,
                               time.perf_counter() - t_epoch, per_epoch)
                log.info("%s; %s", now.line(), method.progress())
                tracker.progress(now.figures())
            if rank == min(1, world - 1):
                _maybe_fire_fault(job, inputs.storage, "worker", epoch, steps, coordinator)
            if rank == 0:
                _maybe_fire_fault(job, inputs.storage, "coordinator", epoch, steps, coordinator)

        batches = shard.iter_torch_batches(batch_size=job.local_batch_size, drop_last=False, dtypes=None,
                                           device="cpu")
        if on_device:
            batches = device_views(batches, exp.augment, seed=exp.seed, rank=rank, epoch=epoch, device=device)
        result = run_epoch(method, batches, coordinator, epoch, batch_size=job.local_batch_size, context=context,
                           on_step=on_step)
        distributed.barrier()  # every rank has flushed its labels before rank 0 closes the epoch
        elapsed = time.perf_counter() - t_epoch
        metrics, delivered_all = _epoch_metrics(epoch, result, elapsed)
        save_now = ((epoch + 1) % job.compute.checkpoint_every == 0 or epoch == exp.optim.epochs - 1
                    or epoch == job.compute.stop_after_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                ckpt = _close_epoch_on_rank_zero(inputs, method, result, metrics, delivered_all, history,
                                                 save_now, tmp)
            log.info("epoch %d done in %.1fs: %s", epoch, elapsed, MetricsLog.format_line(metrics))
            tracker.epoch_end(metrics)  # a no-op off rank 0, like the logger
            try:
                ray.train.report(metrics, checkpoint=ckpt)
            except (OSError, RuntimeError) as err:  # the checkpoint's upload to the run's storage
                if not disk_full(err):
                    raise
                raise no_space(err, f"the checkpoint of epoch {epoch}", inputs.storage.uri("runs", job.run_id),
                               _dir_bytes(tmp)) from err
        if epoch == job.compute.stop_after_epoch:
            log.info("stopping after epoch %d as configured (compute.stop_after_epoch)", epoch)
            break
    tracker.close()
