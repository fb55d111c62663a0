"""k-means (``secu.kmeans``) in one process: euclidean Lloyd == scikit-learn's from the same centers, spherical
Lloyd == a plain loop written from the definition, k-means++ and the empty-cluster rule. That 2 gloo processes
holding unequal parts of the points give the 1-process result is checked in ``test_propos.py`` (one spawn for
every distributed check, to keep the suite fast)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from secu.kmeans import assign, gather_init_sample, kmeans, kmeans_pp, update_centers


def blobs(n: int, d: int, k: int, spread: float, seed: int) -> torch.Tensor:
    """``n`` float64 points around ``k`` random means (std 1), means drawn with std ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    means_KD = spread * torch.randn(k, d, generator=gen, dtype=torch.float64)
    which = torch.arange(n) % k
    return means_KD[which] + torch.randn(n, d, generator=gen, dtype=torch.float64)


def test_euclidean_lloyd_equals_sklearn_from_the_same_centers() -> None:
    x_ND = blobs(400, 5, 4, spread=2.0, seed=0)  # overlapping blobs: Lloyd needs many updates
    init_KD = x_ND[torch.tensor([0, 1, 2, 7])]
    ours = kmeans(x_ND, 4, metric="euclidean", max_iters=300, tol=0.0, init_centers_KD=init_KD)
    with threadpool_limits(1):  # OpenMP threads only spin-wait on a small, loaded machine
        ref = KMeans(n_clusters=4, init=init_KD.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(
            x_ND.numpy())
    assert ours.iters > 3  # the comparison covers several updates, not only the first assignment
    np.testing.assert_array_equal(ours.labels_N.numpy(), ref.labels_)
    np.testing.assert_allclose(ours.centers_KD.numpy(), ref.cluster_centers_, atol=1e-10)
    assert math.isclose(ours.inertia * len(x_ND), ref.inertia_, rel_tol=1e-9)


def reference_spherical_kmeans(x: list[list[float]], centers: list[list[float]], iters: int
                               ) -> tuple[list[int], list[list[float]]]:
    """Spherical k-means by the definition, with python loops: label = argmax_k x . c_k, center = the
    normalised mean of its members (kept when it has none); stops when no center moves."""
    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v]

    def nearest(v: list[float], centers: list[list[float]]) -> int:
        cos = [sum(a * b for a, b in zip(v, c, strict=True)) for c in centers]
        return max(range(len(centers)), key=lambda k: cos[k])

    x = [unit(v) for v in x]
    centers = [unit(c) for c in centers]
    for _ in range(iters):
        labels = [nearest(v, centers) for v in x]
        new = []
        for k, c in enumerate(centers):
            members = [v for v, lab in zip(x, labels, strict=True) if lab == k]
            new.append(unit([sum(col) / len(members) for col in zip(*members, strict=True)]) if members else c)
        moved = sum((a - b) ** 2 for c, n in zip(centers, new, strict=True) for a, b in zip(c, n, strict=True))
        centers = new
        if moved == 0:
            break
    labels = [nearest(v, centers) for v in x]
    return labels, centers


def test_cosine_lloyd_equals_a_plain_loop_spherical_kmeans() -> None:
    x_ND = blobs(90, 4, 3, spread=1.5, seed=1)
    init_KD = x_ND[:3]
    ours = kmeans(x_ND, 3, metric="cosine", max_iters=50, tol=0.0, init_centers_KD=init_KD)
    labels, centers = reference_spherical_kmeans(x_ND.tolist(), init_KD.tolist(), 50)
    assert ours.iters > 1
    assert ours.labels_N.tolist() == labels
    np.testing.assert_allclose(ours.centers_KD.numpy(), np.array(centers), atol=1e-12)
    cos_N = (F.normalize(x_ND, dim=1) * ours.centers_KD[ours.labels_N]).sum(dim=1)
    assert math.isclose(ours.inertia, float(1 - cos_N.mean()), rel_tol=1e-9)


def test_kmeans_pp_is_seeded_and_spreads_over_separated_blobs() -> None:
    x_ND = blobs(300, 3, 3, spread=50.0, seed=2)
    a = kmeans_pp(x_ND, 3, torch.Generator().manual_seed(5))
    b = kmeans_pp(x_ND, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    rows = [int((x_ND == c).all(dim=1).nonzero()[0]) for c in a]  # seeds are data points
    assert sorted(r % 3 for r in rows) == [0, 1, 2]  # one seed in each of the three far-apart blobs (row i: blob i % 3)


def test_empty_cluster_keeps_its_center_and_iterations_stop_at_tol() -> None:
    x_ND = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0]], dtype=torch.float64)
    centers_KD = torch.tensor([[0.0, 0.5], [10.0, 10.0], [100.0, -100.0]], dtype=torch.float64)
    labels_N, _ = assign(x_ND, centers_KD, "euclidean")
    new_KD = update_centers(x_ND, labels_N, centers_KD, "euclidean")
    assert torch.equal(new_KD[2], centers_KD[2])  # nobody chose it: it stays
    assert torch.equal(new_KD[:2], centers_KD[:2])
    assert kmeans(x_ND, 3, metric="euclidean", tol=0.0, init_centers_KD=centers_KD).iters == 1


def test_init_sample_caps_the_points() -> None:
    x_ND = torch.randn(50, 3)
    assert gather_init_sample(x_ND, 20, seed=0).shape == (20, 3)
    assert torch.equal(gather_init_sample(x_ND, 100, seed=0), x_ND)
