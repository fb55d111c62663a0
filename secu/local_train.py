"""A whole run of any clustering method (``exp.method``) in one process over images held in memory (no Ray).

The same parts as the Ray training loop (``pipelines.training.train_loop``): the method of the config
(``secu.methods.build_method``) trained by ``secu.epoch.run_epoch``, the batched two-view augmentation
(or the evaluation transform for a method that needs no views), a feature pass for methods that ask for
one, the stored label of the previous epoch. It is what the benchmarks
(``benchmarks.robustness``, ``benchmarks.small_data_stability``) and the training-run tests use to
train hundreds of small runs without a cluster's start-up cost, and a reference a user can run on a
laptop sample. Each epoch visits the images in a fresh random order; the last partial batch is not
trained on (as in the Ray loop).

Legend: N = images, H = heads, K = clusters of one head, B = batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from secu.augment import EvalTransform, eval_batch, normalize
from secu.batch_augment import BatchTwoViewAugment
from secu.config import ExperimentConfig
from secu.epoch import run_epoch
from secu.method import Batch, ClusteringMethod, EpochContext
from secu.methods import build_method
from secu.network import SeCuNetwork
from secu.secu_method import SeCuMethod
from secu.state import ClusterState, LocalMemory


@dataclass
class LocalRun:
    """The end state of a run: the method (its networks), the memory and one metrics dict per epoch."""

    method: ClusteringMethod
    memory: LocalMemory
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def net(self) -> SeCuNetwork:
        """SeCu's network (encoder + centers), e.g. for self-labeling."""
        if not isinstance(self.method, SeCuMethod):
            raise TypeError(f"run.net is SeCu's network; this run trained method={self.method.name!r}")
        return self.method.base

    @property
    def state(self) -> ClusterState:
        """SeCu's counters and duals at the end of the run."""
        if not isinstance(self.method, SeCuMethod):
            raise TypeError(f"run.state is SeCu's cluster state; this run trained method={self.method.name!r}")
        return self.method.state


SHORT_BATCH_SEED_OFFSET = 1 << 40
"""The short batch of epoch e is augmented with seed ``seed * 1_000_003 + SHORT_BATCH_SEED_OFFSET + e``."""


def epoch_batches(images: np.ndarray, order: torch.Tensor, aug: BatchTwoViewAugment, batch: int, epoch: int,
                  seed: int, inputs: tuple[str, ...], transform: EvalTransform) -> Iterator[Batch]:
    """The epoch's batches in ``order``: the full ones, then the rest as one shorter batch, which the epoch
    labels without training on it; the views of step t are augmented with seed ``seed * 1_000_003 + t``
    (the short batch's with a seed of its own); ``image`` (the evaluation transform) where the method's
    ``batch_inputs`` ask for it."""
    iters = len(order) // batch
    for it in range(math.ceil(len(order) / batch)):
        ids = order[it * batch:(it + 1) * batch]
        chosen = [images[i] for i in ids.tolist()]
        out: Batch = {"sample_index": ids}
        if "view1" in inputs or "view2" in inputs:
            step_seed = seed * 1_000_003 + (epoch * iters + it if it < iters else SHORT_BATCH_SEED_OFFSET + epoch)
            v1, v2 = aug(chosen, seed=step_seed)
            out |= {"view1": torch.from_numpy(v1), "view2": torch.from_numpy(v2)}
        if "image" in inputs:
            out["image"] = torch.from_numpy(eval_batch(transform, chosen))
        yield out


def feature_batches(images: np.ndarray, transform: EvalTransform, batch: int = 1024) -> Iterator[Batch]:
    """Every image once, in id order, through the evaluation transform (uint8, key ``image``)."""
    for start in range(0, len(images), batch):
        chosen = list(images[start:start + batch])
        yield {"sample_index": torch.arange(start, start + len(chosen)),
               "image": torch.from_numpy(eval_batch(transform, chosen))}


def _memory_metrics(memory: LocalMemory, before_HN: torch.Tensor, ks: tuple[int, ...], epoch: int
                    ) -> dict[str, float]:
    """Per head: share of stored labels changed in the epoch, empty clusters, largest cluster's share."""
    out: dict[str, float] = {}
    for h, k in enumerate(ks):
        labels = memory.labels_HN[h]
        seen = labels >= 0
        sizes = np.bincount(labels[seen].numpy(), minlength=k)
        changed = float((before_HN[h][seen] != labels[seen]).float().mean()) if epoch else 1.0
        out[f"clusters/h{h}/changed_frac"] = changed
        out[f"clusters/h{h}/empty"] = int((sizes == 0).sum())
        out[f"clusters/h{h}/largest_frac"] = float(sizes.max() / max(1, sizes.sum()))
    return out


def train_in_memory(images: np.ndarray, exp: ExperimentConfig, *, log: Any = None,
                    on_epoch: Callable[[int, ClusteringMethod], None] | None = None) -> LocalRun:
    """Train ``exp`` on ``images`` (N x S x S or N x S x S x C uint8) with global batch ``optim.batch_size``.

    ``log``, when given, is called with every epoch's metrics dict; ``on_epoch`` with the epoch and the
    method after every epoch (e.g. to evaluate it; the next epoch puts it back in training mode).
    """
    n = len(images)
    batch = exp.optim.batch_size
    iters = n // batch
    if iters < 1:
        raise ValueError(f"{n} images are fewer than one batch of optim.batch_size={batch}")
    torch.manual_seed(exp.seed)
    order_gen = torch.Generator().manual_seed(exp.seed + 2)
    method = build_method(exp, iters)
    aug, transform = BatchTwoViewAugment(exp.augment), EvalTransform(exp.augment)
    memory = LocalMemory(n, exp.secu.num_heads)
    run = LocalRun(method, memory)
    context = EpochContext(feature_batches=(lambda: feature_batches(images, transform))
                           if method.needs_feature_pass else None)
    for epoch in range(exp.optim.epochs):
        order = torch.randperm(n, generator=order_gen)
        before_HN = memory.labels_HN.clone()
        batches = epoch_batches(images, order, aug, batch, epoch, exp.seed, method.batch_inputs, transform)
        result = run_epoch(method, batches, memory, epoch, batch_size=batch, context=context)
        metrics: dict[str, Any] = {"epoch": epoch, **result.summary.metrics,
                                   **_memory_metrics(memory, before_HN, exp.secu.ks, epoch)}
        run.history.append(metrics)
        if log is not None:
            log(metrics)
        if on_epoch is not None:
            on_epoch(epoch, method)
    return run


@torch.no_grad()
def predict(method: ClusteringMethod, images: np.ndarray, exp: ExperimentConfig, batch: int = 1024
            ) -> tuple[np.ndarray, np.ndarray]:
    """Published labels (H x N: ``method.assign`` on the evaluation view, as inference does) and their
    confidence (H x N). Puts the method in eval mode."""
    method.eval()
    transform = EvalTransform(exp.augment)
    labels, confs = [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(eval_batch(transform, list(images[start:start + batch])))
        out = method.assign(normalize(x, exp.augment.mean, exp.augment.std))
        labels.append(out.clusters_HB.cpu().numpy())
        confs.append(out.confidence_HB.float().cpu().numpy())
    return np.concatenate(labels, axis=1), np.concatenate(confs, axis=1)


def weak_augment_config(exp: ExperimentConfig) -> Any:
    """The weak view of self-labeling: a mild crop and a flip, no colour, blur or solarize."""
    import dataclasses

    return dataclasses.replace(exp.augment, min_crop=exp.self_label.weak_min_crop, jitter_p=0.0, grayscale_p=0.0,
                               blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


def self_label_in_memory(net: SeCuNetwork, images: np.ndarray, exp: ExperimentConfig, *, log: Any = None
                         ) -> list[dict[str, Any]]:
    """Fine-tune ``net`` in place by self-labeling (``secu.self_label``); returns one metrics dict per epoch.

    The strong view is the recipe's second view; the weak one ``weak_augment_config``.
    """
    from secu.self_label import HeadClassifier, self_label_step

    sl = exp.self_label
    n, batch = len(images), min(sl.batch_size, len(images))
    iters = n // batch
    gen = torch.Generator().manual_seed(exp.seed + 5)
    classifier = HeadClassifier(net, sl.head, exp.secu.tw)
    opt = torch.optim.AdamW(classifier.parameters(), lr=sl.lr, weight_decay=sl.weight_decay)
    weak_aug, strong_aug = BatchTwoViewAugment(weak_augment_config(exp)), BatchTwoViewAugment(exp.augment)
    mean, std = exp.augment.mean, exp.augment.std
    history = []
    net.train()
    for epoch in range(sl.epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum, conf_sum = 0.0, 0.0
        for it in range(iters):
            ids = order[it * batch:(it + 1) * batch].tolist()
            chosen = [images[i] for i in ids]
            t = epoch * iters + it
            weak, _ = weak_aug(chosen, seed=exp.seed * 7_000_003 + t)
            _, strong = strong_aug(chosen, seed=exp.seed * 9_000_011 + t)
            res = self_label_step(classifier, normalize(torch.from_numpy(weak), mean, std),
                                  normalize(torch.from_numpy(strong), mean, std), sl.threshold,
                                  sl.per_cluster_frac)
            if res.confident_frac > 0:  # nothing confident: no gradient, and no decay step either
                opt.zero_grad(set_to_none=True)
                res.loss.backward()
                opt.step()
            loss_sum += float(res.loss.detach())
            conf_sum += res.confident_frac
        metrics = {"epoch": epoch, "self_label/loss": loss_sum / iters, "self_label/confident_frac": conf_sum / iters}
        history.append(metrics)
        if log is not None:
            log(metrics)
    return history
