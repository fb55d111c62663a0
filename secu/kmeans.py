"""Lloyd's k-means with k-means++ initialisation, in one process or across ``torch.distributed`` ranks (no Ray).

Two metrics:

- ``"euclidean"``: classical k-means (assign to the nearest center, center = mean of its members).
- ``"cosine"``: spherical k-means (Dhillon & Modha, 2001) on L2-normalised rows: assign by the largest
  cosine, center = normalised mean of its members. ProPos (Huang et al., TPAMI 2022) clusters its target
  features this way every ``propos.reassign`` epochs (``secu.propos``).

Distributed: every rank passes only its own rows; ranks may hold different numbers of rows (none is
fine). The k-means++ initial centers are drawn from one sample of at most ``init_sample`` rows gathered
from every rank and seeded identically, so every rank starts from the same centers; each Lloyd
iteration all-reduces the per-cluster sums and counts, so the centers, the convergence test (on the
centers' shift, identical everywhere) and the number of iterations are the same on every rank. The
collectives are ``secu.distributed``'s, which are the identity in one process; with the rows of a
collection split in rank order over the ranks, the result equals the one-process result on all rows
(up to the order of float64 additions).

Empty clusters: a cluster that receives no row in an iteration keeps its previous center (no
relocation; scikit-learn instead moves it to a far point, so the comparison tests use data without
empty clusters).

Convergence: a run stops after the first update whose squared center shift, summed over clusters,
is <= ``tol`` (an absolute tolerance, not scaled by the data's variance as scikit-learn's is), or after
``max_iters`` updates. The returned labels are those of the returned centers.

Legend: N = this rank's rows, S = rows of the initialisation sample (all ranks), K = clusters,
D = feature dimension, R = ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from secu import distributed

METRICS = ("cosine", "euclidean")
CHUNK = 65536
"""Rows scored against the centers at once (bounds the N x K score matrix's memory)."""


@dataclass
class KMeansResult:
    """One k-means run as every rank sees it."""

    centers_KD: torch.Tensor
    """The final centers (identical on every rank; unit rows for the cosine metric)."""
    labels_N: torch.Tensor
    """int64 cluster of each of this rank's rows under ``centers_KD``."""
    iters: int
    """Lloyd updates done (identical on every rank)."""
    inertia: float
    """Mean over all rows of all ranks of the distance to the assigned center: 1 - cosine for the cosine
    metric, the squared Euclidean distance for the euclidean one."""


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {METRICS}")


def assign(points_ND: torch.Tensor, centers_KD: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The closest center of every row and its distance (1 - cosine, or the squared Euclidean distance).

    For ``"cosine"`` both rows and centers must already be L2-normalised.
    """
    _check_metric(metric)
    labels, dists = [], []
    sq_K = (centers_KD * centers_KD).sum(dim=1)
    for start in range(0, points_ND.shape[0], CHUNK):
        x_ND = points_ND[start:start + CHUNK]
        dot_NK = x_ND @ centers_KD.T
        if metric == "cosine":
            best_N, label_N = dot_NK.max(dim=1)
            dist_N = 1.0 - best_N
        else:  # ||x||^2 is the same for every center: rank by ||c||^2 - 2 x.c, add ||x||^2 back afterwards
            part_N, label_N = (sq_K[None, :] - 2.0 * dot_NK).min(dim=1)
            dist_N = (part_N + (x_ND * x_ND).sum(dim=1)).clamp_min(0.0)
        labels.append(label_N)
        dists.append(dist_N)
    if not labels:
        empty = points_ND.new_zeros(0)
        return empty.long(), empty
    return torch.cat(labels), torch.cat(dists)


def kmeans_pp(sample_SD: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): the first center uniformly, each next one with
    probability proportional to the squared distance to the closest chosen center. On unit rows the
    squared distance is 2 - 2 cos, so the cosine metric's seeding is the same rule. Runs on the CPU with
    ``generator`` (a CPU generator), so equal seeds give equal centers on every rank and device."""
    x_SD = sample_SD.detach().cpu().double()
    s = x_SD.shape[0]
    if s < k:
        raise ValueError(f"k-means++ needs at least k={k} points to choose from, got {s}")
    chosen = [int(torch.randint(s, (1,), generator=generator))]
    d2_S = ((x_SD - x_SD[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(d2_S.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2_S / total, 1, generator=generator))
        else:  # every point coincides with a chosen center: any point will do
            nxt = int(torch.randint(s, (1,), generator=generator))
        chosen.append(nxt)
        d2_S = torch.minimum(d2_S, ((x_SD - x_SD[nxt]) ** 2).sum(dim=1))
    return sample_SD[torch.tensor(chosen, device=sample_SD.device)].clone()


def gather_init_sample(points_ND: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    """At most ``max_points`` rows drawn over all ranks, the same tensor on every rank.

    Every row of every rank when they are at most ``max_points`` in all (in rank order); otherwise each
    rank contributes floor(max_points * N_r / N) of its rows, chosen with a generator seeded by
    (``seed``, rank).
    """
    counts_R = distributed.all_gather_cat(torch.tensor([points_ND.shape[0]], dtype=torch.long))
    total = int(counts_R.sum())
    local = points_ND
    if total > max_points:
        quota = max_points * points_ND.shape[0] // total
        gen = torch.Generator().manual_seed(seed * 1_000_003 + distributed.rank())
        rows = torch.randperm(points_ND.shape[0], generator=gen)[:quota].to(points_ND.device)
        local = points_ND[rows]
    return distributed.all_gather_cat(local.contiguous())


def update_centers(points_ND: torch.Tensor, labels_N: torch.Tensor, centers_KD: torch.Tensor, metric: str
                   ) -> torch.Tensor:
    """One Lloyd M-step over every rank's rows: the (normalised, for cosine) mean of each cluster's members
    from all-reduced float64 sums and counts; a cluster without members keeps its center."""
    k, d = centers_KD.shape
    stats_KE = torch.zeros(k, d + 1, dtype=torch.float64, device=points_ND.device)
    stats_KE[:, :d].index_add_(0, labels_N, points_ND.double())
    stats_KE[:, d].index_add_(0, labels_N, torch.ones_like(labels_N, dtype=torch.float64))
    stats_KE = distributed.all_reduce_sum(stats_KE)
    sums_KD, counts_K = stats_KE[:, :d], stats_KE[:, d]
    if metric == "cosine":
        new_KD = F.normalize(sums_KD, dim=1)
    else:
        new_KD = sums_KD / counts_K.clamp_min(1.0)[:, None]
    new_KD = new_KD.to(centers_KD.dtype)
    return torch.where((counts_K > 0)[:, None], new_KD, centers_KD)


def kmeans(points_ND: torch.Tensor, k: int, *, metric: str = "cosine", max_iters: int = 300, tol: float = 1e-4,
           init_sample: int = 20000, seed: int = 0, init_centers_KD: torch.Tensor | None = None) -> KMeansResult:
    """k-means of the rows of every rank (see the module docstring for the distributed contract).

    Args:
        points_ND: this rank's rows (float; normalised here for ``metric="cosine"``); every rank must call
            with the same ``k``, ``metric``, ``max_iters``, ``tol``, ``init_sample`` and ``seed``.
        k: K, the number of clusters.
        metric: ``"cosine"`` (spherical) or ``"euclidean"``.
        max_iters: most Lloyd updates.
        tol: stop once the summed squared center shift of an update is at most this.
        init_sample: most rows (over all ranks) k-means++ chooses from.
        seed: seeds the sample and k-means++ (use the same one on every rank).
        init_centers_KD: start from these centers (identical on every rank) instead of k-means++.

    Returns:
        The centers, this rank's labels, the number of updates and the mean distance to the centers.
    """
    _check_metric(metric)
    if k < 1 or max_iters < 0 or tol < 0 or init_sample < 1:
        raise ValueError(f"kmeans needs k >= 1, max_iters >= 0, tol >= 0, init_sample >= 1; got k={k}, "
                         f"max_iters={max_iters}, tol={tol}, init_sample={init_sample}")
    x_ND = points_ND.detach()
    if metric == "cosine":
        x_ND = F.normalize(x_ND, dim=1)
    if init_centers_KD is None:
        sample_SD = gather_init_sample(x_ND, init_sample, seed)
        centers_KD = kmeans_pp(sample_SD, k, torch.Generator().manual_seed(seed))
    else:
        centers_KD = init_centers_KD.detach().to(device=x_ND.device, dtype=x_ND.dtype).clone()
        if metric == "cosine":
            centers_KD = F.normalize(centers_KD, dim=1)
    iters = 0
    for _ in range(max_iters):
        labels_N, _ = assign(x_ND, centers_KD, metric)
        new_KD = update_centers(x_ND, labels_N, centers_KD, metric)
        shift = float(((new_KD.double() - centers_KD.double()) ** 2).sum())
        centers_KD = new_KD
        iters += 1
        if shift <= tol:
            break
    labels_N, dist_N = assign(x_ND, centers_KD, metric)
    totals = distributed.all_reduce_sum(torch.tensor([float(dist_N.double().sum()), float(x_ND.shape[0])],
                                                     dtype=torch.float64))
    return KMeansResult(centers_KD=centers_KD, labels_N=labels_N, iters=iters,
                        inertia=float(totals[0] / totals[1].clamp_min(1.0)))
