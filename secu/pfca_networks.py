"""PFCA's three networks (Gan et al., "Learning the Precise Feature for Cluster Assignment", 2021): the
conditional generator G(z, c), the WGAN-GP critic D and the cluster classifier Q; the method is ``secu.pfca``.

The paper's networks are DCGAN-style for 28x28 MNIST (G: FC, FC to 7x7, two up-convolutions; D: two stride-2
convolutions, FC). Here the same shapes are derived for any side S >= 8 from one pyramid of sides
``S, ceil(S/2), ...`` down to at most 7 (``pyramid``): 28 -> [28, 14, 7] (the paper's), 32 -> [32, 16, 8, 4],
96 -> [96, 48, 24, 12, 6]; channels are w, 2w, 4w, 4w, ... from the full side down (w = ``pfca.width``).

- G: z W_z + W_c[c] (exactly a Linear on the concatenation [z, onehot(c)], its one-hot block stored as an
  ``nn.Embedding`` with one row per cluster, so reclustering permutes it on axis 0), BN, ReLU, reshaped to the
  smallest side, then per level nearest upsampling to the next side, 3x3 conv, BN, ReLU; a 3x3 conv to C
  channels, a sigmoid (a pixel in [0, 1]) and the data's normalisation ``(p - mean) / std``, so fakes live
  in the same space as ``secu.augment.normalize`` puts real images. Nearest upsampling + conv rather than
  transposed convolutions: it reaches odd sides (7 -> 14 -> 28, 3 -> 5) exactly and avoids checkerboards.
- D: stride-2 3x3 convolutions down the pyramid with LeakyReLU(0.2), flattened, a linear output. No
  normalisation at all: the gradient penalty is per sample, which BatchNorm would break (WGAN-GP, Sec. 4).
- Q: the backbone of ``exp.model`` (``secu.model.build_backbone``, the encoder every method is compared with)
  and a K-way linear layer.

Legend: B = batch, C = image channels, S = image side, Z = noise dim, K = clusters, F = backbone width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from secu.config import ExperimentConfig
from secu.model import build_backbone

CLUSTER_AXES = {"generator.cluster.weight": 0, "classifier.head.weight": 0, "classifier.head.bias": 0}
"""Entries of ``PFCANetworks.state_dict()`` with one slice per cluster, and that axis."""


def pyramid(side: int) -> list[int]:
    """The sides of G's levels from ``side`` down: each the ceiling of half the previous, until one is <= 7
    (a stride-2 3x3 convolution with padding 1 maps side s to ceil(s / 2), so D walks the same list)."""
    if side < 8:
        raise ValueError(f"PFCA needs images of side >= 8, got {side}: raise augment.image_size")
    sides = [side]
    while sides[-1] > 7:
        sides.append((sides[-1] + 1) // 2)
    return sides


def level_channels(levels: int, width: int) -> list[int]:
    """Channels at each pyramid level from the full side down: w, 2w, 4w, 4w, ..."""
    return [width * 2 ** min(i, 2) for i in range(levels)]


class Generator(nn.Module):
    """G(z, c): noise z_BZ and cluster ids c_B to normalised images B x C x S x S."""

    mean: torch.Tensor
    """The data's per-channel mean [1, C, 1, 1] (a buffer outside the state dict)."""
    std: torch.Tensor
    """The data's per-channel std [1, C, 1, 1]."""

    def __init__(self, z_dim: int, k: int, side: int, channels: int, width: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.sides = pyramid(side)
        chans = level_channels(len(self.sides), width)
        self.start_channels, self.start_side = chans[-1], self.sides[-1]
        hidden = self.start_channels * self.start_side ** 2
        self.noise = nn.Linear(z_dim, hidden)
        self.cluster = nn.Embedding(k, hidden)
        # Initialised as the one-hot columns of one Linear on [z, onehot(c)] would be (fan-in Z + K).
        bound = 1.0 / (z_dim + k) ** 0.5
        nn.init.uniform_(self.noise.weight, -bound, bound)
        nn.init.uniform_(self.noise.bias, -bound, bound)
        nn.init.uniform_(self.cluster.weight, -bound, bound)
        self.stem = nn.Sequential(nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        ups: list[nn.Module] = []
        for i in range(len(self.sides) - 2, -1, -1):
            ups += [nn.Upsample(size=self.sides[i], mode="nearest"),
                    nn.Conv2d(chans[i + 1], chans[i], 3, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i]), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*ups)
        self.to_image = nn.Conv2d(chans[0], channels, 3, padding=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, z_BZ: torch.Tensor, c_B: torch.Tensor) -> torch.Tensor:
        """Images in the normalised space of ``secu.augment.normalize``."""
        h = self.stem(self.noise(z_BZ) + self.cluster(c_B))
        h = h.view(-1, self.start_channels, self.start_side, self.start_side)
        pixels = torch.sigmoid(self.to_image(self.up(h)))
        return (pixels - self.mean) / self.std


class Critic(nn.Module):
    """D(x): normalised images to one unbounded score each (no normalisation layers)."""

    def __init__(self, side: int, channels: int, width: int) -> None:
        super().__init__()
        sides = pyramid(side)
        chans = level_channels(len(sides), width)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(len(sides) - 1):
            layers += [nn.Conv2d(c_in, chans[i + 1], 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = chans[i + 1]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c_in * sides[-1] ** 2, 1)

    def forward(self, x_BCSS: torch.Tensor) -> torch.Tensor:
        """Scores [B]."""
        return self.out(self.features(x_BCSS).flatten(1)).squeeze(1)


class Classifier(nn.Module):
    """Q(c | x): the experiment's backbone and a K-way linear layer (the cluster assigner)."""

    def __init__(self, exp: ExperimentConfig, k: int) -> None:
        super().__init__()
        self.backbone, width = build_backbone(exp.model)
        self.head = nn.Linear(width, k)

    def features(self, x_BCSS: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, F]."""
        out: torch.Tensor = self.backbone(x_BCSS)
        return out

    def forward(self, x_BCSS: torch.Tensor) -> torch.Tensor:
        """Logits [B, K]."""
        out: torch.Tensor = self.head(self.features(x_BCSS))
        return out


class PFCANetworks(nn.Module):
    """G, D and Q as one module: one state dict with stable keys ``generator.*``, ``critic.*``, ``classifier.*``."""

    def __init__(self, exp: ExperimentConfig) -> None:
        super().__init__()
        k, aug, cfg = exp.secu.ks[0], exp.augment, exp.pfca
        self.generator = Generator(cfg.z_dim, k, aug.image_size, aug.channels, cfg.width, aug.mean, aug.std)
        self.critic = Critic(aug.image_size, aug.channels, cfg.width)
        self.classifier = Classifier(exp, k)


def embed(classifier: Classifier, x_BCSS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q's logits [B, K] and its L2-normalised backbone feature [B, F] (one backbone pass)."""
    feats_BF = classifier.features(x_BCSS)
    return classifier.head(feats_BF), F.normalize(feats_BF, dim=1)
