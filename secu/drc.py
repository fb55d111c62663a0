"""DRC as a ``secu.method.ClusteringMethod``: Zhong, Chen, Jin, Hua, "Deep Robust Clustering by Contrastive
Learning", arXiv 2008.03030, 2020. No official code exists; this is written from the paper's description.

The network is the encoder's backbone with one K-way linear head per K in ``secu.ks`` (head 0 is the
evaluated one). A head's logits are the assignment feature (AF), their softmax the assignment
probability (AP). Per head, on the global batch of G images and its two views (q, q' AF rows; p, p' AP)::

    L_sample = InfoNCE over samples: row i of q against the rows of q', positive i    (t = drc.t_sample)
    L_cluster = InfoNCE over clusters: column k of p against the columns of p', positive k (t = drc.t_cluster)
    L_size = sum_k (sum_i p_ik)^2 / G                  (penalises unbalanced cluster sizes)
    L = L_sample + L_cluster + drc.lambda_size * L_size,  averaged over heads

Stated choices and deviations from the paper:

- Cosine similarity in both InfoNCE terms (rows of q, columns of p L2-normalised first). What could be read
  of the paper does not settle it, and a third-party reimplementation uses plain dot products; raw logits
  are unbounded, so the sample term can be lowered by scaling the logits up
  (an over-confident AP that is not any better a clustering), and the dot product of two AP columns
  grows with the batch (it sums G products), so one temperature would not fit two batch sizes. With
  cosines both similarities lie in [-1, 1] and the temperatures mean the same thing at every scale.
  Measured (the setting of "Temperatures and lambda" below): with raw dot products one seed's objective
  rose from 10 to 20 while 87 % of the images went to one cluster, the other seed's loss became NaN.
- Both InfoNCE terms are symmetric (the mean of view 1 -> view 2 and view 2 -> view 1) and the size
  penalty is the mean of both views': the two views are augmented differently (``augment.blur_p``,
  ``augment.solarize_p``), and the objective should not depend on which one is called view 1. The
  negatives of a row are the other samples of the other view (the paper's form, not SimCLR's 2G - 2).
- ``L_size`` is reported unweighted (``train/loss_size``); ``train/loss`` is the weighted total.
- The embedding of ``assign`` is the L2-normalised backbone feature (the AF has only K dimensions).
- SGD with momentum and weight decay (``optim.lr``, ``optim.momentum``, ``optim.weight_decay``) on every
  parameter, the rate of ``secu.schedules.warmup_cosine``; ``optim.optimizer`` and ``optim.clr`` are unused.

Temperatures and lambda. The paper's values could not be checked (only its abstract and introduction were
at hand), so they were chosen by measurement without labels: Fashion-MNIST, 4,096 training images, K = 10,
G = 256, small_cnn of width 16, 12 epochs, lr 0.1, two seeds per setting; judged by the agreement of the
two seeds' partitions (ARI), the largest predicted cluster and the mean confidence. t_sample = 0.5,
t_cluster = 1.0, lambda = 0.1 had the most stable partitions (seed ARI 0.51; 0.40 to 0.50 for the other
settings), all 10 clusters used, the largest holding 13 to 15 % of the images. lambda = 1 falls into a
degenerate optimum at G = 256: near-uniform AP (mean confidence 0.25 to 0.29) whose soft sizes are equal
while the argmax puts 74 to 80 % of the images in one cluster. lambda = 0 does not collapse (the cluster
contrast alone keeps the columns apart) but gives less even sizes (largest 17 to 18 %). L_size equals G
times the squared soft cluster shares, and its gradient per image does not shrink with G as the InfoNCE
means' do, so lambda's weight relative to the contrast terms grows with the batch: rescale lambda by
256 / G for another global batch (derived from the formula, not measured).

Distributed: every rank gathers the AF of all ranks (``secu.distributed.all_gather_with_grad``, gradient
to the local rows) and computes the same objective on the global batch. Rank r's backward then yields
the gradient of L through its own rows only; the sum over ranks is the one-process gradient, and DDP
averages, so the loss is multiplied by the world size W before backward (``backward_scale``). Every term
is a function of the global batch, so this holds for all three.

Legend: B = local batch, G = global batch, H = heads, K = clusters of one head, F = backbone width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secu import distributed
from secu.config import ExperimentConfig
from secu.method import (
    Assignment,
    Batch,
    EpochContext,
    EpochSummary,
    OneNetworkMethod,
    StepOutput,
    evaluating,
    normalized_views,
)
from secu.method_configs import DRCConfig
from secu.model import build_backbone
from secu.precision import autocast_dtype
from secu.schedules import warmup_cosine

HEAD_KEY = "heads.{head}.{param}"
"""Key of head h's linear layer weight (K x F) and bias (K) in the network's state dict."""


class DRCNetwork(nn.Module):
    """Backbone + one linear K-way head per K; one module, so that one DDP wrapper and one forward per
    backward cover everything trained."""

    def __init__(self, backbone: nn.Module, width: int, ks: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([nn.Linear(width, k) for k in ks])

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The AF (logits, [B, K_h] per head) of both views. Each view is its own backbone pass, so
        BatchNorm normalises each view by its own statistics (as SeCu's network does)."""
        f1_BF, f2_BF = self.backbone(view1), self.backbone(view2)
        return [head(f1_BF) for head in self.heads], [head(f2_BF) for head in self.heads]

    def infer(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per head the AF [B, K_h] of ``images``, and the backbone features [B, F]."""
        f_BF = self.backbone(images)
        return [head(f_BF) for head in self.heads], f_BF


def build_drc_network(exp: ExperimentConfig) -> DRCNetwork:
    """The network of ``exp`` (``model`` for the backbone, ``secu.ks``), initialised from ``exp.seed``."""
    torch.manual_seed(exp.seed)
    backbone, width = build_backbone(exp.model)
    return DRCNetwork(backbone, width, exp.secu.ks)


# --------------------------------------------------------------------------------------------------
# The loss terms: pure functions of the gathered global batch
# --------------------------------------------------------------------------------------------------


def _symmetric_info_nce(a_NX: torch.Tensor, b_NX: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over rows and both directions of -log softmax_j(cos(a_i, b_j) / t)[i]."""
    logits_NN = F.normalize(a_NX, dim=1) @ F.normalize(b_NX, dim=1).T / t
    target_N = torch.arange(a_NX.shape[0], device=a_NX.device)
    return (F.cross_entropy(logits_NN, target_N) + F.cross_entropy(logits_NN.T, target_N)) / 2


def sample_contrast(af1_GK: torch.Tensor, af2_GK: torch.Tensor, t_sample: float) -> torch.Tensor:
    """InfoNCE over samples: image i's AF row in one view against every image's row in the other view."""
    return _symmetric_info_nce(af1_GK.float(), af2_GK.float(), t_sample)


def cluster_contrast(p1_GK: torch.Tensor, p2_GK: torch.Tensor, t_cluster: float) -> torch.Tensor:
    """InfoNCE over clusters: cluster k's AP column (over the G images) in one view against every cluster's
    column in the other view."""
    return _symmetric_info_nce(p1_GK.float().T, p2_GK.float().T, t_cluster)


def size_penalty(p_GK: torch.Tensor) -> torch.Tensor:
    """sum_k (sum_i p_ik)^2 / G: from G / K (equal sizes) to G (every image in one cluster)."""
    p_GK = p_GK.float()
    return (p_GK.sum(dim=0) ** 2).sum() / p_GK.shape[0]


@dataclass
class DRCTerms:
    """The objective of one step on the global batch, identical on every rank."""

    loss: torch.Tensor
    """L averaged over heads, with gradient (to this rank's rows only when distributed)."""
    sample: float
    """L_sample averaged over heads."""
    cluster: float
    """L_cluster averaged over heads."""
    size: float
    """L_size (unweighted, mean of both views) averaged over heads."""
    largest_share_H: list[float]
    """Per head, the share of the global batch in its largest cluster (argmax AP of view 1)."""


def drc_objective(af1_HGK: list[torch.Tensor], af2_HGK: list[torch.Tensor], cfg: DRCConfig) -> DRCTerms:
    """DRC's loss over the gathered AF of both views (one [G, K_h] tensor per head)."""
    heads = len(af1_HGK)
    total = af1_HGK[0].new_zeros((), dtype=torch.float32)
    sums = [0.0, 0.0, 0.0]
    shares = []
    for af1_GK, af2_GK in zip(af1_HGK, af2_HGK, strict=True):
        p1_GK, p2_GK = torch.softmax(af1_GK.float(), dim=1), torch.softmax(af2_GK.float(), dim=1)
        l_sample = sample_contrast(af1_GK, af2_GK, cfg.t_sample)
        l_cluster = cluster_contrast(p1_GK, p2_GK, cfg.t_cluster)
        l_size = (size_penalty(p1_GK) + size_penalty(p2_GK)) / 2
        total = total + l_sample + l_cluster + cfg.lambda_size * l_size
        for i, term in enumerate((l_sample, l_cluster, l_size)):
            sums[i] += float(term.detach())
        counts_K = torch.bincount(af1_GK.detach().argmax(dim=1), minlength=af1_GK.shape[1])
        shares.append(float(counts_K.max()) / af1_GK.shape[0])
    return DRCTerms(loss=total / heads, sample=sums[0] / heads, cluster=sums[1] / heads, size=sums[2] / heads,
                    largest_share_H=shares)


def gathered_objective(af1_HBK: list[torch.Tensor], af2_HBK: list[torch.Tensor], cfg: DRCConfig) -> DRCTerms:
    """``drc_objective`` on the AF of every rank, the gradient flowing to this rank's rows (``af*_HBK``)."""
    gather = distributed.all_gather_with_grad
    return drc_objective([gather(a) for a in af1_HBK], [gather(a) for a in af2_HBK], cfg)


def backward_scale() -> int:
    """The factor of the loss before backward: W, since DDP averages the per-rank gradients of the loss of
    the global batch, each of which reaches only its rank's rows (module docstring)."""
    return distributed.world_size()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class DRCMethod(OneNetworkMethod[DRCNetwork]):
    """DRC's per-step training: one forward of both views, the objective on the global batch, one SGD step."""

    name = "drc"

    def __init__(self, exp: ExperimentConfig, iters_per_epoch: int, device: torch.device | None = None,
                 network: DRCNetwork | None = None) -> None:
        """Build the network (``build_drc_network``, or ``network`` as given: tests pass a tiny one) and the
        schedule of ``iters_per_epoch`` steps an epoch (the optimizer on first use)."""
        self.exp = exp
        self.device = device or torch.device("cpu")
        self.base = (network or build_drc_network(exp)).to(self.device)
        self.net: nn.Module = self.base
        o = exp.optim
        self.iters_per_epoch = iters_per_epoch
        self.lrs = warmup_cosine(iters_per_epoch, o)
        self.global_step = 0
        self.use_amp = self.device.type == "cuda" and o.mixed_precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.amp_dtype = autocast_dtype(self.device)
        self.epoch = 0
        self._begin_sums()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.exp.optim
        return torch.optim.SGD(self.base.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def _begin_sums(self) -> None:
        self.steps = 0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # loss, sample, cluster, size
        self.shares_HS: list[list[float]] = [[] for _ in self.exp.secu.ks]

    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Backbone and heads are one network (one DDP wrapper); the optimizer keeps its parameters."""
        self.net = wrap(self.net)

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        """Training mode; nothing else to prepare (no centers, no feature pass)."""
        self.epoch = epoch
        self._begin_sums()
        self.net.train()

    def _schedule_index(self) -> int:
        return min(self.epoch * self.iters_per_epoch + self.steps, len(self.lrs) - 1)

    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """Forward both views, the objective on the global batch, one SGD step; the labels are argmax AP of
        view 1 per head (the stored labels are not used: DRC keeps no per-image state)."""
        lr = float(self.lrs[self._schedule_index()])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        view1, view2 = normalized_views(batch, self.exp.augment.mean, self.exp.augment.std, self.device)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            af1_HBK, af2_HBK = self.net(view1, view2)
        terms = gathered_objective(af1_HBK, af2_HBK, self.exp.drc)  # float32 outside autocast
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.loss * backward_scale()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for i, value in enumerate((float(terms.loss.detach()), terms.sample, terms.cluster, terms.size)):
            self.sums[i] += value
        for h, share in enumerate(terms.largest_share_H):
            self.shares_HS[h].append(share)
        self.steps += 1
        self.global_step += 1
        labels_HB = torch.stack([af.detach().argmax(dim=1) for af in af1_HBK]).long()
        return StepOutput(labels_HB=labels_HB)

    @torch.no_grad()
    def label_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """argmax AP of view 1 per head with the network in eval mode; no loss, no step."""
        view1, view2 = normalized_views(batch, self.exp.augment.mean, self.exp.augment.std, self.device)
        with evaluating(self.base), torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                                                   enabled=self.use_amp):
            af1_HBK, _ = self.base(view1, view2)
        return StepOutput(labels_HB=torch.stack([af.argmax(dim=1) for af in af1_HBK]).long())

    def progress(self) -> str:
        """Mean loss terms so far in this epoch and the current learning rate."""
        n = max(self.steps, 1)
        s = [v / n for v in self.sums]
        return (f"loss {s[0]:.4f} (sample {s[1]:.4f}, cluster {s[2]:.4f}, size {s[3]:.4f}) "
                f"lr {self.lrs[self._schedule_index()]:.4g}")

    def after_epoch(self) -> EpochSummary:
        """Loss terms averaged over steps and ranks, the end-of-epoch rate, the median largest batch share
        per head (from the gathered AF: the same on every rank); no cluster state."""
        terms = distributed.all_reduce_mean(torch.tensor(self.sums, dtype=torch.float64) / max(self.steps, 1))
        end = min((self.epoch + 1) * self.iters_per_epoch, len(self.lrs)) - 1
        metrics: dict[str, float] = {
            "train/loss": float(terms[0]),
            "train/loss_sample": float(terms[1]),
            "train/loss_cluster": float(terms[2]),
            "train/loss_size": float(terms[3]),
            "train/lr": float(self.lrs[end]),
            "train/steps": self.steps,
        }
        metrics.update({f"clusters/h{h}/largest_batch_share": float(np.median(s)) if s else 0.0
                        for h, s in enumerate(self.shares_HS)})
        if not np.isfinite(metrics["train/loss"]):
            raise FloatingPointError(
                f"epoch {self.epoch}: the DRC training loss is {metrics['train/loss']}; lower optim.lr "
                "(or raise drc.t_sample / drc.t_cluster)")
        return EpochSummary(metrics=metrics, cluster_state=None)

    def cluster_axes(self, head: int) -> dict[str, int]:
        """Head h's linear layer: weight (K x F) and bias (K), one row per cluster."""
        return {HEAD_KEY.format(head=head, param="weight"): 0, HEAD_KEY.format(head=head, param="bias"): 0}

    def center_key(self, head: int) -> str | None:
        """None: DRC has no centers; reclustering matches clusters by label overlap."""
        return None

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> Assignment:
        """argmax AP per head, its probability (confidence), its logit (similarity), and the L2-normalised
        backbone feature (embedding)."""
        af_HBK, f_BF = self.base.infer(images.to(self.device))
        clusters, confidence, similarity = [], [], []
        for af_BK in af_HBK:
            af_BK = af_BK.float()
            prob_B, cluster_B = torch.softmax(af_BK, dim=1).max(dim=1)
            clusters.append(cluster_B)
            confidence.append(prob_B)
            similarity.append(af_BK.gather(1, cluster_B[:, None])[:, 0])
        return Assignment(clusters_HB=torch.stack(clusters), confidence_HB=torch.stack(confidence),
                          similarity_HB=torch.stack(similarity), embedding_BD=F.normalize(f_BF.float(), dim=1))
