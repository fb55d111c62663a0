"""What a clustering method is to the epoch that trains it (``secu.epoch.run_epoch``).

A method owns its networks, optimizers, schedules and whatever state is not learned by gradient; the
epoch owns the order of things: batches, the label store, counting. Per epoch::

    method.before_epoch(epoch, context)          # SeCu: snapshot the centers; ProPos: a feature pass
    for batch in batches:                         # full batches
        out = method.train_step(batch, stored)    # forward, losses, backward, every optimizer it steps
        store.write_async(ids[out.write_mask_B], out.labels_HB[:, out.write_mask_B], epoch)
    out = method.label_step(short_batch, stored)  # the last, shorter batch: labels only, no training
    for ids, labels in method.label_pass(epoch, context):   # ProPos: k-means labels for the next epoch
        store.write_async(ids, labels, epoch)
    store.flush()
    summary = method.after_epoch()                # metrics (identical on every rank), cluster state

The interface fits, without special cases in the loop: a method that needs a pass over every image's
features before an epoch (``needs_feature_pass`` and ``EpochContext.feature_batches``), one with
per-batch losses only (``train_step`` returns no labels), and one with several networks and
optimizers stepped at different rates (``train_step`` steps whatever it holds; ``wrap_networks``
gives each network to the distributed wrapper).

A ``LabelStore`` is where per-image labels live between epochs: ``secu.state.LocalMemory`` in one
process, the coordinator client (``pipelines.training.coordinator``) on a Ray cluster.

Legend: B = batch, H = heads, N = images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from secu.state import ClusterState

Batch = dict[str, torch.Tensor]
"""One batch: ``sample_index`` (int64 [B]) and the method's inputs (``view1``, ``view2``: uint8 or float
[B, C, S, S], not normalised; ``image`` for a deterministic feature pass)."""


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, back in the mode it had after it (a label step's forward)."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def normalized_views(batch: Batch, mean: Sequence[float], std: Sequence[float],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's ``view1`` and ``view2`` on ``device``, normalised (``secu.augment.normalize``)."""
    from secu.normalize import normalize

    return (normalize(batch["view1"].to(device, non_blocking=True), mean, std),
            normalize(batch["view2"].to(device, non_blocking=True), mean, std))


class LabelStore(Protocol):
    """Per-image labels of the previous epoch (read) and of the current one (written)."""

    def labels_for(self, sample_index_B: np.ndarray) -> np.ndarray:
        """Labels int [H, B] stored in the previous epoch for these ids; -1 where there is none."""
        ...

    def write_async(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> None:
        """Store this epoch's new labels [H, B]; a store may send them later, by ``flush`` at the latest."""
        ...

    def flush(self) -> int:
        """Finish every pending write; returns the rows written since the previous flush."""
        ...


@dataclass
class EpochContext:
    """What the epoch offers a method besides its training batches."""

    feature_batches: Callable[[], Iterable[Batch]] | None = None
    """A fresh deterministic pass over every image of this worker's part (key ``image``), for methods with
    ``needs_feature_pass``; None where the runner has none."""


@dataclass
class StepOutput:
    """What one training step hands back to the epoch."""

    labels_HB: torch.Tensor | None = None
    """New labels of the batch's images for the store; None for a method that stores none."""
    write_mask_B: torch.Tensor | None = None
    """Which rows to write (first occurrence of an id in the global batch); None: every row."""


@dataclass
class Assignment:
    """Inference on a batch of normalised evaluation images (what the Parquet rows carry per head)."""

    clusters_HB: torch.Tensor
    """The cluster of every image for every head (int64)."""
    confidence_HB: torch.Tensor
    """The method's probability of that cluster, in [0, 1]."""
    similarity_HB: torch.Tensor
    """The method's raw score of that cluster: cosine to the center (SeCu, ProPos) or the logit (DRC, PFCA)."""
    embedding_BD: torch.Tensor | None = None
    """The feature the method clusters (L2-normalised where the method normalises it); None where it has none."""


@dataclass
class EpochSummary:
    """The end of an epoch as a method sees it."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Training metrics, identical on every rank (the method reduces across ranks)."""
    cluster_state: ClusterState | None = None
    """Counters and duals as they stand at the epoch end (before any carry-over), for the label store's
    epoch close and statistics; None for a method without such state."""


class ClusteringMethod(ABC):
    """One clustering method, trained by ``secu.epoch.run_epoch``; SeCu is ``secu.secu_method.SeCuMethod``."""

    name: ClassVar[str]
    needs_feature_pass: ClassVar[bool] = False
    """True when ``before_epoch`` or ``label_pass`` needs ``EpochContext.feature_batches``."""
    batch_inputs: ClassVar[tuple[str, ...]] = ("view1", "view2")
    """The image keys a training batch must carry: two augmented views, or ``("image",)`` (the evaluation
    transform) for a method that needs no views (PFCA)."""

    @abstractmethod
    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each trained network by ``wrap(network)`` (DDP); called once, before any restore."""

    @abstractmethod
    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        """Prepare ``epoch`` (snapshots, passes over the data, schedules)."""

    @abstractmethod
    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """One optimisation step on ``batch``, whose stored labels are ``stored_HB`` (int64 [H, B], -1: none)."""

    def label_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput | None:
        """Labels (and label statistics) for a batch too short to train on, the last of an epoch: no loss,
        no optimizer step, networks in eval mode. Called on every rank together with batches of the same
        size. The default, None, leaves those images with their previous label for the epoch."""
        return None

    @abstractmethod
    def after_epoch(self) -> EpochSummary:
        """Close the epoch: reduce metrics across ranks and carry state into the next epoch."""

    def progress(self) -> str:
        """A short account of the running epoch for a progress log line."""
        return ""

    def eval(self) -> ClusteringMethod:
        """Evaluation mode for every network the method holds (before ``assign``); returns the method."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.eval()
        return self

    def label_pass(self, epoch: int, context: EpochContext) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Labels computed after the epoch's last step over every image of this rank's part, as (ids int64 [B],
        labels [H, B]) pairs, stored as this epoch's labels, so that the next epoch reads them (ProPos's k-means
        pass). A method that labels images in ``train_step`` yields nothing (the default)."""
        return ()

    def cluster_axes(self, head: int) -> dict[str, int]:
        """The entries of ``state_dict()["network"]`` that have one slice per cluster of ``head``, with that axis;
        reclustering permutes them to keep cluster ids stable across runs."""
        return {}

    def center_key(self, head: int) -> str | None:
        """The ``state_dict()["network"]`` entry holding ``head``'s centers as a D x K matrix, where the method
        has centers (reclustering matches them by cosine); None: matched by label overlap instead."""
        return None

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue training after the last ``after_epoch`` (networks, optimizers, state)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; keys a warm start does not carry (e.g. ``optimizer``) may be missing."""

    @abstractmethod
    def assign(self, images: torch.Tensor) -> Assignment:
        """Inference on normalised evaluation images [B, C, S, S] (eval mode, no gradient, the method's device)."""


NetT = TypeVar("NetT", bound=nn.Module)


class OneNetworkMethod(ClusteringMethod, Generic[NetT]):
    """A method whose networks are one module ``base`` stepped by one ``optimizer`` (SeCu, ProPos, DRC): the
    checkpoint layout of ``ClusteringMethod.state_dict`` written once. Subclasses set ``base`` and
    ``global_step``, write ``_build_optimizer`` and override ``_cluster_state``/``_load_cluster_state`` if they
    have cluster state."""

    base: NetT
    global_step: int

    @abstractmethod
    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over ``base``'s trainable parameters (called once, on first use of ``optimizer``)."""

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:
        """Built on first use, so a method loaded only to assign (inference actors, reclustering, warm starts)
        never builds one: torch.optim's first constructor imports ``torch._dynamo``, about 2 s of CPU in a
        fresh process here. Building it draws no random numbers, so a training run is the same either way."""
        return self._build_optimizer()

    def _cluster_state(self) -> ClusterState | None:
        return None

    def _load_cluster_state(self, state: ClusterState | None) -> None:
        """Take the checkpoint's cluster state (methods without one ignore it)."""

    def state_dict(self) -> dict[str, Any]:
        """``network`` (unwrapped, copied to the CPU), ``optimizer``, ``cluster_state`` and ``global_step``."""
        return {"network": {k: v.detach().to("cpu", copy=True) for k, v in self.base.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "cluster_state": self._cluster_state(),
                "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The network and cluster state always; the optimizer and global step when present (not in a warm start)."""
        self.base.load_state_dict(state["network"])
        self._load_cluster_state(state.get("cluster_state"))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state.get("global_step", 0))
