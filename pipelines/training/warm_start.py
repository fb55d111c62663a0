"""Warm start: begin a new training run from another run's checkpoint (scheduled reclustering).

A warm-started run is a fresh run (epoch 0, fresh optimizer and learning-rate schedule) whose
network (encoder + centers) and cluster state (duals; entropy counters) come from a checkpoint of a
previous run, and whose assignment memory starts with the previous run's labels for the ids that
existed then; ids added since (ingest appends new ids, never reuses one) start at -1, so SeCu treats
them like first-epoch instances (SeCu, ICCV 2023, Sec. 3.3: the representation loss uses the stored
label when there is one).

It applies only while the new run has no checkpoint of its own: a restart or a resubmission of the
run resumes from its own checkpoint instead (``pipelines.training.train_loop``).

Legend: H = heads, K = clusters of a head, N_old / N = ids of the previous / the new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.training.checkpointing import CheckpointRef, read_checkpoint
from pipelines.training.coordinator_state import CoordinatorState, ShardState, label_dtype
from pipelines.training.job_config import TrainJobConfig
from secu.methods import build_method
from secu.state import ClusterState


@dataclass
class WarmStart:
    """What a warm-started run loads at its start (built on the driver, sent to the workers once)."""

    source: str
    """The checkpoint it comes from (for logs and ``warm_start.json``)."""
    source_run_id: str | None
    source_epoch: int
    network: dict[str, torch.Tensor]
    """State dict of the previous method's networks (SeCu: encoder + centers), loaded by every rank."""
    cluster_state: ClusterState | None
    """SeCu: duals of the previous run, counters consistent with the seeded memory (see ``seed_cluster_state``);
    None for the other methods."""
    coordinator_state: CoordinatorState
    """The coordinator state at epoch 0 for the new run's id ranges, loaded by rank 0."""
    previous_num_samples: int
    """N_old: ids [0, N_old) carry the previous labels, ids [N_old, N) start at -1."""

    def summary(self) -> dict[str, Any]:
        """Small JSON-serialisable record (written to ``runs/<run_id>/warm_start.json``)."""
        total = self.coordinator_state.num_samples
        return {"source": self.source, "source_run_id": self.source_run_id, "source_epoch": self.source_epoch,
                "previous_num_samples": self.previous_num_samples, "num_samples": total,
                "new_samples": total - self.previous_num_samples}


def previous_labels(coordinator_state: CoordinatorState) -> np.ndarray:
    """The labels [H, N_old] of a checkpointed coordinator (its shards concatenated in id order)."""
    return coordinator_state.labels()


def seeded_coordinator_state(labels_HM: np.ndarray, num_samples: int, ranges: list[tuple[int, int]],
                             ks: list[int]) -> CoordinatorState:
    """A coordinator state at epoch 0 whose memory holds ``labels_HM`` for ids [0, M) and -1 after.

    Raises:
        ValueError: M > num_samples (the dataset lost ids: not the previous run's dataset), or the
            labels do not fit ``ks``.
    """
    heads, m = labels_HM.shape
    if m > num_samples:
        raise ValueError(
            f"the previous run had {m} images but the dataset now has {num_samples}: ids are never removed, so "
            "this is another dataset; start a new reclustering series (another --run-id) or disable the warm start"
        )
    if heads != len(ks) or (labels_HM.max(axis=1, initial=-1) >= np.asarray(ks)).any():
        raise ValueError(f"previous labels of {heads} heads do not fit ks={ks}: the warm start needs the same ks")
    full_HN = np.full((heads, num_samples), -1, dtype=label_dtype(ks))
    full_HN[:, :m] = labels_HM
    shards = tuple(ShardState(lo=lo, hi=hi, ks=tuple(ks), epoch=0, prev_HN=full_HN[:, lo:hi].copy())
                   for lo, hi in ranges)
    return CoordinatorState(ranges=tuple(ranges), ks=tuple(ks), shards=shards)


def seed_cluster_state(previous: ClusterState, labels_HN: np.ndarray, ks: list[int], constraint: str) -> ClusterState:
    """Counters and duals for epoch 0 of the warm-started run.

    The duals (size constraint) carry over. Entropy counters track the sizes of the assignment memory
    (``secu.constraints.entropy_update_counters`` moves an instance from its stored cluster to the new
    one), so they are recounted from the seeded memory; size counters only log one epoch and start at 0.
    """
    duals = [d.clone().to(torch.float64) for d in previous.duals]
    if constraint == "entropy":
        counters = [torch.from_numpy(np.bincount(labels_HN[h][labels_HN[h] >= 0], minlength=k).astype(np.float64))
                    for h, k in enumerate(ks)]
    else:
        counters = [torch.zeros(k, dtype=torch.float64) for k in ks]
    return ClusterState(counters=counters, duals=duals)


def prepare_warm_start(ref: CheckpointRef, job: TrainJobConfig, num_samples: int,
                       ranges: list[tuple[int, int]]) -> WarmStart:
    """Load ``ref`` and build the warm start of ``job`` (N = ``num_samples`` ids split into ``ranges``).

    Raises:
        FileNotFoundError: The checkpoint has no coordinator state.
        ValueError: The checkpoint's network or ks do not fit ``job`` (the message says what differs).
    """
    saved, coord = read_checkpoint(ref)
    ks = list(job.experiment.secu.ks)
    prev_job = saved.job_config()
    if prev_job.experiment.method != job.experiment.method:
        raise ValueError(
            f"warm start from {ref.label}: it was trained with method={prev_job.experiment.method}, this run uses "
            f"method={job.experiment.method}; use the same method or start a new series without a warm start")
    if list(prev_job.experiment.secu.ks) != ks:
        raise ValueError(
            f"warm start from {ref.label}: it has ks={list(prev_job.experiment.secu.ks)}, this run ks={ks}; "
            "use the same secu.ks or start a new series without a warm start"
        )
    try:  # the exact architecture check: the previous weights must load into this run's network
        build_method(job.experiment, iters_per_epoch=1).load_state_dict({"network": saved.network,
                                                                         "cluster_state": saved.cluster_state})
    except RuntimeError as err:
        raise ValueError(
            f"warm start from {ref.label}: its network does not fit this run's model config ({str(err)[:300]}); "
            "use the previous run's model settings or start a new series without a warm start"
        ) from None
    labels_HM = previous_labels(coord)
    state = seeded_coordinator_state(labels_HM, num_samples, ranges, ks)
    full_HN = state.labels()
    cluster_state = None if saved.cluster_state is None else seed_cluster_state(
        saved.cluster_state, full_HN, ks, job.experiment.secu.constraint)
    return WarmStart(source=ref.label, source_run_id=ref.run_id, source_epoch=saved.epoch, network=saved.network,
                     cluster_state=cluster_state, coordinator_state=state, previous_num_samples=labels_HM.shape[1])
