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

from collections.abc import Sequence

import numpy as np

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
