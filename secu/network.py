"""The trained network: encoder f plus the centers of every head, as one module.

Keeping both in one ``nn.Module`` lets DDP average the gradients of encoder and centers together.
The forward pass also computes the similarities s = stopgrad(z) C_h (spec 3.1), so that the gradient
that reaches the centers flows through DDP's hooks like any other.

Legend: B = batch, D = feature dim, K = clusters of one head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secu.centers import Centers
from secu.config import ExperimentConfig
from secu.model import Encoder


@dataclass
class ViewOutputs:
    """Outputs of one forward pass on two views."""

    z1_BD: torch.Tensor
    z2_BD: torch.Tensor
    sims1_BK: list[torch.Tensor]
    """Per head, stopgrad(z1) C_h."""
    sims2_BK: list[torch.Tensor]
    p1_BD: torch.Tensor | None = None
    """Predictor outputs (ImageNet variant), L2-normalised; None without a predictor."""
    p2_BD: torch.Tensor | None = None
    psims1_BK: list[torch.Tensor] | None = None
    """Per head, stopgrad(p1) C_h (ImageNet variant)."""
    psims2_BK: list[torch.Tensor] | None = None


class SeCuNetwork(nn.Module):
    """Encoder (returning normalised projection and optional predictor output) plus centers."""

    def __init__(self, encoder: nn.Module, feat_dim: int, ks: tuple[int, ...] | list[int],
                 generator: torch.Generator | None = None):
        super().__init__()
        self.encoder = encoder
        self.centers = Centers(feat_dim, ks, generator=generator)

    def _sims(self, z_BD: torch.Tensor) -> list[torch.Tensor]:
        z = z_BD.detach().float()
        return [z @ self.centers.normalized(h).float() for h in range(self.centers.num_heads)]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ViewOutputs:
        """Encode both views and compute their similarities to every head's centers."""
        z1, p1 = self.encoder(view1)
        z2, p2 = self.encoder(view2)
        out = ViewOutputs(z1_BD=z1, z2_BD=z2, sims1_BK=self._sims(z1), sims2_BK=self._sims(z2))
        if p1 is not None and p2 is not None:
            out.p1_BD, out.p2_BD = p1, p2
            out.psims1_BK, out.psims2_BK = self._sims(p1), self._sims(p2)
        return out

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Inference: per head the cosine similarities z C_h (B x K), and the embeddings z (B x D)."""
        z, _ = self.encoder(images)
        z = z.float()
        return [z @ self.centers.normalized(h).float() for h in range(self.centers.num_heads)], z


def confident_clusters(sims_BK: torch.Tensor, tw: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference for one head (spec 7): the cluster argmax_k z C_h, its softmax probability at the center
    temperature ``tw`` (the confidence) and its cosine similarity; each [B]."""
    sims_BK = sims_BK.float()
    prob_B, cluster_B = torch.softmax(sims_BK / tw, dim=1).max(dim=1)
    return cluster_B, prob_B, sims_BK.gather(1, cluster_B[:, None])[:, 0]


def build_network(experiment: ExperimentConfig) -> SeCuNetwork:
    """The network of a config, initialised deterministically from its seed (same on every rank)."""
    torch.manual_seed(experiment.seed)
    encoder = Encoder(experiment.model)
    generator = torch.Generator().manual_seed(experiment.seed + 1)
    return SeCuNetwork(encoder, experiment.model.feat_dim, experiment.secu.ks, generator=generator)
