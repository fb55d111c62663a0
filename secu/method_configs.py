"""Configuration of the methods other than SeCu (``ExperimentConfig.method``; the methods: ``secu.methods``).

Every method shares ``model`` (the encoder), ``optim`` (epochs, batch, learning rate and its schedule),
``augment`` (the two views) and ``secu.ks`` (the clusters of every head). What is the method's own is
here, one dataclass per method, each field naming the paper's symbol.

- ProPos: Huang et al., "Learning Representation for Clustering via Prototype Scattering and Positive
  Sampling", TPAMI 2022.
- DRC: Zhong et al., "Deep Robust Clustering by Contrastive Learning", 2020.
- PFCA: Gan et al., "Learning the Precise Feature for Cluster Assignment", 2021.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("secu", "propos", "drc", "pfca")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ProPosConfig:
    """BYOL-style online/target encoders, positive sampling alignment and prototype scattering."""

    momentum: float = 0.996
    """EMA momentum m of the target network (target = m target + (1 - m) online)."""
    momentum_cosine: bool = False
    """Raise the momentum from ``momentum`` to 1 on a cosine over the run (the ImageNet setting)."""
    sigma: float = 1e-3
    """Std of the Gaussian noise e added to the online projection before the predictor (positive sampling)."""
    lambda_psl: float = 0.1
    """lambda, the weight of the prototype scattering loss L_psl."""
    temperature: float = 0.5
    """Temperature of L_psl's InfoNCE over cluster prototypes."""
    reassign: int = 1
    """Epochs between k-means passes (1 on CIFAR, 10 on ImageNet)."""
    warmup_epochs: int = 1
    """Epochs at the start with lambda and the noise off (L_psa only)."""
    kmeans_iters: int = 300
    """Most Lloyd iterations of a k-means pass."""
    kmeans_tol: float = 1e-4
    """A pass stops when the centers move less than this (sum of squared shifts)."""
    kmeans_init_sample: int = 20000
    """Most points (over all ranks) k-means++ chooses its initial centers from."""
    predictor_lr_mult: float = 10.0
    """The predictor's learning rate is this times optim.lr."""
    predictor_hidden: int = 512
    """Hidden width of the predictor MLP."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.momentum <= 1.0, f"propos.momentum={self.momentum} must lie in [0, 1]")
        _require(self.sigma >= 0, f"propos.sigma={self.sigma} must be >= 0")
        _require(self.lambda_psl >= 0, f"propos.lambda_psl={self.lambda_psl} must be >= 0")
        _require(self.temperature > 0, f"propos.temperature={self.temperature} must be > 0")
        _require(self.reassign >= 1, f"propos.reassign={self.reassign} must be >= 1")
        _require(self.warmup_epochs >= 0, f"propos.warmup_epochs={self.warmup_epochs} must be >= 0")
        _require(self.kmeans_iters >= 1, f"propos.kmeans_iters={self.kmeans_iters} must be >= 1")
        _require(self.kmeans_tol >= 0, f"propos.kmeans_tol={self.kmeans_tol} must be >= 0")
        _require(self.kmeans_init_sample >= 1, f"propos.kmeans_init_sample={self.kmeans_init_sample} must be >= 1")
        _require(self.predictor_lr_mult > 0, f"propos.predictor_lr_mult={self.predictor_lr_mult} must be > 0")
        _require(self.predictor_hidden >= 1, f"propos.predictor_hidden={self.predictor_hidden} must be >= 1")


@dataclass
class DRCConfig:
    """A K-way head on the encoder; contrast over samples (AF) and over clusters (AP), a size penalty."""

    t_sample: float = 0.5
    """Temperature of the InfoNCE over samples between the two views' assignment features (cosine of the logit
    rows). Chosen without labels (``secu.drc``'s docstring: the most stable partitions across seeds)."""
    t_cluster: float = 1.0
    """Temperature of the InfoNCE over clusters between the two views' assignment-probability columns (cosine)."""
    lambda_size: float = 0.1
    """lambda, the weight of sum_k (sum_i p_ik)^2 / N (penalises unbalanced cluster sizes). Measured at a global
    batch of 256 (lambda = 1 fell into near-uniform probabilities with one argmax cluster); scale by 256 / G."""

    def __post_init__(self) -> None:
        _require(self.t_sample > 0 and self.t_cluster > 0,
                 f"drc.t_sample={self.t_sample}, drc.t_cluster={self.t_cluster}: must be > 0")
        _require(self.lambda_size >= 0, f"drc.lambda_size={self.lambda_size} must be >= 0")


@dataclass
class PFCAConfig:
    """A conditional WGAN-GP generator G(z, c), its critic D and the cluster classifier Q."""

    z_dim: int = 128
    """Dimension of the generator's noise z."""
    gp_weight: float = 10.0
    """Weight of the WGAN-GP gradient penalty."""
    beta: float = 1.0
    """beta_0, the weight of CE(Q(G(z, c)), c) in the generator loss at the start."""
    beta_growth: float = 1.2
    """beta is multiplied by this every ``beta_every`` generator steps."""
    beta_every: int = 1000
    """Generator steps between two beta growths."""
    beta_max: float = 100.0
    """beta never grows beyond this (a stated cap; the paper gives none)."""
    lr: float = 1e-4
    """Adam learning rate of G, D and Q."""
    adam_betas: tuple[float, float] = (0.5, 0.9)
    """Adam betas of G, D and Q."""
    critic_iters: int = 5
    """Critic updates per generator update (one per training batch)."""
    classifier_iters: int = 2
    """Classifier updates per generator update."""
    width: int = 64
    """Base channel width of G, D and Q."""

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        _require(self.z_dim >= 1, f"pfca.z_dim={self.z_dim} must be >= 1")
        _require(self.gp_weight >= 0, f"pfca.gp_weight={self.gp_weight} must be >= 0")
        _require(self.beta >= 0 and self.beta_max >= self.beta,
                 f"pfca.beta={self.beta}, pfca.beta_max={self.beta_max}: need 0 <= beta <= beta_max")
        _require(self.beta_growth >= 1, f"pfca.beta_growth={self.beta_growth} must be >= 1")
        _require(self.beta_every >= 1, f"pfca.beta_every={self.beta_every} must be >= 1")
        _require(self.lr > 0, f"pfca.lr={self.lr} must be > 0")
        _require(all(0 <= b < 1 for b in self.adam_betas), f"pfca.adam_betas={self.adam_betas} must lie in [0, 1)")
        _require(self.critic_iters >= 1, f"pfca.critic_iters={self.critic_iters} must be >= 1")
        _require(self.classifier_iters >= 1, f"pfca.classifier_iters={self.classifier_iters} must be >= 1")
        _require(self.width >= 8, f"pfca.width={self.width} must be >= 8")
