"""Self-labeling on Ray Train: fine-tune a trained clustering run's encoder and one head (``secu.self_label``).

``run_self_label`` starts from the latest checkpoint of ``source_run_id`` and trains a new run
``run_id``: every epoch Ray Data streams a weak view (mild crop and flip) and a strong view (the recipe's
second view) of every image, each worker takes targets from the weak view's confident instances and
steps AdamW on the class-balanced cross-entropy of the strong view (DDP over the encoder and the head's
centers). Rank 0 saves a checkpoint every epoch in the training checkpoint format
(``pipelines.training.checkpointing``: the network, this stage's optimizer, the source's cluster state and
coordinator state, the job config with ``stage: self_label`` in its history), so ``jobs.infer``,
``jobs.evaluate`` and ``jobs.report`` take the new run id as they take any other, a stopped run resumes
from its own last checkpoint, and a worker lost mid-epoch is replayed from it (``compute.max_failures``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from pipelines.dataset.bad_input import BadInputPolicy, new_bad_input_counter
from pipelines.dataset.info import load_dataset_info
from pipelines.dataset.streams import build_train_dataset
from pipelines.storage import Storage
from pipelines.training.checkpointing import (
    CHECKPOINTS_DIR,
    TrainingState,
    find_latest_checkpoint,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.fail_fast import StopOnDeterministicErrors
from pipelines.training.job_config import TrainJobConfig, apply_job_overrides
from pipelines.training.metrics_log import MetricsLog
from pipelines.training.trainer import TrainOutcome
from secu import distributed
from secu.augment import normalize
from secu.local_train import weak_augment_config
from secu.network import build_network
from secu.self_label import HeadClassifier, self_label_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SelfLabelSource:
    """What the stage starts from: the clustering run's last checkpoint (loaded on the driver once)."""

    run_id: str
    label: str
    epoch: int
    network: dict[str, torch.Tensor]
    cluster_state: dict[str, Any]
    coordinator_state: CoordinatorState


def load_source(storage: Storage, source_run_id: str) -> tuple[SelfLabelSource, TrainJobConfig]:
    """The source run's latest checkpoint and its job config."""
    ref = find_latest_checkpoint(storage, source_run_id)
    state, coordinator_state = read_checkpoint(ref)
    job = state.job_config()
    if state.cluster_state is None or job.experiment.method != "secu":
        raise ValueError(f"run {source_run_id!r} was trained with method={job.experiment.method}; self-labeling "
                         "fine-tunes SeCu's encoder and centers, so it needs a run trained with method=secu")
    return SelfLabelSource(source_run_id, ref.label, state.epoch, state.network, state.cluster_state.state_dict(),
                           coordinator_state), job


def self_label_job(source_job: TrainJobConfig, run_id: str, overrides: list[str], dataset: str | None = None
                   ) -> TrainJobConfig:
    """The stage's job: the source's config with ``run_id``, the dataset and ``--set`` overrides
    (``self_label.*``, ``compute.*``)."""
    job = dataclasses.replace(source_job, run_id=run_id, dataset=dataset or source_job.dataset)
    return apply_job_overrides(job, overrides)


def run_self_label(storage: Storage, source_run_id: str, run_id: str, overrides: list[str] | None = None,
                   dataset: str | None = None) -> TrainOutcome:
    """Fine-tune ``source_run_id`` by self-labeling into the new run ``run_id`` (resumes when it has
    checkpoints of its own)."""
    storage.check_reachable()
    if run_id == source_run_id:
        raise ValueError(f"--run-id {run_id} is the source run: self-labeling writes a new run, give it its own id")
    source, source_job = load_source(storage, source_run_id)
    job = self_label_job(source_job, run_id, overrides or [], dataset)
    sl = job.experiment.self_label
    info = load_dataset_info(storage, job.dataset)
    if info.num_samples < sl.batch_size:
        raise ValueError(f"dataset {job.dataset!r} has {info.num_samples} images, fewer than one batch of "
                         f"self_label.batch_size={sl.batch_size}; lower it")
    if sl.batch_size % job.compute.num_workers:
        raise ValueError(f"self_label.batch_size={sl.batch_size} must be a multiple of compute.num_workers="
                         f"{job.compute.num_workers}")
    if not ray.is_initialized():
        ray.init()
    policy = BadInputPolicy(max_bad_fraction=job.compute.max_bad_fraction)
    counter = new_bad_input_counter(info.num_samples, policy)
    dataset_ = build_train_dataset(storage, job.dataset, job.experiment.augment, seed=job.experiment.seed + 101,
                                   policy=policy, counter=counter, weak=weak_augment_config(job.experiment))
    fs, run_path = storage.pyarrow_fs_and_path(storage.join("runs", run_id))
    trainer = TorchTrainer(
        self_label_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "source": ray.put(source), "storage": storage,
                           "num_samples": info.num_samples},
        torch_config=TorchConfig(backend="nccl" if job.compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.compute.num_workers, use_gpu=job.compute.use_gpu,
            resources_per_worker={"CPU": job.compute.cpus_per_worker} | ({"GPU": 1} if job.compute.use_gpu else {})),
        run_config=RunConfig(name=CHECKPOINTS_DIR, storage_path=run_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.compute.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.compute.num_to_keep),
                             callbacks=[StopOnDeterministicErrors()]),  # type: ignore[list-item]
        datasets={"train": dataset_},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    logger.info("self-labeling run %s from %s (epoch %d of run %s): head %d, threshold %.3g, %d epochs, %d workers",
                run_id, source.label, source.epoch, source_run_id, sl.head, sl.threshold, sl.epochs,
                job.compute.num_workers)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return TrainOutcome(run_id=run_id, checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                        metrics=metrics, epochs_run=int(metrics.get("epoch", -1)) + 1)


def self_label_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker of the stage."""
    job = TrainJobConfig.from_dict(loop_config["job"])
    source: SelfLabelSource = ray.get(loop_config["source"])
    storage: Storage = loop_config["storage"]
    exp, sl = job.experiment, job.experiment.self_label
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.compute.torch_threads or max(1, int(job.compute.cpus_per_worker)))
    device = ray.train.torch.get_device()

    net = build_network(exp)
    net.load_state_dict(source.network)
    classifier: nn.Module = HeadClassifier(net, sl.head, exp.secu.tw)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=sl.lr, weight_decay=sl.weight_decay)
    start_epoch, global_step, history = 0, 0, MetricsLog()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = load_training_state(ckpt_dir)
        net.load_state_dict(saved.network)
        optimizer.load_state_dict(saved.optimizer)
        start_epoch, global_step = saved.epoch + 1, saved.global_step
        history = MetricsLog.from_list(saved.job.get("history", []))
    classifier = ray.train.torch.prepare_model(classifier)
    local_batch = sl.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    mean, std = exp.augment.mean, exp.augment.std
    for epoch in range(start_epoch, sl.epochs):
        t0 = time.perf_counter()
        classifier.train()
        loss_sum, conf_sum, steps = 0.0, 0.0, 0
        for batch in shard.iter_torch_batches(batch_size=local_batch, drop_last=False, dtypes=None, device="cpu"):
            if batch["sample_index"].shape[0] < local_batch:
                continue  # every rank gets the same rows, so all skip the partial batch together
            weak = normalize(batch["view1"].to(device), mean, std)
            strong = normalize(batch["view2"].to(device), mean, std)
            res = self_label_step(classifier, weak, strong, sl.threshold, sl.per_cluster_frac)
            optimizer.zero_grad(set_to_none=True)
            res.loss.backward()  # every rank steps (DDP needs the collective), a zero loss moves nothing
            if res.confident_frac > 0 or world > 1:
                optimizer.step()
            loss_sum, conf_sum, steps, global_step = (loss_sum + float(res.loss.detach()),
                                                      conf_sum + res.confident_frac, steps + 1, global_step + 1)
        figures = distributed.all_reduce_mean(torch.tensor([loss_sum, conf_sum]) / max(steps, 1))
        metrics: dict[str, Any] = {"epoch": epoch, "stage": "self_label", "self_label/loss": float(figures[0]),
                   "self_label/confident_frac": float(figures[1]), "train/steps": steps,
                   "time/epoch_s": time.perf_counter() - t0}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                job_dict = job.to_dict() | {"history": history.to_list()}
                save_checkpoint(tmp, TrainingState(
                    network={k: v.detach().cpu() for k, v in net.state_dict().items()},
                    optimizer=optimizer.state_dict(),
                    cluster_state=_cluster_state(source), epoch=epoch, global_step=global_step, job=job_dict),
                    source.coordinator_state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                history.write(storage, job.run_id)
                logger.info("self-labeling epoch %d: loss %.4f, %.1f%% of the images confident, %.1fs", epoch,
                            figures[0], 100 * float(figures[1]), time.perf_counter() - t0)
            ray.train.report(metrics, checkpoint=ckpt)


def _cluster_state(source: SelfLabelSource) -> Any:
    from secu.state import ClusterState

    return ClusterState.from_state_dict(source.cluster_state)
