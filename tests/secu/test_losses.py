"""Losses against slow references written from the math (spec 3.4, 3.5) with plain loops."""

import math

import torch
import torch.nn.functional as F

from secu.losses import center_loss, hardness_aware_logits, representation_loss


def ref_center_loss(s1: list[list[float]], s2: list[list[float]], y: list[int], tw: float) -> float:
    total = 0.0
    for s in (s1, s2):
        ce = 0.0
        for row, label in zip(s, y, strict=True):
            logz = math.log(sum(math.exp(v / tw) for v in row))
            ce += -(row[label] / tw - logz)
        total += ce / len(y)
    return total


def ref_repr_loss(z1, z2, p, y, tx, tau, t1=None, t2=None) -> float:  # type: ignore[no-untyped-def]
    """Predictions from z1, z2; targets from t1, t2 (default: z1, z2 themselves)."""
    t1, t2 = (z1, z2) if t1 is None else (t1, t2)
    b, k = len(z1), len(p[0])
    d = len(z1[0])

    def logits(z: list[float]) -> list[float]:
        return [sum(z[i] * p[i][c] for i in range(d)) / tx for c in range(k)]

    def softmax(x: list[float]) -> list[float]:
        m = max(x)
        e = [math.exp(v - m) for v in x]
        return [v / sum(e) for v in e]

    total = 0.0
    for a, other in ((z1, t2), (z2, t1)):
        acc = 0.0
        for i in range(b):
            xa, xo = logits(a[i]), logits(other[i])
            target = [(1 - tau) * q + (tau if c == y[i] else 0.0) for c, q in enumerate(softmax(xo))]
            logp = [math.log(q) for q in softmax(xa)]
            acc += -sum(t * lp for t, lp in zip(target, logp, strict=True))
        total += acc / b
    return total


def test_center_loss_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    s1 = torch.rand(5, 4, generator=gen) * 2 - 1
    s2 = torch.rand(5, 4, generator=gen) * 2 - 1
    y = torch.tensor([0, 3, 1, 1, 2])
    got = center_loss(s1, s2, y, tw=0.05)
    ref = ref_center_loss(s1.tolist(), s2.tolist(), y.tolist(), 0.05)
    assert abs(float(got) - ref) < 1e-4 * max(1.0, abs(ref))


def test_repr_loss_matches_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(4, 6, generator=gen), dim=1)
    z2 = F.normalize(torch.randn(4, 6, generator=gen), dim=1)
    p = F.normalize(torch.randn(6, 3, generator=gen), dim=0)
    y = torch.tensor([2, 0, 1, 2])
    got = representation_loss(z1, z2, p, y, tx=0.5, tau=0.2)
    ref = ref_repr_loss(z1.tolist(), z2.tolist(), p.tolist(), y.tolist(), 0.5, 0.2)
    assert abs(float(got) - ref) < 1e-5


def test_predictor_repr_loss_takes_its_targets_from_the_projection() -> None:
    """Spec 3.6 (ImageNet variant): predictor outputs against the projection's cross-view targets."""
    gen = torch.Generator().manual_seed(2)
    z1, z2, q1, q2 = (F.normalize(torch.randn(4, 6, generator=gen), dim=1) for _ in range(4))
    p = F.normalize(torch.randn(6, 3, generator=gen), dim=0)
    y = torch.tensor([1, 0, 2, 2])
    got = representation_loss(q1, q2, p, y, tx=0.5, tau=0.2, targets_from=(z1, z2))
    ref = ref_repr_loss(q1.tolist(), q2.tolist(), p.tolist(), y.tolist(), 0.5, 0.2, z1.tolist(), z2.tolist())
    own = ref_repr_loss(q1.tolist(), q2.tolist(), p.tolist(), y.tolist(), 0.5, 0.2)
    assert abs(float(got) - ref) < 1e-5
    assert abs(ref - own) > 1e-3  # the old form (targets from the predictor's own logits) differs


def test_predictor_targets_carry_no_gradient_into_the_projection() -> None:
    gen = torch.Generator().manual_seed(3)
    z1, z2, q1, q2 = (F.normalize(torch.randn(4, 6, generator=gen), dim=1).requires_grad_() for _ in range(4))
    p = F.normalize(torch.randn(6, 3, generator=gen), dim=0)
    representation_loss(q1, q2, p, torch.tensor([0, 1, 2, 0]), 0.5, 0.2, targets_from=(z1, z2)).backward()
    assert z1.grad is None and z2.grad is None
    assert q1.grad is not None and float(q1.grad.abs().sum()) > 0


def test_gradient_reaches_only_assigned_centers_weighted_by_hardness() -> None:
    gen = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    w = torch.randn(8, 5, generator=gen, requires_grad=True)
    y = torch.tensor([1, 1, 3])
    sims = z @ F.normalize(w, dim=0)
    loss = center_loss(sims, sims, y, tw=0.1)
    loss.backward()
    assert w.grad is not None
    col_norms = w.grad.norm(dim=0)
    assert (col_norms[[0, 2, 4]] == 0).all()  # clusters nobody is assigned to get no gradient
    assert (col_norms[[1, 3]] > 0).all()
    # The gradient wrt the live logit is -(1 - p_y) / tw per view: hard instances pull harder.
    s = sims.detach().clone().requires_grad_(True)
    center_loss(s, s.detach(), y, tw=0.1).backward()
    assert s.grad is not None
    p = F.softmax(s.detach() / 0.1, dim=1)
    expected = torch.zeros_like(s)
    for i, label in enumerate(y.tolist()):
        expected[i, label] = -(1 - p[i, label]) / 0.1 / 3
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_plain_ce_would_push_other_centers() -> None:
    """Contrast: the ordinary cross-entropy sends gradient to every center (the collapse-prone form)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(2, 4, generator=gen).requires_grad_(True)
    F.cross_entropy(s / 0.1, torch.tensor([0, 0])).backward()
    assert s.grad is not None and (s.grad[:, 1:] != 0).all()
    logits = hardness_aware_logits(s, torch.tensor([0, 0]), 0.1)
    assert torch.allclose(logits, s / 0.1)


def test_representation_loss_grad_only_into_features() -> None:
    gen = torch.Generator().manual_seed(4)
    z1 = F.normalize(torch.randn(4, 6, generator=gen), dim=1).requires_grad_(True)
    z2 = F.normalize(torch.randn(4, 6, generator=gen), dim=1).requires_grad_(True)
    p = F.normalize(torch.randn(6, 3, generator=gen), dim=0).requires_grad_(True)
    representation_loss(z1, z2, p, torch.tensor([0, 1, 2, 0]), 0.1, 0.2).backward()
    assert p.grad is None
    assert z1.grad is not None and z1.grad.abs().sum() > 0


def test_a_few_sgd_steps_lower_the_center_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(32, 8, generator=gen), dim=1)
    w = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    y = torch.randint(0, 4, (32,), generator=gen)
    opt = torch.optim.SGD([w], lr=0.5)
    losses = []
    for _ in range(20):
        sims = z @ F.normalize(w, dim=0)
        loss = center_loss(sims, sims, y, tw=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9
