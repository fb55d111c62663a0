"""One training epoch of any clustering method over any batch iterable and any label store (no Ray).

The same function runs in one process over images in memory (``secu.local_train``) and in every Ray
Train worker over its dataset shard with the coordinator as the label store
(``pipelines.training.train_loop``). Collectives, where there are any, happen inside the method
(``secu.distributed``), so every rank must call ``run_epoch`` with the same number of full batches.

A last batch shorter than ``batch_size`` is not trained on (BatchNorm and the per-step schedules want
full batches) but labelled: ``ClusteringMethod.label_step`` gives its images their label of the epoch
and updates the label statistics, so that every image is labelled every epoch and the counters equal a
recount of the memory for any N. With several ranks the short batches must have the same size on every
rank (Ray Train's equal split makes them so); the ranks check that with one collective per epoch and
skip the label step together, with a warning, when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from secu import distributed
from secu.method import Batch, ClusteringMethod, EpochContext, EpochSummary, LabelStore, StepOutput

logger = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """What an epoch did on this rank, with the method's summary."""

    summary: EpochSummary
    steps: int
    """Optimisation steps (full batches)."""
    images: int
    """Images trained on."""
    delivered: int
    """Rows the batch iterable delivered, the last short batch included."""
    labelled_only: int = 0
    """Rows of the last short batch that were labelled without training (``ClusteringMethod.label_step``)."""


def run_epoch(
    method: ClusteringMethod,
    batches: Iterable[Batch],
    store: LabelStore,
    epoch: int,
    *,
    batch_size: int,
    context: EpochContext | None = None,
    on_step: Callable[[int], None] | None = None,
) -> EpochResult:
    """Train ``method`` for one epoch.

    Args:
        method: the clustering method.
        batches: this rank's batches; each has ``sample_index`` (int64 [B]) and the method's inputs.
        store: the labels of the previous epoch (read per batch) and of this one (written per batch).
        epoch: the epoch's index (the store checks it on writes).
        batch_size: this rank's batch size. A shorter batch (the last one) is not trained on but labelled
            (module docstring).
        context: what ``before_epoch`` and ``label_pass`` may use besides the batches.
        on_step: called after every step with the number of steps done in this epoch.
    """
    context = context or EpochContext()
    method.before_epoch(epoch, context)
    steps, images, delivered = 0, 0, 0
    short: Batch | None = None
    for batch in batches:
        ids = batch["sample_index"]
        delivered += int(ids.shape[0])
        if ids.shape[0] < batch_size:
            if short is not None:
                raise ValueError(f"two batches shorter than batch_size={batch_size} in one epoch: only the last "
                                 "batch of an epoch may be short")
            short = batch
            continue
        if short is not None:
            raise ValueError(f"a batch of {int(short['sample_index'].shape[0])} rows came before a full one: only "
                             f"the last batch of an epoch may be shorter than batch_size={batch_size}")
        _write(store, epoch, batch, method.train_step(batch, _stored(store, batch)))
        steps += 1
        images += int(ids.shape[0])
        if on_step is not None:
            on_step(steps)
    labelled_only = 0
    if _same_on_every_rank(0 if short is None else int(short["sample_index"].shape[0])) and short is not None:
        out = method.label_step(short, _stored(store, short))
        if out is not None:
            _write(store, epoch, short, out)
            labelled_only = int(short["sample_index"].shape[0])
    for pass_ids_B, pass_labels_HB in method.label_pass(epoch, context):
        store.write_async(np.asarray(pass_ids_B), np.asarray(pass_labels_HB), epoch)
    store.flush()
    return EpochResult(method.after_epoch(), steps, images, delivered, labelled_only)


def _stored(store: LabelStore, batch: Batch) -> torch.Tensor:
    ids_B = batch["sample_index"].long().cpu().numpy()
    return torch.from_numpy(np.asarray(store.labels_for(ids_B)).astype(np.int64))


def _write(store: LabelStore, epoch: int, batch: Batch, out: StepOutput) -> None:
    if out.labels_HB is None:
        return
    ids_B = batch["sample_index"].long().cpu().numpy()
    labels_HB = out.labels_HB.cpu()
    if out.write_mask_B is not None:
        mask_B = out.write_mask_B.cpu().numpy()
        ids_B, labels_HB = ids_B[mask_B], labels_HB[:, torch.from_numpy(mask_B)]
    store.write_async(ids_B, labels_HB.numpy(), epoch)


def _same_on_every_rank(rows: int) -> bool:
    """True when every rank holds a last short batch of ``rows`` rows (one collective with several ranks)."""
    if not distributed.is_distributed():
        return True
    sizes = distributed.all_gather_cat(torch.tensor([rows], dtype=torch.long)).tolist()
    if len(set(sizes)) == 1:
        return True
    logger.warning("the ranks' last short batches differ in size (%s rows): none is labelled this epoch; "
                   "the images keep their previous label", sizes)
    return False
