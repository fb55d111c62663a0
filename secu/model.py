"""The encoder f = backbone + projection MLP (+ optional predictor), spec section 1.

Inputs are float images already normalised with the dataset mean/std (``secu.augment.normalize``);
outputs are L2-normalised, z = f(x) / ||f(x)||. No pretrained weights are ever downloaded.

Backbones (``ModelConfig.backbone``), all taking ``cfg.in_channels`` input channels:

- ``small_cnn``: six 3x3 conv-BN-ReLU layers and global average pooling, for CPU runs at 28x28.
- ``resnet18_cifar``: ResNet-18 with a 3x3 stride-1 first conv and no max-pool (32x32, 28x28 images).
- ``resnet18_stl``: ResNet-18 for 96x96 (STL-10): 3x3 stride-1 first conv, then the 3x3 stride-2
  max-pool, so the residual stages see 48x48 maps (96 / 2). Why: the ImageNet stem (7x7 stride 2 +
  max-pool) shrinks 96 px to 24x24 and loses detail; no max-pool at all would run the stages on 96x96,
  9x the cost of the CIFAR network. 48x48 keeps the first conv at full resolution at 2.25x that cost.
- ``resnet50``: torchvision's ResNet-50 (ImageNet stem), ``weights=None``.

Legend: B = batch, C = input channels, H, W = image size, F = backbone width (d in the spec),
D = feature dim, h = MLP hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secu.config import ModelConfig

__all__ = ["Encoder", "SmallCNN", "build_backbone", "build_predictor", "build_projection"]


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # No conv bias: the following BatchNorm subtracts the mean anyway.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Six 3x3 conv-BN-ReLU layers (widths w, w, 2w, 2w, 4w, 4w) and global average pooling.

    Two stride-2 convs take 28x28 to 7x7 early, which is what makes the network fast on a CPU;
    the output width is F = 4w.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        """Create the network.

        Args:
            in_channels: C, channels of the input images.
            width: w, the base channel width.
        """
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w, 1),
            _conv_bn_relu(w, w, 2),
            _conv_bn_relu(w, 2 * w, 1),
            _conv_bn_relu(2 * w, 2 * w, 2),
            _conv_bn_relu(2 * w, 4 * w, 1),
            _conv_bn_relu(4 * w, 4 * w, 1),
        )
        self.out_dim = 4 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Map B x C x H x W images to B x F features."""
        return self.features(x_BCHW).mean(dim=(2, 3))


def _small_image_stem(in_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation as torchvision gives its own convs.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone named by ``cfg.backbone``, randomly initialised.

    Args:
        cfg: ``backbone``, ``in_channels`` and ``cnn_width`` are used.

    Returns:
        ``(module, F)``: the module maps B x C x H x W to B x F features.

    Raises:
        ValueError: For an unknown backbone name.
    """
    if cfg.backbone == "small_cnn":
        cnn = SmallCNN(cfg.in_channels, cfg.cnn_width)
        return cnn, cnn.out_dim
    # torchvision only for its ResNets: importing it costs ~2 s of CPU (torch._dynamo through torchvision.ops),
    # paid by every process that builds a small CNN (inference actors, training workers) otherwise.
    from torchvision.models import resnet18, resnet50

    if cfg.backbone in ("resnet18_cifar", "resnet18_stl"):
        net = resnet18(weights=None)
        net.conv1 = _small_image_stem(cfg.in_channels)
        if cfg.backbone == "resnet18_cifar":
            net.maxpool = nn.Identity()
        # resnet18_stl keeps torchvision's 3x3 stride-2 max-pool: 96 -> 48 (see module docstring).
        net.fc = nn.Identity()
        return net, 512
    if cfg.backbone == "resnet50":
        net = resnet50(weights=None)
        if cfg.in_channels != 3:
            net.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.fc = nn.Identity()
        return net, 2048
    raise ValueError(f"model.backbone={cfg.backbone!r} is unknown")


def build_projection(in_dim: int, cfg: ModelConfig) -> nn.Sequential:
    """Projection MLP from the backbone width F to D = ``cfg.feat_dim``.

    ``cfg.mlp == "cifar"``: Linear(F, h)-BN-ReLU-Linear(h, D).
    ``cfg.mlp == "imagenet"``: Linear(F, h)-BN-ReLU-Linear(h, h)-BN-ReLU-Linear(h, D)-BN.
    h = ``cfg.hidden_dim`` or F when that is 0.
    """
    h, d_out = cfg.hidden_dim or in_dim, cfg.feat_dim
    if cfg.mlp == "cifar":
        return nn.Sequential(
            nn.Linear(in_dim, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, d_out)
        )
    if cfg.mlp == "imagenet":
        return nn.Sequential(
            nn.Linear(in_dim, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, d_out, bias=False),
            nn.BatchNorm1d(d_out),
        )
    raise ValueError(f"model.mlp={cfg.mlp!r} is unknown")


def build_predictor(in_dim: int, cfg: ModelConfig) -> nn.Sequential:
    """Predictor MLP Linear(D, h)-BN-ReLU-Linear(h, D) on top of the projection (ImageNet variant).

    Args:
        in_dim: F, the backbone width; h = ``cfg.hidden_dim`` or F.
        cfg: ``feat_dim`` (D) and ``hidden_dim`` are used.
    """
    h, d = cfg.hidden_dim or in_dim, cfg.feat_dim
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, d))


class Encoder(nn.Module):
    """f = backbone + projection (+ predictor); returns L2-normalised outputs.

    BatchNorm layers are plain ``BatchNorm*d``; multi-worker training converts them with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` when ``cfg.sync_bn`` is set (not done here, because
    it needs an initialised process group).
    """

    feat_dim: int
    """D, the dimension of the returned features."""
    backbone_dim: int
    """F, the width of the backbone output."""

    def __init__(self, cfg: ModelConfig) -> None:
        """Build the encoder described by ``cfg`` (random initialisation)."""
        super().__init__()
        self.backbone, self.backbone_dim = build_backbone(cfg)
        self.projection = build_projection(self.backbone_dim, cfg)
        self.predictor = build_predictor(self.backbone_dim, cfg) if cfg.predictor else None
        self.feat_dim = cfg.feat_dim

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode normalised images.

        Args:
            x_BCHW: Float images, normalised with the dataset mean/std.

        Returns:
            ``(z_BD, p_BD)``: the L2-normalised projection, and the L2-normalised predictor output
            (computed from the un-normalised projection) or None without a predictor.
        """
        proj_BD = self.projection(self.backbone(x_BCHW))
        z_BD = F.normalize(proj_BD, dim=1)
        if self.predictor is None:
            return z_BD, None
        return z_BD, F.normalize(self.predictor(proj_BD), dim=1)

    def embed(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The normalised projection z only (inference)."""
        return self.forward(x_BCHW)[0]
