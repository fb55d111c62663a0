"""The one training loop, run by every Ray Train worker (``train_loop_per_worker``).

Per epoch: snapshot the centers, fetch the previous epoch's labels from the coordinator once
(object store, zero-copy), then for every batch run ``secu.step.secu_step``, step the optimizer and
send the new labels to the coordinator asynchronously in batches. At the epoch end all ranks flush,
rank 0 closes the epoch on the coordinator (statistics, buffer swap) and saves the checkpoint, and
every rank calls ``ray.train.report``.

Restart semantics: on (re)start the loop loads the latest checkpoint and restores the coordinator
to exactly the checkpoint's state, so labels written after the checkpoint are discarded and the
epoch is replayed from its beginning. A run without a checkpoint of its own starts from the warm start
in ``loop_config["warm_start"]`` when the driver gave one (``pipelines.training.warm_start``), else fresh.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from pipelines.dataset.bad_input import verify_epoch
from pipelines.storage import Storage
from pipelines.training.checkpointing import (
    TrainingState,
    build_network,
    load_coordinator_state,
    load_training_state,
    save_checkpoint,
)
from pipelines.training.coordinator import CoordinatorClient
from pipelines.training.job_config import TrainJobConfig
from pipelines.training.metrics_log import MetricsLog
from pipelines.training.warm_start import WarmStart
from secu import distributed
from secu.augment import normalize
from secu.config import ExperimentConfig
from secu.diagnose import collapse_from_stats
from secu.network import SeCuNetwork
from secu.optim import build_optimizer, set_learning_rates
from secu.schedules import lr_schedule
from secu.state import ClusterState
from secu.step import secu_step

logger = logging.getLogger(__name__)


class _RankZeroLogger:
    """Logs on rank 0; a no-op elsewhere (decided once, not in loop bodies)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.info(msg, *args)


def _unwrap(net: nn.Module) -> SeCuNetwork:
    base = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    assert isinstance(base, SeCuNetwork)
    return base


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


CYCLE_CHANGED_FRAC = 0.25
"""Share of stored labels changed in an epoch from which a high batch share counts as cycling duals."""


def cycling_heads(metrics: dict[str, Any], exp: ExperimentConfig) -> list[int]:
    """Heads whose size-constraint duals look locked in a cycle in this epoch's ``metrics``.

    The signature (docs/benchmarks.md, "Small-data stability"): after the warm-up, one cluster takes a
    median of at least 1.8/K (and at least half) of each global batch while a quarter or more of the stored
    labels change in the epoch: the duals, which move by up to dual_lr * lratio / K per step, exceed the
    cost margins between centers and hand the batch to one cluster after another.
    """
    if exp.secu.constraint != "size" or metrics["epoch"] <= exp.optim.warmup_epochs:
        return []
    return [h for h, k in enumerate(exp.secu.ks)
            if k >= 3 and metrics.get(f"clusters/h{h}/largest_batch_share", 0.0) >= max(0.5, 1.8 / k)
            and metrics.get(f"clusters/h{h}/changed_frac", 0.0) >= CYCLE_CHANGED_FRAC]


def warn_if_duals_cycle(metrics: dict[str, Any], exp: ExperimentConfig) -> list[int]:
    """Log a warning for every head of ``cycling_heads``; returns those heads."""
    heads = cycling_heads(metrics, exp)
    for h in heads:
        k = exp.secu.ks[h]
        logger.warning(
            "epoch %d, head %d (K=%d): one cluster took a median %.0f%% of each batch and %.0f%% of the "
            "stored labels changed: the size-constraint duals look locked in a cycle (each step sends most "
            "of its batch to one cluster in turn), so these clusters are not settling. It happens when a "
            "dual's step dual_lr * lratio / K = %.3g exceeds the cost margins between centers, typically "
            "with few images per cluster; see 'Small-data stability' in docs/benchmarks.md",
            metrics["epoch"], h, k, 100 * metrics[f"clusters/h{h}/largest_batch_share"],
            100 * metrics[f"clusters/h{h}/changed_frac"], exp.secu.dual_lr * exp.secu.lratio / k)
    return heads


def collapsed_heads(metrics: dict[str, Any], exp: ExperimentConfig, num_samples: int) -> list[str]:
    """Warnings (``secu.diagnose``) for heads whose memory has empty clusters or one cluster holding most of
    the images at this epoch's end; none during the warm-up, when clusters are still forming."""
    if metrics["epoch"] < exp.optim.warmup_epochs:
        return []
    out = []
    for h, k in enumerate(exp.secu.ks):
        labelled = round(metrics.get(f"clusters/h{h}/labelled_frac", 0.0) * num_samples)
        msg = collapse_from_stats(h, k, int(metrics.get(f"clusters/h{h}/empty", 0)),
                                  float(metrics.get(f"clusters/h{h}/max_size_frac", 0.0)), labelled,
                                  where=f"the training memory after epoch {metrics['epoch']}")
        if msg:
            out.append(msg)
    return out


def _quiet_ray_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` call with the whole metrics dict at INFO, from every rank
    (150 cluster statistics per epoch here). Rank 0 already logs one line per epoch; keep Ray's at WARNING.
    Ray names that logger by its file path (``logging.getLogger(__file__)``), hence the lookup."""
    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # a Ray version without that module does not log that line
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    _quiet_ray_report_log()
    job = TrainJobConfig.from_dict(loop_config["job"])
    storage: Storage = loop_config["storage"]
    coordinator: CoordinatorClient = loop_config["coordinator"]
    num_samples: int = loop_config["num_samples"]
    bad_input_counter = loop_config["bad_input_counter"]
    exp = job.experiment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _RankZeroLogger(rank == 0)
    torch.set_num_threads(job.compute.torch_threads or max(1, int(job.compute.cpus_per_worker)))
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda" and exp.optim.mixed_precision

    net: nn.Module = build_network(exp)
    if world > 1 and exp.model.sync_bn and device.type == "cuda":
        # SyncBatchNorm needs GPU tensors; on CPU every worker keeps its own batch statistics.
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = ray.train.torch.prepare_model(net)
    base = _unwrap(net)
    optimizer = build_optimizer(base.encoder.parameters(), base.centers.parameters(), exp.optim)

    iters_per_epoch = max(1, (num_samples // world) // job.local_batch_size)
    lrs, clrs = lr_schedule(iters_per_epoch, exp.optim)
    state = ClusterState.create(exp.secu.ks)
    start_epoch, global_step = 0, 0
    history = MetricsLog()

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = load_training_state(ckpt_dir)
            base.load_state_dict(saved.network)
            optimizer.load_state_dict(saved.optimizer)
            state = saved.cluster_state
            start_epoch, global_step = saved.epoch + 1, saved.global_step
            coord_state = load_coordinator_state(ckpt_dir)
            history = MetricsLog.from_list(saved.job.get("history", []))
        if rank == 0:
            coordinator.load_state_dict(coord_state)
        log.info("resumed run %s from the checkpoint of epoch %d", job.run_id, saved.epoch)
    elif loop_config.get("warm_start") is not None:
        # No checkpoint of its own yet: start from the previous run's network, duals and labels
        # (pipelines.training.warm_start); every attempt before the first checkpoint starts from it again.
        warm: WarmStart = ray.get(loop_config["warm_start"])
        base.load_state_dict(warm.network)
        state = warm.cluster_state
        if rank == 0:
            coordinator.load_state_dict(warm.coordinator_state)
        log.info("warm start of run %s from %s (epoch %d of run %s)", job.run_id, warm.source,
                 warm.source_epoch, warm.source_run_id)
    elif rank == 0:
        # A fresh run must start from an empty memory even if the coordinator saw writes from an
        # attempt that died before its first checkpoint.
        coordinator.reset()
    distributed.barrier()

    shard = ray.train.get_dataset_shard("train")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and exp.optim.mixed_precision)
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    for epoch in range(start_epoch, exp.optim.epochs):
        t_epoch = time.perf_counter()
        net.train()
        snapshot = [p.to(device) for p in base.centers.snapshot()]
        coordinator.begin_epoch(epoch)
        sums = {"loss": 0.0, "loss_center": 0.0, "loss_repr": 0.0, "changed": 0.0}
        shares_HS: list[list[float]] = [[] for _ in exp.secu.ks]
        steps, images, delivered = 0, 0, 0
        for batch in shard.iter_torch_batches(batch_size=job.local_batch_size, drop_last=False,
                                              dtypes=None, device="cpu"):
            delivered += int(batch["sample_index"].shape[0])
            if batch["sample_index"].shape[0] < job.local_batch_size:
                # The last partial batch is counted but not trained on (BatchNorm needs full batches;
                # every rank gets the same rows, so all ranks skip it together).
                continue
            t = min(epoch * iters_per_epoch + steps, len(lrs) - 1)
            set_learning_rates(optimizer, float(lrs[t]), float(clrs[t]))
            ids = batch["sample_index"].long()
            view1 = normalize(batch["view1"].to(device, non_blocking=True), exp.augment.mean, exp.augment.std)
            view2 = normalize(batch["view2"].to(device, non_blocking=True), exp.augment.mean, exp.augment.std)
            prev = torch.from_numpy(coordinator.labels_for(ids.numpy()).astype(np.int64))
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                result = secu_step(net, view1, view2, ids.to(device), prev.to(device), snapshot, state, exp.secu)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            state = result.state
            mask = result.write_mask_B.cpu()
            coordinator.write_async(ids[mask].numpy(), result.labels_HB[:, mask].cpu().numpy(), epoch)
            sums["loss"] += float(result.loss.detach())
            sums["loss_center"] += result.loss_center
            sums["loss_repr"] += result.loss_repr
            for h, share in enumerate(result.largest_share_H):
                shares_HS[h].append(share)
            steps += 1
            images += ids.shape[0]
            global_step += 1
            if steps % job.compute.log_every == 0:
                log.info("epoch %d step %d/%d loss %.4f (center %.4f, repr %.4f) lr %.4g clr %.4g",
                         epoch, steps, iters_per_epoch, sums["loss"] / steps, sums["loss_center"] / steps,
                         sums["loss_repr"] / steps, lrs[t], clrs[t])
            if rank == min(1, world - 1):
                _maybe_fire_fault(job, storage, "worker", epoch, steps, coordinator)
            if rank == 0:
                _maybe_fire_fault(job, storage, "coordinator", epoch, steps, coordinator)

        coordinator.flush()
        distributed.barrier()
        elapsed = time.perf_counter() - t_epoch
        images_all = float(distributed.all_reduce_sum(torch.tensor(float(images))))
        delivered_all = int(distributed.all_reduce_sum(torch.tensor(float(delivered))))
        if rank == 0:
            # Rows that never arrived (a damaged shard) count against the bad-input budget. The split
            # gives every rank the same number of rows and may drop up to world - 1 of them.
            verify_epoch(bad_input_counter, rows_seen=delivered_all + world - 1)
        loss_terms = distributed.all_reduce_mean(
            torch.tensor([sums["loss"], sums["loss_center"], sums["loss_repr"]]) / max(steps, 1)
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train/loss": float(loss_terms[0]),
            "train/loss_center": float(loss_terms[1]),
            "train/loss_repr": float(loss_terms[2]),
            "train/lr": float(lrs[min((epoch + 1) * iters_per_epoch, len(lrs)) - 1]),
            "train/clr": float(clrs[min((epoch + 1) * iters_per_epoch, len(clrs)) - 1]),
            "train/steps": steps,
            "data/images": images_all,
            "data/images_per_s": images_all / max(elapsed, 1e-9),
            "time/epoch_s": elapsed,
        }
        # The same on every rank (computed from the gathered labels).
        metrics.update({f"clusters/h{h}/largest_batch_share": float(np.median(s)) if s else 0.0
                        for h, s in enumerate(shares_HS)})
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(
                f"epoch {epoch}: the training loss is {metrics['train/loss']}; lower optim.lr or optim.clr"
            )
        if rank == 0:
            metrics.update(coordinator.end_epoch(
                [c.numpy() for c in state.counters], [d.numpy() for d in state.duals]))
            warn_if_duals_cycle(metrics, exp)
            for msg in collapsed_heads(metrics, exp, num_samples):
                logger.warning("%s", msg)
        state = state.at_epoch_end(exp.secu.constraint)
        history.append(metrics)
        save_now = ((epoch + 1) % job.compute.checkpoint_every == 0 or epoch == exp.optim.epochs - 1
                    or epoch == job.compute.stop_after_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if save_now and rank == 0:
                job_dict = job.to_dict() | {"history": history.to_list()}
                save_checkpoint(tmp, TrainingState(
                    network={k: v.detach().cpu() for k, v in base.state_dict().items()},
                    optimizer=optimizer.state_dict(), cluster_state=state, epoch=epoch,
                    global_step=global_step, job=job_dict), coordinator.state_dict())
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                history.write(storage, job.run_id)
            log.info("epoch %d done in %.1fs: %s", epoch, elapsed, MetricsLog.format_line(metrics))
            ray.train.report(metrics, checkpoint=ckpt)
        if epoch == job.compute.stop_after_epoch:
            log.info("stopping after epoch %d as configured (compute.stop_after_epoch)", epoch)
            break
