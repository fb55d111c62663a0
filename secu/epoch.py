"""One training epoch of any clustering method over any batch iterable and any label store (no Ray).

The same function runs in one process over images in memory (``secu.local_train``) and in every Ray
Train worker over its dataset shard with the coordinator as the label store
(``pipelines.training.train_loop``). Collectives, where there are any, happen inside the method
(``secu.distributed``), so every rank must call ``run_epoch`` with the same number of full batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from secu.method import Batch, ClusteringMethod, EpochContext, EpochSummary, LabelStore


@dataclass
class EpochResult:
    """What an epoch did on this rank, with the method's summary."""

    summary: EpochSummary
    steps: int
    """Optimisation steps (full batches)."""
    images: int
    """Images trained on."""
    delivered: int
    """Rows the batch iterable delivered, the skipped last partial batch included."""


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
        batch_size: this rank's batch size. A shorter batch (the last one) is counted but not trained on:
            BatchNorm needs full batches, and every rank gets the same rows, so all ranks skip it together.
        context: what ``before_epoch`` and ``label_pass`` may use besides the batches.
        on_step: called after every step with the number of steps done in this epoch.
    """
    context = context or EpochContext()
    method.before_epoch(epoch, context)
    steps, images, delivered = 0, 0, 0
    for batch in batches:
        ids = batch["sample_index"]
        delivered += int(ids.shape[0])
        if ids.shape[0] < batch_size:
            continue
        ids_B = ids.long().cpu().numpy()
        stored_HB = torch.from_numpy(np.asarray(store.labels_for(ids_B)).astype(np.int64))
        out = method.train_step(batch, stored_HB)
        if out.labels_HB is not None:
            labels_HB = out.labels_HB.cpu()
            if out.write_mask_B is not None:
                mask_B = out.write_mask_B.cpu().numpy()
                ids_B, labels_HB = ids_B[mask_B], labels_HB[:, torch.from_numpy(mask_B)]
            store.write_async(ids_B, labels_HB.numpy(), epoch)
        steps += 1
        images += int(ids.shape[0])
        if on_step is not None:
            on_step(steps)
    for pass_ids_B, pass_labels_HB in method.label_pass(epoch, context):
        store.write_async(np.asarray(pass_ids_B), np.asarray(pass_labels_HB), epoch)
    store.flush()
    return EpochResult(method.after_epoch(), steps, images, delivered)
