"""PFCA as a ``secu.method.ClusteringMethod``: Gan et al., "Learning the Precise Feature for Cluster
Assignment", 2021. Networks: ``secu.pfca_networks``.

A conditional generator G(z, c) with c uniform over K clusters learns the data through a WGAN-GP critic D,
while a classifier Q learns to tell which c produced a sample; the generator also minimises Q's
cross-entropy, so that the K conditions become K distinguishable modes of the data. Q, trained on generated
samples only (a variational bound on H(c | x), as in InfoGAN), is the cluster assigner of real images.

Losses (``critic_loss``, ``generator_loss``, ``classifier_loss``), x real, x~ = G(z, c):

- D: E[D(x~)] - E[D(x)] + lambda E[(||grad D(x^)||_2 - 1)^2], x^ = eps x + (1 - eps) x~, eps ~ U[0, 1] per sample
  (lambda = ``pfca.gp_weight``);
- G: -E[D(x~)] + beta_t CE(Q(x~), c), beta_t = min(beta_max, beta_0 growth^floor(g / beta_every)) at
  generator step g (``beta_schedule``);
- Q: CE(Q(x~), c) on fresh generated samples (G fixed).

Schedule (one ``train_step`` per real batch; ``global_step`` counts them over the whole run, so that epochs
shorter than ``critic_iters`` steps still advance it): every step makes one critic update; step t (0-based)
with (t + 1) % critic_iters == 0 also makes generator step g = t // critic_iters and then ``classifier_iters``
classifier updates. After n steps: n critic, n // critic_iters generator and classifier_iters * (n //
critic_iters) classifier updates. Adam (``pfca.lr``, ``pfca.adam_betas``) for each network at a constant
learning rate, as in the paper (so ``iters_per_epoch`` sets no schedule). Every update draws a fresh batch of
z and c of the real batch's size (``optim.batch_size`` per rank; the paper's 100); the stored labels of the
previous epoch are not read (PFCA has no pseudo-labels).

Distributed: DDP cannot run the double backward of the gradient penalty, so the networks stay unwrapped and
every update averages its gradients across ranks in one flattened ``all_reduce_mean`` before the optimizer
step (the gradient of the global-batch mean, every rank holding the same batch size); the float buffers
(BatchNorm statistics of G and Q, which normalise with each rank's own batch: no SyncBatchNorm, the
networks never reach the wrapper) are averaged after every classifier round, so every rank holds the same
networks. Every update is a collective: all ranks must make the same number of steps (full batches). The
z, c and eps draws are seeded from (``exp.seed``, rank, step, purpose) (``draw``): different on every rank,
reproducible and resumable.

Deviations from the paper: the networks are sized for any image side (``secu.pfca_networks``); Q is the
experiment's backbone (for a like-for-like comparison); beta is capped at ``pfca.beta_max``; the real batch
is labelled with Q in eval mode (its BatchNorm statistics come from generated samples, as at inference), so
the label store sees what ``assign`` would publish. No mixed precision: the gradient penalty differentiates
a gradient, which float16/bfloat16 make too noisy, and a WGAN critic has no bounded output to keep it in range.

Legend: B = batch, C = channels, S = image side, Z = noise dim, K = clusters, F = backbone width, H = heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secu import distributed
from secu.config import ExperimentConfig
from secu.method import Assignment, Batch, ClusteringMethod, EpochContext, EpochSummary, StepOutput
from secu.method_configs import PFCAConfig
from secu.normalize import normalize
from secu.pfca_networks import CLUSTER_AXES, PFCANetworks, embed

CRITIC, GENERATOR, CLASSIFIER = 0, 1, 2
"""The ``purpose`` of a draw: the critic's, the generator's, the first classifier update's (then 3, 4, ...)."""


@dataclass
class CriticTerms:
    """The critic's loss and its parts."""

    loss: torch.Tensor
    """E[D(fake)] - E[D(real)] + gp_weight * gp (with gradient)."""
    gp: torch.Tensor
    """The gradient penalty E[(||grad D(x^)||_2 - 1)^2] (with gradient)."""
    wasserstein: torch.Tensor
    """E[D(real)] - E[D(fake)], the critic's estimate of the Wasserstein distance (detached)."""


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real_BCSS: torch.Tensor,
                     fake_BCSS: torch.Tensor, eps_B: torch.Tensor) -> torch.Tensor:
    """E_i[(||grad_x D(x^_i)||_2 - 1)^2] at x^_i = eps_i real_i + (1 - eps_i) fake_i (WGAN-GP, Alg. 1), kept
    differentiable in D's parameters (``create_graph``). 1e-12 under the root keeps the norm's gradient finite
    at a zero input gradient."""
    eps = eps_B.view(-1, *([1] * (real_BCSS.ndim - 1)))
    mixed = (eps * real_BCSS.detach() + (1 - eps) * fake_BCSS.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    norm_B = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)
    return (norm_B - 1).pow(2).mean()


def critic_loss(critic: Callable[[torch.Tensor], torch.Tensor], real_BCSS: torch.Tensor, fake_BCSS: torch.Tensor,
                eps_B: torch.Tensor, gp_weight: float) -> CriticTerms:
    """The WGAN-GP critic loss on a real and a generated batch (fakes are treated as constants)."""
    d_real, d_fake = critic(real_BCSS).mean(), critic(fake_BCSS.detach()).mean()
    gp = gradient_penalty(critic, real_BCSS, fake_BCSS, eps_B)
    return CriticTerms(loss=d_fake - d_real + gp_weight * gp, gp=gp, wasserstein=(d_real - d_fake).detach())


def generator_loss(critic_fake_B: torch.Tensor, logits_BK: torch.Tensor, c_B: torch.Tensor, beta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-E[D(G(z, c))] + beta CE(Q(G(z, c)), c), and the cross-entropy term alone."""
    ce = F.cross_entropy(logits_BK, c_B)
    return -critic_fake_B.mean() + beta * ce, ce


def classifier_loss(logits_BK: torch.Tensor, c_B: torch.Tensor) -> torch.Tensor:
    """CE(Q(x~), c) on generated samples x~ = G(z, c): the bound on H(c | x) that Q minimises."""
    return F.cross_entropy(logits_BK, c_B)


def beta_schedule(generator_step: int, cfg: PFCAConfig) -> float:
    """beta at generator step g (0-based): beta_0 growth^floor(g / beta_every), capped at beta_max."""
    grows = generator_step // cfg.beta_every
    if cfg.beta == 0 or cfg.beta_growth == 1:
        return cfg.beta
    # The cap is reached after this many growths; a larger exponent would only overflow the float.
    enough = math.ceil(math.log(cfg.beta_max / cfg.beta) / math.log(cfg.beta_growth))
    return min(cfg.beta_max, cfg.beta * cfg.beta_growth ** min(grows, enough))


def draw(seed: int, rank: int, step: int, purpose: int, batch: int, k: int, z_dim: int, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise z [B, Z], clusters c [B] (uniform over K) and interpolation weights eps [B] (uniform in [0, 1]),
    from a generator seeded by (seed, rank, step, purpose): the same on a rerun or resume, different per rank."""
    key = np.random.SeedSequence([seed % 2**32, rank, step, purpose]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(key))
    z = torch.randn(batch, z_dim, generator=gen)
    c = torch.randint(k, (batch,), generator=gen)
    eps = torch.rand(batch, generator=gen)
    return z.to(device), c.to(device), eps.to(device)


def _average_into_grads(params: list[nn.Parameter], grads: tuple[torch.Tensor | None, ...]) -> None:
    """Set every ``p.grad`` to the mean over ranks of this rank's gradient (one flattened collective)."""
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    flat = torch.cat(parts)
    flat = distributed.all_reduce_mean(flat) if distributed.is_distributed() else flat
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor in it (nested dicts, lists, tuples) replaced by a detached CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class PFCAMethod(ClusteringMethod):
    """PFCA's adversarial training of G, D and Q (module docstring: losses, schedule, distribution)."""

    name = "pfca"
    batch_inputs = ("image",)

    def __init__(self, exp: ExperimentConfig, iters_per_epoch: int, device: torch.device | None = None) -> None:
        if len(exp.secu.ks) != 1:
            raise ValueError(f"method=pfca trains one head but secu.ks={list(exp.secu.ks)}: set secu.ks=[K]")
        self.exp, self.cfg, self.k = exp, exp.pfca, exp.secu.ks[0]
        self.iters_per_epoch = iters_per_epoch
        self.device = device or torch.device("cpu")
        torch.manual_seed(exp.seed)  # the same initial networks on every rank (nothing broadcasts them)
        self.nets = PFCANetworks(exp).to(self.device)
        self.params: dict[str, list[nn.Parameter]] = {
            "generator": list(self.nets.generator.parameters()), "critic": list(self.nets.critic.parameters()),
            "classifier": list(self.nets.classifier.parameters())}
        self.rank = distributed.rank()
        self.global_step = 0
        self.epoch = 0
        self._begin_sums()

    @cached_property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam per network, built on first use (an assign-only load never imports ``torch._dynamo``)."""
        return {name: torch.optim.Adam(ps, lr=self.cfg.lr, betas=self.cfg.adam_betas)
                for name, ps in self.params.items()}

    def _begin_sums(self) -> None:
        self.steps = 0
        self.sums = {"critic": 0.0, "gp": 0.0, "wasserstein": 0.0, "generator": 0.0, "classifier": 0.0}
        self.counts = {"critic": 0, "generator": 0, "classifier": 0}
        self.sizes_SK: list[torch.Tensor] = []

    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Not wrapped: DDP does not support the gradient penalty's double backward; ``train_step`` averages the
        gradients itself. The networks are already on the method's device."""

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        """Training mode for G, D and Q."""
        self.epoch = epoch
        self._begin_sums()
        self.nets.train()

    @property
    def beta(self) -> float:
        """beta of the next generator step."""
        return beta_schedule(self.global_step // self.cfg.critic_iters, self.cfg)

    def _draw(self, purpose: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw(self.exp.seed, self.rank, self.global_step, purpose, batch, self.k, self.cfg.z_dim, self.device)

    def _update(self, name: str, loss: torch.Tensor) -> None:
        """One optimizer step of network ``name`` with its gradient of ``loss`` averaged over ranks (the other
        networks' gradients are not computed)."""
        grads = torch.autograd.grad(loss, self.params[name], allow_unused=True)
        _average_into_grads(self.params[name], grads)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        self.counts[name] += 1

    def _critic_update(self, real_BCSS: torch.Tensor) -> None:
        z, c, eps = self._draw(CRITIC, real_BCSS.shape[0])
        with torch.no_grad():
            fake = self.nets.generator(z, c)
        terms = critic_loss(self.nets.critic, real_BCSS, fake, eps, self.cfg.gp_weight)
        self._update("critic", terms.loss)
        self.sums["critic"] += float(terms.loss.detach())
        self.sums["gp"] += float(terms.gp.detach())
        self.sums["wasserstein"] += float(terms.wasserstein)

    def _generator_update(self, batch: int) -> None:
        z, c, _ = self._draw(GENERATOR, batch)
        fake = self.nets.generator(z, c)
        loss, _ = generator_loss(self.nets.critic(fake), self.nets.classifier(fake), c, self.beta)
        self._update("generator", loss)
        self.sums["generator"] += float(loss.detach())

    def _classifier_update(self, batch: int, i: int) -> None:
        z, c, _ = self._draw(CLASSIFIER + i, batch)
        with torch.no_grad():
            fake = self.nets.generator(z, c)
        loss = classifier_loss(self.nets.classifier(fake), c)
        self._update("classifier", loss)
        self.sums["classifier"] += float(loss.detach())

    def _sync_buffers(self) -> None:
        """Average the float buffers (BatchNorm running statistics) over ranks."""
        if not distributed.is_distributed():
            return
        bufs = [b for b in self.nets.buffers() if b.is_floating_point()]
        flat = distributed.all_reduce_mean(torch.cat([b.reshape(-1) for b in bufs]))
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    @torch.no_grad()
    def _label(self, real_BCSS: torch.Tensor) -> torch.Tensor:
        """argmax Q(x) of the real batch with Q in eval mode (as ``assign`` will see it), int64 [B]."""
        self.nets.classifier.eval()
        labels_B = self.nets.classifier(real_BCSS).argmax(dim=1)
        self.nets.classifier.train()
        return labels_B

    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """One critic update; every ``critic_iters``-th step also a generator update and ``classifier_iters``
        classifier updates (module docstring). Returns argmax Q of the real batch as labels [1, B]."""
        mean, std = self.exp.augment.mean, self.exp.augment.std
        real = normalize(batch["image"].to(self.device, non_blocking=True), mean, std)
        self._critic_update(real)
        if (self.global_step + 1) % self.cfg.critic_iters == 0:
            self._generator_update(real.shape[0])
            for i in range(self.cfg.classifier_iters):
                self._classifier_update(real.shape[0], i)
            self._sync_buffers()
        labels_B = self._label(real)
        self.sizes_SK.append(torch.bincount(labels_B.cpu(), minlength=self.k).double())
        self.steps += 1
        self.global_step += 1
        return StepOutput(labels_HB=labels_B.view(1, -1))

    def label_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """argmax Q of the real batch (Q in eval mode, as in every step); no update of any network."""
        mean, std = self.exp.augment.mean, self.exp.augment.std
        real = normalize(batch["image"].to(self.device, non_blocking=True), mean, std)
        return StepOutput(labels_HB=self._label(real).view(1, -1))

    def _means(self) -> dict[str, float]:
        c = self.counts
        return {"critic": self.sums["critic"] / max(c["critic"], 1), "gp": self.sums["gp"] / max(c["critic"], 1),
                "wasserstein": self.sums["wasserstein"] / max(c["critic"], 1),
                "generator": self.sums["generator"] / max(c["generator"], 1),
                "classifier": self.sums["classifier"] / max(c["classifier"], 1)}

    def progress(self) -> str:
        """Mean losses so far in this epoch and the current beta."""
        m = self._means()
        return (f"critic {m['critic']:.4f} (gp {m['gp']:.4f}, W {m['wasserstein']:.4f}) generator "
                f"{m['generator']:.4f} classifier {m['classifier']:.4f} beta {self.beta:.4g}")

    def after_epoch(self) -> EpochSummary:
        """Loss terms averaged over the epoch's updates and over ranks (0 for a kind of update the epoch did
        not make), beta of the next generator step, the median over steps of the largest cluster's share of the
        global real batch. Raises FloatingPointError on a non-finite loss."""
        m = self._means()
        keys = ("generator", "critic", "gp", "classifier", "wasserstein")
        terms = distributed.all_reduce_mean(torch.tensor([m[k] for k in keys], dtype=torch.float64))
        names = ("train/loss", "train/loss_critic", "train/loss_gp", "train/loss_classifier", "train/wasserstein")
        metrics: dict[str, float] = {n: float(t) for n, t in zip(names, terms, strict=True)}
        metrics |= {"train/beta": self.beta, "train/steps": self.steps}
        # Every rank makes the same number of steps: the sizes of the global batches, identical on every rank.
        share = 0.0
        if self.sizes_SK:
            sizes_SK = distributed.all_reduce_sum(torch.stack(self.sizes_SK))
            share = float(np.median((sizes_SK.max(dim=1).values / sizes_SK.sum(dim=1)).numpy()))
        metrics["clusters/h0/largest_batch_share"] = share
        bad = [n for n in names if not math.isfinite(metrics[n])]
        if bad:
            raise FloatingPointError(
                f"epoch {self.epoch}: {', '.join(f'{n}={metrics[n]}' for n in bad)} is not finite; lower pfca.lr "
                f"(now {self.cfg.lr}) or keep pfca.gp_weight at 10 (now {self.cfg.gp_weight})")
        return EpochSummary(metrics=metrics, cluster_state=None)

    def state_dict(self) -> dict[str, Any]:
        """``network`` (G, D and Q in one flat CPU state dict), ``optimizer`` (per network), ``cluster_state``
        (None) and ``global_step`` (the schedule and beta derive from it); a snapshot, sharing no tensor with the
        running method (a CPU ``.cpu()`` or ``Optimizer.state_dict()`` alone would alias what the next step
        changes in place)."""
        return {"network": _cpu_copy(self.nets.state_dict()),
                "optimizer": {name: _cpu_copy(opt.state_dict()) for name, opt in self.optimizers.items()},
                "cluster_state": None, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Networks always; optimizers and global step when present (a warm start carries neither)."""
        self.nets.load_state_dict(state["network"])
        if "optimizer" in state:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizer"][name])
        self.global_step = int(state.get("global_step", 0))

    def cluster_axes(self, head: int) -> dict[str, int]:
        """G's per-cluster conditioning rows and Q's last layer (weight and bias), all on axis 0."""
        return dict(CLUSTER_AXES)

    def center_key(self, head: int) -> str | None:
        """None: PFCA has no centers; reclustering matches its clusters by label overlap."""
        return None

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> Assignment:
        """argmax Q(x), its softmax probability, its logit and the L2-normalised backbone feature."""
        logits_BK, feats_BF = embed(self.nets.classifier, images.to(self.device))
        probs_BK = logits_BK.float().softmax(dim=1)
        conf_B, clusters_B = probs_BK.max(dim=1)
        sims_B = logits_BK.gather(1, clusters_B[:, None]).squeeze(1)
        return Assignment(clusters_HB=clusters_B[None], confidence_HB=conf_B[None], similarity_HB=sims_B[None],
                          embedding_BD=feats_BF)
