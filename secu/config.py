"""Typed, validated configuration of the SeCu algorithm (overrides: ``secu.overrides``; recipes: ``secu.recipes``).

Every field names the paper's symbol (SeCu, ICCV 2023) and the flag of the authors' run scripts
where one exists.

Configs are plain dataclasses so that they can be saved into every checkpoint and output
(``to_dict``), read back (``from_dict``) and overridden from the command line
(``secu.overrides.apply_overrides(cfg, ["optim.lr=0.1"])``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secu.method_configs import METHODS, DRCConfig, PFCAConfig, ProPosConfig
from secu.overrides import merge

BACKBONES = ("small_cnn", "resnet18_cifar", "resnet18_stl", "resnet50")
CONSTRAINTS = ("size", "entropy")
OPTIMIZERS = ("sgd", "lars")
CENTER_LR_SCHEDULES = ("constant", "cosine_rise")
MLP_KINDS = ("cifar", "imagenet")
VIEWS_ON_DEVICE = ("auto", "true", "false")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """Encoder f = backbone + projection MLP (+ optional predictor)."""

    backbone: str = "resnet18_cifar"
    """One of small_cnn, resnet18_cifar (3x3 stride-1 stem, no max-pool), resnet18_stl, resnet50."""
    in_channels: int = 3
    """Image channels the backbone takes (1 for grayscale data such as Fashion-MNIST)."""
    feat_dim: int = 128
    """D, the dimension of the L2-normalised feature z (authors' ``--secu-dim``)."""
    hidden_dim: int = 0
    """d, the MLP hidden width; 0 means the backbone's output width."""
    mlp: str = "cifar"
    """Projection head: 'cifar' = Linear-BN-ReLU-Linear; 'imagenet' = 3 layers with BN."""
    predictor: bool = False
    """ImageNet variant: a predictor MLP on top of the projection (loss divisor becomes 4H)."""
    cnn_width: int = 32
    """Base channel width of the small CNN backbone (CPU recipes only)."""
    sync_bn: bool = True
    """Multi-GPU training normalises BatchNorm over the global batch (torch's SyncBatchNorm). False: each
    worker normalises over its own part of the batch."""
    sync_bn_cpu: bool = False
    """Also on CPU workers (gloo): BatchNorm over the global batch with ``secu.cross_rank_bn``. Off by default:
    on 2 CPU workers sharing 2 cores it cost about 36 % of the training throughput; it raised the demo's test ACC
    at batch 128 (median 0.685 over 3 seeds) but not at 256 (docs/benchmarks.md, "BatchNorm over the global
    batch on CPU workers"). Needs ``sync_bn``."""

    def __post_init__(self) -> None:
        _require(self.backbone in BACKBONES, f"model.backbone={self.backbone!r}: choose one of {BACKBONES}")
        _require(self.in_channels in (1, 3), f"model.in_channels={self.in_channels}: use 1 or 3")
        _require(self.feat_dim > 0, f"model.feat_dim={self.feat_dim} must be positive")
        _require(self.hidden_dim >= 0, f"model.hidden_dim={self.hidden_dim} must be >= 0")
        _require(self.mlp in MLP_KINDS, f"model.mlp={self.mlp!r}: choose one of {MLP_KINDS}")
        _require(self.cnn_width > 0, f"model.cnn_width={self.cnn_width} must be positive")
        _require(self.sync_bn or not self.sync_bn_cpu,
                 "model.sync_bn_cpu=true needs model.sync_bn=true (or drop model.sync_bn_cpu)")


@dataclass
class SeCuConfig:
    """The clustering objective: heads, temperatures and the global constraint."""

    ks: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    """K_h for every head h (authors' ``--secu-k``). Head 0 is evaluated."""
    constraint: str = "size"
    """'size' (lower bound on cluster sizes, dual variables) or 'entropy' (entropy of sizes)."""
    tx: float = 0.05
    """Temperature of the representation loss (``--secu-tx``)."""
    tw: float = 0.05
    """Temperature of the center loss (``--secu-tw``)."""
    tau: float = 0.2
    """Weight of the one-hot stored label in the soft target (``--secu-tau`` in the scripts)."""
    dual_lr: float = 0.1
    """Step size of the dual variables rho under the size constraint (``--secu-dual-lr``)."""
    lratio: float = 0.9
    """Lower-bound ratio: every cluster should hold at least lratio * G / K of a batch (``--secu-lratio``)."""
    alpha: float = 6000.0
    """Weight of the entropy term under the entropy constraint (``--secu-alpha`` for entropy runs)."""

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        _require(len(self.ks) > 0, "secu.ks is empty: give at least one head, e.g. secu.ks=[10]")
        _require(all(k >= 2 for k in self.ks), f"secu.ks={list(self.ks)}: every K must be >= 2")
        _require(
            self.constraint in CONSTRAINTS, f"secu.constraint={self.constraint!r}: choose one of {CONSTRAINTS}"
        )
        _require(self.tx > 0 and self.tw > 0, f"secu.tx={self.tx}, secu.tw={self.tw}: must be positive")
        _require(0.0 <= self.tau <= 1.0, f"secu.tau={self.tau} must lie in [0, 1]")
        _require(self.dual_lr >= 0, f"secu.dual_lr={self.dual_lr} must be >= 0")
        _require(0.0 < self.lratio <= 1.0, f"secu.lratio={self.lratio} must lie in (0, 1]")
        _require(self.alpha >= 0, f"secu.alpha={self.alpha} must be >= 0")

    @property
    def num_heads(self) -> int:
        """H, the number of heads."""
        return len(self.ks)


@dataclass
class OptimConfig:
    """Optimisation: two parameter groups (encoder: lr, centers: clr) and the schedules."""

    optimizer: str = "sgd"
    """'sgd' (momentum) for small images; 'lars' for ImageNet."""
    lr: float = 0.2
    """Peak encoder learning rate (``--lr``)."""
    clr: float = 1.2
    """Center learning rate (``--secu-clr``)."""
    center_lr_schedule: str = "constant"
    """'constant', or 'cosine_rise' = clr * (1 - cos(pi t / (E I))) / 2 (ImageNet, entropy)."""
    weight_decay: float = 1e-4
    """Weight decay, applied to both groups (``--wd``)."""
    momentum: float = 0.9
    """Momentum, applied to both groups."""
    epochs: int = 401
    """E, total epochs including epoch 0, which only initialises centers and labels (lr = 0)."""
    warmup_epochs: int = 11
    """Epochs init_epochs..warmup_epochs-1 warm the encoder lr up linearly; cosine decay afterwards."""
    init_epochs: int = 1
    """Epochs at the start with encoder lr 0, which only initialise centers and labels (the paper: 1)."""
    batch_size: int = 128
    """Global batch G across all workers."""
    mixed_precision: bool = True
    """bfloat16/float16 autocast on GPU; ignored on CPU."""

    def __post_init__(self) -> None:
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer={self.optimizer!r}: choose {OPTIMIZERS}")
        _require(
            self.center_lr_schedule in CENTER_LR_SCHEDULES,
            f"optim.center_lr_schedule={self.center_lr_schedule!r}: choose {CENTER_LR_SCHEDULES}",
        )
        _require(self.lr >= 0 and self.clr >= 0, "optim.lr and optim.clr must be >= 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.momentum < 1, f"optim.momentum={self.momentum} must lie in [0, 1)")
        _require(self.epochs >= 1, f"optim.epochs={self.epochs} must be >= 1")
        _require(
            1 <= self.warmup_epochs <= self.epochs,
            f"optim.warmup_epochs={self.warmup_epochs} must lie in [1, optim.epochs={self.epochs}]",
        )
        _require(
            1 <= self.init_epochs <= self.warmup_epochs,
            f"optim.init_epochs={self.init_epochs} must lie in [1, optim.warmup_epochs={self.warmup_epochs}]",
        )
        _require(self.batch_size >= 2, f"optim.batch_size={self.batch_size} must be >= 2")


@dataclass
class AugmentConfig:
    """Two asymmetric views (secu-algorithm.md section 5). Views are produced as uint8 images;
    normalisation with mean/std happens on the training device."""

    image_size: int = 32
    """Output side of both views (RandomResizedCrop size)."""
    min_crop: float = 0.3
    """Lower end of the RandomResizedCrop scale range (``--min-crop``)."""
    channels: int = 3
    """Channels of the views (1 keeps grayscale; 3 converts grayscale to RGB)."""
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    """Per-channel mean for normalisation."""
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    """Per-channel std for normalisation."""
    jitter_p: float = 0.8
    """Probability of ColorJitter(0.4, 0.4, 0.2, 0.1) (brightness/contrast only on 1 channel)."""
    grayscale_p: float = 0.2
    """Probability of RandomGrayscale (a no-op on 1-channel views)."""
    blur_p: tuple[float, float] = (1.0, 0.1)
    """Probability of GaussianBlur(sigma in [0.1, 2]) for view 1 and view 2."""
    solarize_p: tuple[float, float] = (0.0, 0.2)
    """Probability of Solarize for view 1 and view 2."""
    flip: bool = True
    """Random horizontal flip."""
    eval_resize: int = 0
    """Evaluation transform: resize the short side to this (0 = image_size), then center crop."""
    views_on_device: str = "false"
    """Where training computes the two views: 'false' (default) in the Ray Data stream on CPUs (decode + both
    views);
    'true' on every training worker's device, from a batch of decoded fixed-size images (Ray Data only
    reads and decodes: ``secu.batch_augment.to_canvas``, ``BatchTwoViewAugment.views_of_canvas``); 'auto'
    = 'true' when the training workers have GPUs (``compute.use_gpu``), else 'false'. 'auto' is meant to
    become the default once the device path has run on a GPU (so far it has run on CPU tensors only).
    Methods without views (PFCA) and self-labeling always use the stream as before."""

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.blur_p = (float(self.blur_p[0]), float(self.blur_p[1]))
        self.solarize_p = (float(self.solarize_p[0]), float(self.solarize_p[1]))
        _require(self.image_size >= 8, f"augment.image_size={self.image_size} must be >= 8")
        _require(0 < self.min_crop <= 1, f"augment.min_crop={self.min_crop} must lie in (0, 1]")
        _require(self.channels in (1, 3), f"augment.channels={self.channels}: use 1 or 3")
        _require(
            len(self.mean) == self.channels and len(self.std) == self.channels,
            f"augment.mean/std need {self.channels} values (one per channel), got {self.mean} / {self.std}",
        )
        _require(all(s > 0 for s in self.std), f"augment.std={self.std} must be positive")
        for name in ("jitter_p", "grayscale_p"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"augment.{name}={value} must lie in [0, 1]")
        for p in (*self.blur_p, *self.solarize_p):
            _require(0 <= p <= 1, f"augment blur_p/solarize_p={p} must lie in [0, 1]")
        _require(self.eval_resize >= 0, f"augment.eval_resize={self.eval_resize} must be >= 0")
        if isinstance(self.views_on_device, bool):  # a YAML true/false
            self.views_on_device = "true" if self.views_on_device else "false"
        self.views_on_device = str(self.views_on_device).strip().lower()
        _require(self.views_on_device in VIEWS_ON_DEVICE,
                 f"augment.views_on_device={self.views_on_device!r}: choose one of {VIEWS_ON_DEVICE}")

    def views_on_device_for(self, use_gpu: bool) -> bool:
        """Whether the training workers compute the views (``views_on_device``, 'auto' resolved by ``use_gpu``)."""
        return self.views_on_device == "true" or (self.views_on_device == "auto" and use_gpu)


@dataclass
class AdaptConfig:
    """Schedule defaults derived from the collection's size (``secu.adapt``; docs/benchmarks.md,
    "Robustness"). Applied when the number of images is known, to the keys not listed in ``fixed``."""

    enabled: bool = True
    """Derive optim.batch_size, optim.epochs and optim.warmup_epochs from N (false: use them as given)."""
    min_steps: int = 2500
    """Optimizer steps a run makes at least (the 60,000-image CPU recipe makes 2,808)."""
    min_warmup_steps: int = 120
    """Steps of the encoder's linear learning-rate warm-up at least (the 60,000-image recipe makes 234)."""
    min_steps_per_epoch: int = 64
    """The batch is halved while an epoch would have fewer steps than this."""
    min_batch: int = 64
    """The adapted batch never goes below this (nor below 2 x the largest K)."""
    alpha_per_image: float = 0.12
    """Entropy constraint: secu.alpha is capped at this x N (CIFAR-10's reference 6000 / 50,000)."""
    fixed: tuple[str, ...] = ()
    """Keys the user set explicitly (filled by the jobs from --set and the config file); kept as given."""

    def __post_init__(self) -> None:
        self.fixed = tuple(str(k) for k in self.fixed if str(k))
        _require(self.min_steps >= 1, f"adapt.min_steps={self.min_steps} must be >= 1")
        _require(self.min_warmup_steps >= 0, f"adapt.min_warmup_steps={self.min_warmup_steps} must be >= 0")
        _require(self.min_steps_per_epoch >= 1, f"adapt.min_steps_per_epoch={self.min_steps_per_epoch} must be >= 1")
        _require(self.min_batch >= 2, f"adapt.min_batch={self.min_batch} must be >= 2")
        _require(self.alpha_per_image > 0, f"adapt.alpha_per_image={self.alpha_per_image} must be > 0")


@dataclass
class SelfLabelConfig:
    """Self-labeling, the fine-tuning stage after clustering (``secu.self_label``; SCAN, ECCV 2020)."""

    head: int = 0
    """The head fine-tuned (its centers are the classifier; the other heads are left as they are)."""
    threshold: float = 0.99
    """With per_cluster_frac = 0: an instance is confident when its top probability softmax(z C_h / tw) on
    the weak view exceeds this (SCAN's rule)."""
    per_cluster_frac: float = 0.5
    """> 0: the confident set is, in each cluster of the batch, this share of its most confident members
    (every cluster keeps some; ``secu.self_label.select_per_cluster``)."""
    epochs: int = 10
    """Passes over the collection."""
    lr: float = 1e-4
    """AdamW learning rate (encoder and the head's centers)."""
    weight_decay: float = 1e-4
    """AdamW (decoupled) weight decay."""
    batch_size: int = 256
    """Global batch."""
    weak_min_crop: float = 0.8
    """The weak view: RandomResizedCrop(scale=(weak_min_crop, 1)) and a flip, nothing else."""

    def __post_init__(self) -> None:
        _require(self.head >= 0, f"self_label.head={self.head} must be >= 0")
        _require(0.0 < self.threshold < 1.0, f"self_label.threshold={self.threshold} must lie in (0, 1)")
        _require(0.0 <= self.per_cluster_frac <= 1.0,
                 f"self_label.per_cluster_frac={self.per_cluster_frac} must lie in [0, 1]")
        _require(self.epochs >= 1, f"self_label.epochs={self.epochs} must be >= 1")
        _require(self.lr > 0 and self.weight_decay >= 0, "self_label.lr must be > 0, weight_decay >= 0")
        _require(self.batch_size >= 2, f"self_label.batch_size={self.batch_size} must be >= 2")
        _require(0 < self.weak_min_crop <= 1, f"self_label.weak_min_crop={self.weak_min_crop} must lie in (0, 1]")


@dataclass
class ExperimentConfig:
    """Everything the algorithm needs; saved into every checkpoint and output."""

    name: str = "custom"
    """Recipe name this config came from (informational)."""
    method: str = "secu"
    """The clustering method (``secu.methods``): secu, propos, drc or pfca. Every method uses ``model``,
    ``optim``, ``augment`` and the clusters ``secu.ks``; its own settings are in the section of its name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    secu: SeCuConfig = field(default_factory=SeCuConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    self_label: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    propos: ProPosConfig = field(default_factory=ProPosConfig)
    drc: DRCConfig = field(default_factory=DRCConfig)
    pfca: PFCAConfig = field(default_factory=PFCAConfig)
    seed: int = 0
    """Seed for initialisation and augmentation streams."""

    def __post_init__(self) -> None:
        _require(self.method in METHODS, f"method={self.method!r}: choose one of {METHODS}")
        _require(self.method != "pfca" or len(self.secu.ks) == 1,
                 f"method=pfca trains one head but secu.ks={list(self.secu.ks)}: set secu.ks=[{self.secu.ks[0]}] "
                 "(or use the recipe fashion-mnist-cpu-pfca)")
        _require(self.self_label.head < len(self.secu.ks),
                 f"self_label.head={self.self_label.head}: the config has {len(self.secu.ks)} heads (secu.ks)")
        _require(
            self.model.in_channels == self.augment.channels,
            f"model.in_channels={self.model.in_channels} differs from augment.channels="
            f"{self.augment.channels}: set both to the same value",
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build a validated config from a (possibly partial) nested dict; unknown keys are errors."""
        return merge(cls(), data)
