"""Words for a clustering that went wrong: empty clusters, or one cluster holding most of the images.

Pure functions over cluster sizes, used by the training log (the memory at each epoch end), the
evaluation table and ``metrics.json`` (the published assignments), the report and the jobs' final
lines. A head is flagged when

- some of its K clusters are empty, or
- its largest cluster holds more than ``max(0.5, 3 / K)`` of the images (3 N / K is the bound the
  robustness benchmark holds balanced collections to; a collection whose largest class really holds
  half the images and more is itself extreme: say so and it is worth a look anyway).

The message names the likely cause and the settings to change (docs/benchmarks.md, "Robustness").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from secu.config import ExperimentConfig

logger = logging.getLogger(__name__)

LARGEST_SHARE_MIN = 0.5
"""A head whose largest cluster holds more than max(this, 3/K) of the images is flagged."""


def largest_share_limit(k: int) -> float:
    """The share of the images above which one cluster of K counts as collapsed."""
    return max(LARGEST_SHARE_MIN, 3.0 / k)


def collapse_message(head: int, sizes_K: Sequence[int] | np.ndarray, *, where: str) -> str | None:
    """A one-paragraph warning for ``head`` with these cluster sizes, or None when it looks healthy.

    Args:
        head: The head's index.
        sizes_K: Images per cluster (K entries).
        where: What the sizes are of, e.g. "the training memory after epoch 7" or "the published output".
    """
    sizes = np.asarray(sizes_K, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return None
    return collapse_from_stats(head, int(sizes.size), int((sizes == 0).sum()), float(sizes.max()) / total,
                               total, where=where)


def collapse_from_stats(head: int, k: int, empty: int, largest_share: float, total: int, *, where: str
                        ) -> str | None:
    """``collapse_message`` from the summary figures (number of empty clusters, largest share)."""
    if k < 2 or total == 0:
        return None
    limit = largest_share_limit(k)
    problems = []
    if empty:
        problems.append(f"{empty} of its {k} clusters are empty")
    if largest_share > limit:
        problems.append(f"its largest cluster holds {100 * largest_share:.0f}% of the {total} images "
                        f"(more than {100 * limit:.0f}%)")
    if not problems:
        return None
    return (f"head {head} (K={k}) collapsed in {where}: {' and '.join(problems)}. Likely cause: too few "
            "optimizer steps for the collection (small collections, large batches, short schedules) or K "
            "far above the number of groups in the images. Keep adapt.enabled=true (the default derives "
            "batch size, epochs and warm-up from the number of images), or lower optim.batch_size, raise "
            "optim.epochs, or choose a smaller K; on a few hundred images secu.constraint=entropy settled more "
            "often than the size constraint; see 'Robustness' in docs/benchmarks.md.")


def collapse_messages(sizes_HK: Sequence[Sequence[int] | np.ndarray], *, where: str) -> list[str]:
    """``collapse_message`` for every head that needs one."""
    out = []
    for h, sizes in enumerate(sizes_HK):
        msg = collapse_message(h, sizes, where=where)
        if msg is not None:
            out.append(msg)
    return out


CYCLE_CHANGED_FRAC = 0.25
"""Share of stored labels changed in an epoch from which a high batch share counts as cycling duals."""


def cycling_heads(metrics: dict[str, Any], exp: ExperimentConfig) -> list[int]:
    """Heads whose constraint looks locked in a cycle in this epoch's ``metrics`` (either constraint).

    The signature (docs/benchmarks.md, "Small-data stability"): after the warm-up, one cluster takes a
    median of at least 1.8/K (and at least half) of each global batch while a quarter or more of the stored
    labels change in the epoch. Under the size constraint the duals, which move by up to
    dual_lr * lratio / K per step, exceed the cost margins between centers and hand the batch to one cluster
    after another; under the entropy constraint alpha's term does the same (192 pattern images, alpha 200,
    2 seeds: the whole batch to one cluster, 58-83 % of the labels changing every epoch; docs/reliability.md).
    """
    if metrics["epoch"] <= exp.optim.warmup_epochs:
        return []
    return [h for h, k in enumerate(exp.secu.ks)
            if k >= 3 and metrics.get(f"clusters/h{h}/largest_batch_share", 0.0) >= max(0.5, 1.8 / k)
            and metrics.get(f"clusters/h{h}/changed_frac", 0.0) >= CYCLE_CHANGED_FRAC]


def warn_if_duals_cycle(metrics: dict[str, Any], exp: ExperimentConfig) -> list[int]:
    """Log a warning for every head of ``cycling_heads``, in the terms of the run's constraint; returns those
    heads."""
    heads = cycling_heads(metrics, exp)
    for h in heads:
        k = exp.secu.ks[h]
        if exp.secu.constraint == "entropy":
            cause = (f"the entropy constraint looks locked in a cycle (each step sends most of its batch to the "
                     f"cluster whose growth raises the entropy most, in turn), so these clusters are not settling. "
                     f"It happens when secu.alpha={exp.secu.alpha:g} outweighs the cost margins between centers, "
                     f"typically with few images per cluster: lower secu.alpha (the adaptation caps it at "
                     f"{exp.adapt.alpha_per_image:g} x N)")
        else:
            cause = ("the size-constraint duals look locked in a cycle (each step sends most of its batch to one "
                     "cluster in turn), so these clusters are not settling. It happens when a dual's step "
                     f"dual_lr * lratio / K = {exp.secu.dual_lr * exp.secu.lratio / k:.3g} exceeds the cost margins "
                     "between centers, typically with few images per cluster")
        logger.warning(
            "epoch %d, head %d (K=%d): one cluster took a median %.0f%% of each batch and %.0f%% of the stored "
            "labels changed: %s; see 'Small-data stability' in docs/benchmarks.md",
            metrics["epoch"], h, k, 100 * metrics[f"clusters/h{h}/largest_batch_share"],
            100 * metrics[f"clusters/h{h}/changed_frac"], cause)
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
