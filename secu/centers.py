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


def spherical_kmeans(features_ND: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20
                     ) -> torch.Tensor:
    """K unit-length centers (D x K) of L2-normalised features by k-means++ seeding and Lloyd steps
    on the cosine similarity. A cluster that empties takes the feature farthest from its center."""
    x = F.normalize(features_ND.float(), dim=1)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} features cannot seed {k} centers")
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    dist_N = 1.0 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = dist_N.clamp_min(0) ** 2
        pick = int(torch.multinomial(weights, 1, generator=generator)) if float(weights.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        chosen.append(pick)
        dist_N = torch.minimum(dist_N, 1.0 - x @ x[pick])
    c_KD = x[chosen].clone()
    for _ in range(iters):
        sims_NK = x @ c_KD.T
        best_sim, assign = sims_NK.max(dim=1)
        sums = torch.zeros_like(c_KD).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(best_sim.argmin())
            sums[j], best_sim[far] = x[far], 1.0
        c_KD = F.normalize(sums, dim=1)
    return c_KD.T.contiguous()
