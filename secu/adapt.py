"""Schedule defaults that adapt to the collection: batch size, epochs and warm-up derived from N.

Why (measured, docs/benchmarks.md "Robustness"): the recipes state their schedules in epochs, tuned
for tens of thousands of images. On a small collection the same epochs are a few dozen optimizer
steps: on 2,000 Fashion-MNIST images the CPU recipe (batch 256, 12 epochs) makes 7 steps per epoch,
84 in all, and reaches the full learning rate after 7 steps; its clusters never settle (half the
stored labels change every epoch, half the clusters end empty, ACC 0.32 where k-means on the pixels
reaches 0.54). Given the same number of steps as the 60,000-image run (batch 64, about 2,500 steps)
the same recipe settles (changed labels 0.14 per epoch, no empty cluster) and passes k-means. What
matters is the number of optimizer steps, not the number of passes over the data.

Rules, applied to every key the user did not set (``adapt.fixed`` lists the keys that were set):

1. ``optim.batch_size``: halved while an epoch would have fewer than ``adapt.min_steps_per_epoch``
   steps, never below ``max(adapt.min_batch, 2 * max K)``; kept a multiple of the worker count.
2. ``optim.epochs``: raised so that the run makes at least ``adapt.min_steps`` optimizer steps.
3. ``optim.warmup_epochs``: scaled with the epochs (the recipe's warm-up share of the run).
4. ``secu.alpha`` (entropy constraint only): at most ``adapt.alpha_per_image * N``. The entropy term's
   change for moving one image is of order 1/N (spec 3.2: delta_k = phi(p_k + 1/S) - phi(p_k)), so alpha
   must scale with N to weigh the same against the costs; 0.12 is the CIFAR-10 reference's 6000 / 50,000
   (ImageNet's 1e5 / 1.28M = 0.078 stays as it is). Without it, alpha 6000 on 192 images makes the
   entropy term dominate every cost.
5. ``optim.lr``: unchanged (measured: scaling it with the batch did not help at these sizes).

The reference recipes (CIFAR, STL-10, ImageNet: hundreds of steps per epoch, 10^5 steps) are left as
they are: adaptation only ever lowers a batch that gives too few steps per epoch and raises epochs
that give too few steps, so it is a no-op at the sizes the paper ran. Where it changes something it is
a deviation from the paper's schedules (not from its method) and the resolved config says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secu.config import ExperimentConfig
from secu.overrides import apply_overrides

ADAPTED_KEYS = ("optim.batch_size", "optim.epochs", "optim.warmup_epochs", "secu.alpha")


@dataclass
class Adaptation:
    """The adapted config and one line per changed key (empty when nothing changed)."""

    experiment: ExperimentConfig
    changes: list[str]

    def describe(self, num_samples: int) -> str:
        """One sentence for the log."""
        if not self.changes:
            return f"schedule kept as configured for {num_samples} images"
        return (f"schedule adapted to {num_samples} images (adapt.enabled=true; set the keys or "
                f"adapt.enabled=false to keep the recipe's): " + "; ".join(self.changes))


def adapt_to_collection(exp: ExperimentConfig, num_samples: int, num_workers: int = 1) -> Adaptation:
    """Return ``exp`` with batch size, epochs and warm-up derived from ``num_samples`` (see module doc).

    Deterministic: the same config, N and worker count always give the same result (a resumed run
    adapts identically).
    """
    a = exp.adapt
    if not a.enabled:
        return Adaptation(exp, [])
    fixed = set(a.fixed)
    o = exp.optim
    batch, epochs, warmup = o.batch_size, o.epochs, o.warmup_epochs
    changes: list[str] = []
    if "optim.batch_size" not in fixed:
        floor = max(a.min_batch, 2 * max(exp.secu.ks), 2 * num_workers)
        while num_samples // batch < a.min_steps_per_epoch and batch // 2 >= floor:
            batch //= 2
        batch -= batch % num_workers
    iters = max(1, num_samples // batch)
    if "optim.warmup_epochs" not in fixed:
        warmup = max(o.warmup_epochs, o.init_epochs + math.ceil(a.min_warmup_steps / iters))
    if "optim.epochs" not in fixed:
        epochs = max(o.epochs, math.ceil(a.min_steps / iters), warmup + (o.epochs - o.warmup_epochs))
    warmup = min(warmup, epochs)
    alpha = exp.secu.alpha
    if exp.secu.constraint == "entropy" and "secu.alpha" not in fixed:
        alpha = min(alpha, a.alpha_per_image * num_samples)
    overrides = []
    for key, old, new in (("optim.batch_size", o.batch_size, batch), ("optim.epochs", o.epochs, epochs),
                          ("optim.warmup_epochs", o.warmup_epochs, warmup), ("secu.alpha", exp.secu.alpha, alpha)):
        if new != old:
            overrides.append(f"{key}={new}")
            changes.append(f"{key} {old} -> {new}")
    if changes:
        changes.append(f"{iters} steps per epoch, {iters * epochs} steps in all")
    return Adaptation(apply_overrides(exp, overrides), changes)
