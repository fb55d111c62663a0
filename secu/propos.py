"""ProPos as a ``secu.method.ClusteringMethod``: Huang et al., "Learning Representation for Clustering via
Prototype Scattering and Positive Sampling", TPAMI 2022.

A BYOL-style pair of networks: the online one (encoder f = backbone + projection, ``secu.model.Encoder``,
and a predictor g = Linear-BN-ReLU-Linear) and the target one (an exponential moving average of the online
encoder, never given a gradient). Per step, on two views x1, x2 with z_a the unit online projection of
view a, k_b the unit target projection of view b, and c_i the image's label of the last k-means pass
(head 0, the label the store holds; -1: none yet, left out of L_psl):

- positive sampling alignment: L_psa = 1/2 sum_{(a, b) in ((1, 2), (2, 1))} mean_i 2 - 2 cos(g(z_a,i + e), k_b,i),
  e ~ N(0, sigma^2 I): the neighbourhood of an embedding counts as its positive too.
- prototype scattering: mu_c, the normalised mean of the online z_a of the batch's cluster c, and mu'_c,
  that of the target k_b; over the P clusters present in the global batch,
  L = mean_c -log exp(mu_c . mu'_c / T) / (exp(mu_c . mu'_c / T) + sum_{j != c} exp(mu_c . mu_j / T)),
  and L_psl is the mean of the two directions (a, b) as above.
- loss L_psa + lambda L_psl; lambda and sigma are 0 in the first ``propos.warmup_epochs`` epochs. After
  each optimizer step the target moves to m target + (1 - m) online (m rises to 1 on a cosine with
  ``propos.momentum_cosine``).
- every ``propos.reassign`` epochs and after the last one, spherical k-means (``secu.kmeans``) of the
  target features of every image, for every head, labels the next epochs and gives inference its centers.

Choices where the paper leaves room, or that deviate from it (stated):

- Both losses average the two view directions (BYOL sums them: a factor 2 on the learning rate).
- Clusters absent from the global batch are dropped from L_psl (rows and columns), not given a constant logit.
- Every k-means pass restarts from k-means++ (cluster ids are not carried from one pass to the next); an
  empty cluster keeps its previous center (``secu.kmeans``).
- The target network's BatchNorm running statistics are averaged over ranks before each k-means pass, so
  every rank embeds with the same network (each rank's target sees only its own batches).
- The optimizer is ``optim.optimizer``: SGD (the paper's CIFAR/STL setting) or ``secu.optim.LARS`` (its
  ImageNet setting), the predictor's group at ``propos.predictor_lr_mult`` x lr. The encoder's own
  ``model.predictor`` is not built (ProPos's predictor is ``propos.predictor_hidden`` wide).

Distributed: every rank computes L_psl identically from all-reduced prototype sums and counts; the gradient
reaching this rank's rows is that of L_psl over the concatenated batch, and DDP averages the parameter
gradients over the R ranks, so the back-propagated term is R L_psl (``tests/secu/test_propos.py`` checks
that 2 processes give the 1-process gradient). L_psa is a per-rank mean, which DDP's average makes global.

Legend: B = batch (this rank), D = feature dim, K = clusters of one head, P = clusters present, H = heads,
N = images of this rank's part of the collection.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secu import distributed
from secu.config import ExperimentConfig
from secu.kmeans import kmeans
from secu.method import Assignment, Batch, EpochContext, EpochSummary, OneNetworkMethod, StepOutput
from secu.model import Encoder
from secu.network import confident_clusters
from secu.normalize import normalize
from secu.optim import LARS
from secu.precision import autocast_dtype
from secu.schedules import warmup_cosine

CENTER_KEY = "centers.head{head}"
"""Key of head h's k-means centers (D x K, unit columns) in ``ProPosMethod.state_dict()["network"]``."""


def alignment_loss(pred_BD: torch.Tensor, target_BD: torch.Tensor) -> torch.Tensor:
    """mean_i 2 - 2 cos(p_i, k_i), in float32; the target carries no gradient."""
    return (2.0 - 2.0 * F.cosine_similarity(pred_BD.float(), target_BD.detach().float(), dim=1)).mean()


def cluster_sums(feats_BD: torch.Tensor, labels_B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster, the float32 sum of the rows labelled with it ([K, D], differentiable) and their count [K];
    rows labelled -1 are left out."""
    keep_B = labels_B >= 0
    labels = labels_B[keep_B].long()
    if labels.numel() and int(labels.max()) >= k:
        raise ValueError(f"a stored label is {int(labels.max())} but head 0 has K={k} clusters: the labels come "
                         "from a run with other secu.ks; start without them (no warm-start labels)")
    x_BD = feats_BD[keep_B].float()
    sums_KD = x_BD.new_zeros(k, feats_BD.shape[1]).index_add(0, labels, x_BD)
    return sums_KD, torch.bincount(labels, minlength=k).to(x_BD.dtype)


def prototype_scattering_loss(online_sums_KD: torch.Tensor, target_sums_KD: torch.Tensor, counts_K: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """L_psl of one direction from the per-cluster sums (prototype = normalised sum = normalised mean): the
    InfoNCE of each present cluster's online prototype, positive its target prototype, negatives the other
    present clusters' online prototypes; the mean over present clusters (0 when none is present)."""
    present_K = counts_K > 0
    mu_PD = F.normalize(online_sums_KD[present_K], dim=1)
    mu_t_PD = F.normalize(target_sums_KD[present_K].detach(), dim=1)
    p = mu_PD.shape[0]
    if p == 0:
        return online_sums_KD.sum() * 0.0
    logits_PP = mu_PD @ mu_PD.T / temperature
    pos_P = (mu_PD * mu_t_PD).sum(dim=1) / temperature
    eye_PP = torch.eye(p, dtype=torch.bool, device=mu_PD.device)
    logits_PP = torch.where(eye_PP, pos_P[:, None].expand(p, p), logits_PP)
    return F.cross_entropy(logits_PP, torch.arange(p, device=mu_PD.device))


def global_prototype_loss(online_BD: torch.Tensor, target_BD: torch.Tensor, labels_B: torch.Tensor, k: int,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_psl of one direction over the global batch's prototypes (identical on every rank), and the term to
    back-propagate under DDP: R L_psl with R ranks (module docstring)."""
    sums_KD, counts_K = cluster_sums(online_BD, labels_B, k)
    target_KD, _ = cluster_sums(target_BD.detach(), labels_B, k)
    stats_KE = distributed.all_reduce_sum(torch.cat([target_KD, counts_K[:, None]], dim=1))
    loss = prototype_scattering_loss(distributed.all_reduce_sum_with_grad(sums_KD), stats_KE[:, :-1],
                                     stats_KE[:, -1], temperature)
    return loss, loss * distributed.world_size()


def cosine_momentum(m0: float, t: int, total: int) -> float:
    """m_t = 1 - (1 - m0) (cos(pi t / T) + 1) / 2: m0 at t = 0, 1 at t = T."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * min(t, total) / max(total, 1)) + 1.0) / 2.0


class ProPosOnline(nn.Module):
    """The trained part: encoder f and predictor g, one forward for both views (what DDP wraps)."""

    def __init__(self, exp: ExperimentConfig) -> None:
        super().__init__()
        self.encoder = Encoder(dataclasses.replace(exp.model, predictor=False))
        d, h = exp.model.feat_dim, exp.propos.predictor_hidden
        self.predictor = nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                                       nn.Linear(h, d))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, sigma: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z1, z2, p1, p2): the unit projections of both views and the predictions g(z + e), e ~ N(0, sigma^2 I)."""
        z1_BD, z2_BD = self.encoder(view1)[0], self.encoder(view2)[0]
        q1_BD, q2_BD = z1_BD, z2_BD
        if sigma > 0:
            q1_BD = z1_BD + sigma * torch.randn_like(z1_BD)
            q2_BD = z2_BD + sigma * torch.randn_like(z2_BD)
        return z1_BD, z2_BD, self.predictor(q1_BD), self.predictor(q2_BD)


class KMeansCenters(nn.Module):
    """The last k-means pass's centers of every head (buffers ``head{h}``, D x K_h) and the number of passes."""

    passes: torch.Tensor
    """Buffer: k-means passes done (0: the centers are not defined yet)."""

    def __init__(self, feat_dim: int, ks: tuple[int, ...]) -> None:
        super().__init__()
        self.num_heads = len(ks)
        for h, k in enumerate(ks):
            self.register_buffer(f"head{h}", torch.zeros(feat_dim, k))
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))

    def matrix(self, head: int) -> torch.Tensor:
        """Head ``head``'s centers, D x K."""
        out: torch.Tensor = getattr(self, f"head{head}")
        return out


class ProPosNetwork(nn.Module):
    """Online encoder + predictor, target encoder and the k-means centers: one module, so that the keys of
    ``state_dict`` are stable."""

    def __init__(self, exp: ExperimentConfig) -> None:
        super().__init__()
        self.online = ProPosOnline(exp)
        self.target = copy.deepcopy(self.online.encoder)
        self.target.requires_grad_(False)
        self.centers = KMeansCenters(exp.model.feat_dim, exp.secu.ks)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = m target + (1 - m) online, parameter by parameter (BatchNorm statistics are the target's own)."""
        for (name_t, p_t), (name_o, p_o) in zip(self.target.named_parameters(),
                                                self.online.encoder.named_parameters(), strict=True):
            assert name_t == name_o, (name_t, name_o)
            p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)


class ProPosMethod(OneNetworkMethod[ProPosNetwork]):
    """ProPos's per-step training (``iters_per_epoch`` steps an epoch) and its k-means label pass."""

    name = "propos"
    needs_feature_pass = True

    def __init__(self, exp: ExperimentConfig, iters_per_epoch: int, device: torch.device | None = None) -> None:
        self.exp, self.cfg = exp, exp.propos
        self.device = device or torch.device("cpu")
        torch.manual_seed(exp.seed)
        self.base = ProPosNetwork(exp).to(self.device)
        self.online: nn.Module = self.base.online
        optim = exp.optim
        self.iters_per_epoch = iters_per_epoch
        self.lrs = warmup_cosine(iters_per_epoch, optim)
        self.global_step = 0
        self.use_amp = self.device.type == "cuda" and optim.mixed_precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.amp_dtype = autocast_dtype(self.device)
        self.epoch = 0
        self.kmeans_metrics: dict[str, float] = {}
        self._begin_sums()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.exp.optim
        groups: list[dict[str, Any]] = [{"params": list(self.base.online.encoder.parameters()), "name": "encoder"},
                                        {"params": list(self.base.online.predictor.parameters()), "name": "predictor"}]
        if optim.optimizer == "lars":
            return LARS(groups, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum)
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    def _begin_sums(self) -> None:
        self.steps = 0
        self.sums = [0.0, 0.0, 0.0]  # loss, L_psa, L_psl

    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """The online encoder and predictor are one network (one DDP wrapper); the target is not trained."""
        self.online = wrap(self.online)

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        """Training mode for both networks (the target normalises with batch statistics, as in BYOL)."""
        self.epoch = epoch
        self._begin_sums()
        self.online.train()
        self.base.train()

    def _schedule_index(self) -> int:
        return min(self.epoch * self.iters_per_epoch + self.steps, len(self.lrs) - 1)

    def _momentum(self, t: int) -> float:
        if self.cfg.momentum_cosine:
            return cosine_momentum(self.cfg.momentum, t, len(self.lrs))
        return self.cfg.momentum

    def _views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.exp.augment.mean, self.exp.augment.std
        return (normalize(batch["view1"].to(self.device, non_blocking=True), mean, std),
                normalize(batch["view2"].to(self.device, non_blocking=True), mean, std))

    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """L_psa + lambda L_psl on the two views, one optimizer step, one EMA step of the target; stores no labels."""
        t = self._schedule_index()
        lr = float(self.lrs[t])
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr * self.cfg.predictor_lr_mult
        warm = self.epoch < self.cfg.warmup_epochs
        sigma, lam = (0.0, 0.0) if warm else (self.cfg.sigma, self.cfg.lambda_psl)
        view1, view2 = self._views(batch)
        labels_B = stored_HB[0].to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            z1_BD, z2_BD, p1_BD, p2_BD = self.online(view1, view2, sigma)
            with torch.no_grad():
                k1_BD, k2_BD = self.base.target(view1)[0], self.base.target(view2)[0]
        loss_psa = 0.5 * (alignment_loss(p1_BD, k2_BD) + alignment_loss(p2_BD, k1_BD))
        k0, temp = self.exp.secu.ks[0], self.cfg.temperature
        psl_a, back_a = global_prototype_loss(z1_BD, k2_BD, labels_B, k0, temp)
        psl_b, back_b = global_prototype_loss(z2_BD, k1_BD, labels_B, k0, temp)
        loss_psl = 0.5 * (psl_a + psl_b)
        backward = loss_psa + lam * 0.5 * (back_a + back_b) if lam > 0 else loss_psa
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(backward).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.base.update_target(self._momentum(t))
        values = (float(loss_psa.detach()) + lam * float(loss_psl.detach()), float(loss_psa.detach()),
                  float(loss_psl.detach()))
        for i, value in enumerate(values):
            self.sums[i] += value
        self.steps += 1
        self.global_step += 1
        return StepOutput()

    def progress(self) -> str:
        """Mean loss terms so far in this epoch, the learning rate and the EMA momentum."""
        n, t = max(self.steps, 1), self._schedule_index()
        return (f"loss {self.sums[0] / n:.4f} (psa {self.sums[1] / n:.4f}, psl {self.sums[2] / n:.4f}) "
                f"lr {self.lrs[t]:.4g} m {self._momentum(t):.4f}")

    def _reduced_terms(self) -> torch.Tensor:
        """The epoch's mean loss terms over steps and ranks; FloatingPointError (on every rank) when not finite."""
        terms = distributed.all_reduce_mean(torch.tensor(self.sums, dtype=torch.float64) / max(self.steps, 1))
        if not bool(torch.isfinite(terms).all()):
            raise FloatingPointError(
                f"epoch {self.epoch}: the ProPos loss terms (loss, psa, psl) are {terms.tolist()}; lower optim.lr "
                "(or propos.lambda_psl), or set optim.mixed_precision=false")
        return terms

    def label_pass(self, epoch: int, context: EpochContext) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """The k-means pass after epoch ``epoch`` when (epoch + 1) % reassign == 0 or it is the last epoch:
        target features of every image of this rank's part, k-means of every head across ranks, the centers
        into the network's buffers; the labels of each feature batch as (ids [B], labels [H, B])."""
        if (epoch + 1) % self.cfg.reassign and epoch != self.exp.optim.epochs - 1:
            return []
        if context.feature_batches is None:
            raise ValueError("ProPos's k-means pass needs EpochContext.feature_batches (the method has "
                             "needs_feature_pass); the runner gave none")
        self._reduced_terms()  # a diverged run stops here, before k-means meets non-finite features
        self._average_target_buffers()
        ids_N, feats_ND, sizes = self._embed(context.feature_batches())
        labels_HN = []
        for h, k in enumerate(self.exp.secu.ks):
            res = kmeans(feats_ND, k, metric="cosine", max_iters=self.cfg.kmeans_iters, tol=self.cfg.kmeans_tol,
                         init_sample=self.cfg.kmeans_init_sample, seed=self.exp.seed * 1_000_003 + epoch * 101 + h)
            self.base.centers.matrix(h).copy_(res.centers_KD.T)
            labels_HN.append(res.labels_N.cpu())
            self.kmeans_metrics |= {f"propos/h{h}/kmeans_iters": float(res.iters),
                                    f"propos/h{h}/kmeans_inertia": 1.0 - res.inertia}
        self.kmeans_metrics |= {"propos/kmeans_iters": self.kmeans_metrics["propos/h0/kmeans_iters"],
                                "propos/kmeans_inertia": self.kmeans_metrics["propos/h0/kmeans_inertia"]}
        self.base.centers.passes += 1
        labels = torch.stack(labels_HN).numpy().astype(np.int64)
        bounds = np.cumsum([0, *sizes])
        return [(ids_N[a:b], labels[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @torch.no_grad()
    def _average_target_buffers(self) -> None:
        for buf in self.base.target.buffers():
            if buf.is_floating_point():
                buf.copy_(distributed.all_reduce_mean(buf))

    @torch.no_grad()
    def _embed(self, batches: Iterable[Batch]) -> tuple[np.ndarray, torch.Tensor, list[int]]:
        """Unit target features (eval mode) of every image of ``batches`` with their ids and the batch sizes;
        no collective inside (ranks may hold different numbers of batches)."""
        target = self.base.target
        was_training = target.training
        target.eval()
        mean, std = self.exp.augment.mean, self.exp.augment.std
        ids, feats, sizes = [], [], []
        for batch in batches:
            x = normalize(batch["image"].to(self.device, non_blocking=True), mean, std)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                z_BD = target(x)[0]
            feats.append(F.normalize(z_BD.float(), dim=1))
            ids.append(batch["sample_index"].long().cpu().numpy())
            sizes.append(len(ids[-1]))
        target.train(was_training)
        if not feats:
            return np.zeros(0, dtype=np.int64), torch.zeros(0, self.exp.model.feat_dim, device=self.device), []
        return np.concatenate(ids), torch.cat(feats), sizes

    def after_epoch(self) -> EpochSummary:
        """Loss terms averaged over steps and ranks, the end-of-epoch learning rate and momentum, and the last
        k-means pass's iterations and mean cosine to the assigned center (head 0; per head under propos/h{h})."""
        terms = self._reduced_terms()
        end = min((self.epoch + 1) * self.iters_per_epoch, len(self.lrs)) - 1
        metrics: dict[str, float] = {
            "train/loss": float(terms[0]), "train/loss_psa": float(terms[1]), "train/loss_psl": float(terms[2]),
            "train/lr": float(self.lrs[end]), "train/momentum": self._momentum(end), "train/steps": self.steps,
            **self.kmeans_metrics,
        }
        return EpochSummary(metrics=metrics, cluster_state=None)

    def cluster_axes(self, head: int) -> dict[str, int]:
        """Head h's centers (D x K): one column per cluster."""
        return {CENTER_KEY.format(head=head): 1}

    def center_key(self, head: int) -> str | None:
        """Head h's k-means centers, D x K (unit columns), in ``state_dict()["network"]``."""
        return CENTER_KEY.format(head=head)

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> Assignment:
        """argmax_k of the cosine between the unit target projection and head h's last k-means centers; the
        softmax probability at ``propos.temperature`` as confidence; the cosine; the projection as embedding."""
        if int(self.base.centers.passes) == 0:
            raise RuntimeError("ProPos has no k-means centers yet: train through the first k-means pass "
                               "(epoch propos.reassign - 1, or the last epoch) or load a checkpoint that has them")
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            z_BD = self.base.target(images.to(self.device))[0]
        z_BD = F.normalize(z_BD.float(), dim=1)
        triples = [confident_clusters(z_BD @ F.normalize(self.base.centers.matrix(h).float(), dim=0),
                                      self.cfg.temperature) for h in range(self.base.centers.num_heads)]
        return Assignment(clusters_HB=torch.stack([c for c, _, _ in triples]),
                          confidence_HB=torch.stack([p for _, p, _ in triples]),
                          similarity_HB=torch.stack([s for _, _, s in triples]), embedding_BD=z_BD)
