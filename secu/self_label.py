"""Self-labeling: the second stage after clustering (SCAN, Van Gansbeke et al., ECCV 2020, Sec. 2.3; the
SeCu paper fine-tunes its clusters the same way).

From a trained clustering run, the encoder and one head's centers are fine-tuned with cross-entropy on
strongly augmented views of the *confident* instances: those whose probability on a weakly augmented view,
softmax(z C_h / tw), is above ``threshold`` (0.99 in SCAN). The target is that weak view's argmax. To keep
a few large, easy clusters from absorbing the rest, each confident class is weighted by the inverse of its
frequency among the batch's confident instances (``class_balanced_weights``).

Pure functions plus a step; ``secu.local_train.self_label_in_memory`` runs it in one process and
``pipelines.training.self_label`` on Ray Train.

Legend: B = batch, K = clusters of the head, D = feature dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secu.network import SeCuNetwork


@dataclass
class Confident:
    """The confident instances of a batch."""

    mask_B: torch.Tensor
    """True where the weak view's top probability exceeds the threshold."""
    targets_B: torch.Tensor
    """The weak view's argmax (defined for every instance; used where ``mask_B``)."""


def select_confident(probs_BK: torch.Tensor, threshold: float) -> Confident:
    """Instances whose largest probability is above ``threshold``, with that class as the target."""
    top, target = probs_BK.max(dim=1)
    return Confident(mask_B=top > threshold, targets_B=target)


def select_per_cluster(probs_BK: torch.Tensor, frac: float) -> Confident:
    """In every cluster the batch's instances are argmax'd to, its ``ceil(frac * n_k)`` most confident.

    Unlike one threshold for all, every cluster keeps confident members, so the loss cannot be won by
    pulling every image into the few clusters that happen to be confident (measured: with a 0.9 threshold
    only one class of the pattern set was confident and self-labeling merged a correct clustering).
    """
    top, target = probs_BK.max(dim=1)
    mask = torch.zeros_like(target, dtype=torch.bool)
    for k in torch.unique(target).tolist():
        members = torch.nonzero(target == k).flatten()
        keep = max(1, math.ceil(frac * members.numel()))
        mask[members[torch.argsort(top[members], descending=True)[:keep]]] = True
    return Confident(mask_B=mask, targets_B=target)


def class_balanced_weights(targets_B: torch.Tensor, mask_B: torch.Tensor, k: int) -> torch.Tensor:
    """Per class 1 / (its share of the confident instances); 1 for classes with none (they carry no loss)."""
    counts_K = torch.bincount(targets_B[mask_B], minlength=k).to(torch.float32)
    weights_K = torch.ones(k, dtype=torch.float32, device=targets_B.device)
    present = counts_K > 0
    if bool(present.any()):
        weights_K[present] = counts_K.sum() / counts_K[present]
    return weights_K


def self_label_loss(logits_BK: torch.Tensor, confident: Confident) -> torch.Tensor:
    """Class-balanced cross-entropy of the strong view's logits on the confident instances.

    With weights w = class_balanced_weights, the loss is sum_i w_{y_i} CE_i / sum_i w_{y_i} over the
    confident i (PyTorch's weighted mean): every confident class contributes equally. Zero (with a graph)
    when no instance is confident.
    """
    mask = confident.mask_B
    if not bool(mask.any()):
        return logits_BK.sum() * 0.0
    weights = class_balanced_weights(confident.targets_B, mask, logits_BK.shape[1])
    return F.cross_entropy(logits_BK[mask].float(), confident.targets_B[mask], weight=weights.to(logits_BK.device))


class HeadClassifier(nn.Module):
    """One head of a ``SeCuNetwork`` as a classifier: logits z C_h / tw, with gradient into the encoder and
    that head's centers only. It shares (does not copy) the network's encoder and center parameter, so
    training it trains the network; wrap it in DDP to synchronise exactly the parameters it uses."""

    def __init__(self, net: SeCuNetwork, head: int, tw: float) -> None:
        super().__init__()
        self.encoder = net.encoder
        self.center = net.centers.weights[head]
        self.tw = tw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits B x K."""
        z, _ = self.encoder(images)
        return z.float() @ F.normalize(self.center, dim=0).float() / self.tw


@dataclass
class SelfLabelStepResult:
    """What one self-labeling step produces (losses detached)."""

    loss: torch.Tensor
    confident_frac: float
    """Share of the batch above the threshold."""
    confident_classes: int
    """Classes present among the confident instances."""


def self_label_step(classifier: nn.Module, weak: torch.Tensor, strong: torch.Tensor, threshold: float,
                    per_cluster_frac: float = 0.0) -> SelfLabelStepResult:
    """Targets from the weak view (no gradient, network in its current mode), loss on the strong view.

    ``classifier`` is a ``HeadClassifier``, possibly wrapped by DDP. With ``per_cluster_frac`` > 0 the
    confident set is ``select_per_cluster``'s, else ``select_confident``'s with ``threshold``."""
    with torch.no_grad():
        probs = torch.softmax(classifier(weak), dim=1)
    confident = (select_per_cluster(probs, per_cluster_frac) if per_cluster_frac > 0
                 else select_confident(probs, threshold))
    loss = self_label_loss(classifier(strong), confident)
    return SelfLabelStepResult(loss=loss, confident_frac=float(confident.mask_B.float().mean()),
                               confident_classes=int(torch.unique(confident.targets_B[confident.mask_B]).numel()))
