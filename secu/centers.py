"""Learnable cluster centers W_h in R^{D x K_h} for H heads (spec 1).

Centers are initialised as random normal columns of unit length; wherever they are used they are
column-normalised, C_h = W_h / ||W_h||.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Centers(nn.Module):
    """One D x K_h parameter per head."""

    def __init__(self, feat_dim: int, ks: tuple[int, ...] | list[int], generator: torch.Generator | None = None):
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        weights = []
        for k in self.ks:
            w_DK = torch.randn(feat_dim, k, generator=generator)
            weights.append(nn.Parameter(F.normalize(w_DK, dim=0)))
        self.weights = nn.ParameterList(weights)

    def normalized(self, head: int) -> torch.Tensor:
        """C_h = W_h / ||W_h|| (columns of unit length); differentiable."""
        return F.normalize(self.weights[head], dim=0)

    def snapshot(self) -> list[torch.Tensor]:
        """Frozen copies of every C_h, taken at the start of an epoch for the representation loss."""
        return [self.normalized(h).detach().clone() for h in range(len(self.ks))]

    @property
    def num_heads(self) -> int:
        """H."""
        return len(self.ks)

