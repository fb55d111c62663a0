"""Hand-computed examples and properties of the size and entropy solvers (spec 3.2)."""

import math

import torch

from secu import constraints


def phi(p: float) -> float:
    return p * math.log(p) if p > 0 else 0.0


def test_size_assign_is_argmin_of_cost_minus_duals() -> None:
    cost = torch.tensor([[0.0, 0.1, 0.5], [0.3, 0.2, 0.25]])
    duals = torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64)
    # row 0: [0, .1, -.1] -> 2 ; row 1: [.3, .2, -.35] -> 2
    assert constraints.size_assign(cost, duals).tolist() == [2, 2]
    assert constraints.size_assign(cost, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 1]


def test_size_dual_update_by_hand() -> None:
    duals = torch.tensor([0.01, 0.0, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 2])  # G = 4, counts (3, 0, 1), K = 3
    new = constraints.size_update_duals(duals, labels, dual_lr=0.1, lratio=0.9)
    expected = [
        max(0.01 - 0.1 * 3 / 4 + 0.1 * 0.3, 0.0),  # over-filled: falls, clamps at 0
        0.0 + 0.1 * 0.3,  # empty: rises
        0.2 - 0.1 * 1 / 4 + 0.1 * 0.3,
    ]
    assert torch.allclose(new, torch.tensor(expected, dtype=torch.float64))
    assert new[0] == 0.0  # the clamp really happened


def test_size_duals_not_clamped_when_lratio_is_one() -> None:
    new = constraints.size_update_duals(torch.zeros(2, dtype=torch.float64), torch.tensor([0, 0, 0, 0]),
                                        dual_lr=1.0, lratio=1.0)
    assert torch.allclose(new, torch.tensor([-1.0 + 0.5, 0.5], dtype=torch.float64))


def test_size_constraint_keeps_lower_bound_on_average() -> None:
    """Property: with a cost that favours cluster 0 for everyone, the duals still spread the labels
    so that over many batches every cluster gets at least the lower bound lratio * G / K."""
    gen = torch.Generator().manual_seed(0)
    k, g, lratio = 5, 64, 0.9
    duals = torch.zeros(k, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.3, 0.5, 0.7, 0.9])  # cluster 0 is much cheaper
    totals = torch.zeros(k, dtype=torch.float64)
    steps = 3000
    for step in range(steps):
        cost = bias + 0.1 * torch.rand(g, k, generator=gen)
        labels = constraints.size_assign(cost, duals)
        duals = constraints.size_update_duals(duals, labels, dual_lr=0.1, lratio=lratio)
        if step >= 500:  # after the duals have risen
            totals += constraints.count_labels(labels, k)
    frac = totals / totals.sum()
    assert float(frac.min()) >= lratio / k - 0.01, frac
    # Without the constraint, cluster 0 takes everything: the test is not trivially satisfied.
    plain = constraints.size_assign(bias + 0.1 * torch.rand(g, k, generator=gen), torch.zeros(k, dtype=torch.float64))
    assert (plain == 0).all()


def test_entropy_first_step_is_plain_argmin() -> None:
    cost = torch.tensor([[0.0, 1.0], [0.5, 0.4]])
    labels = constraints.entropy_assign(cost, torch.zeros(2, dtype=torch.float64), alpha=1e6, prev_labels_B=None)
    assert labels.tolist() == [0, 1]


def test_entropy_first_epoch_rule_by_hand() -> None:
    n = torch.tensor([3.0, 1.0], dtype=torch.float64)  # S = 4, p = n / 5
    delta = constraints.entropy_delta(n, None, batch=1)[0]
    exp0 = phi(3 / 5 + 1 / 5) - phi(3 / 5)
    exp1 = phi(1 / 5 + 1 / 5) - phi(1 / 5)
    assert torch.allclose(delta, torch.tensor([exp0, exp1], dtype=torch.float64))
    # cost slightly favours the big cluster; alpha decides
    cost = torch.tensor([[0.0, 0.05]])
    assert constraints.entropy_assign(cost, n, alpha=0.0, prev_labels_B=None).tolist() == [0]
    # alpha * (exp0 - exp1) > 0.05 flips the choice to the small cluster
    alpha = 0.06 / (exp0 - exp1)
    assert constraints.entropy_assign(cost, n, alpha=alpha, prev_labels_B=None).tolist() == [1]


def test_entropy_later_epoch_rule_by_hand() -> None:
    n = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)  # S = 8, p = n / 8
    prev = torch.tensor([0, 2])
    delta = constraints.entropy_delta(n, prev, batch=2)
    p = [5 / 8, 2 / 8, 1 / 8]
    leave0 = phi(p[0] - 1 / 8) - phi(p[0])
    leave2 = phi(p[2] - 1 / 8) - phi(p[2])
    gain = [phi(q + 1 / 8) - phi(q) for q in p]
    expected = torch.tensor(
        [[0.0, leave0 + gain[1], leave0 + gain[2]], [leave2 + gain[0], leave2 + gain[1], 0.0]],
        dtype=torch.float64,
    )
    assert torch.allclose(delta, expected)
    # mixed batch: -1 uses the first-epoch rule
    mixed = constraints.entropy_delta(n, torch.tensor([-1, 0]), batch=2)
    add = [phi(q * 8 / 9 + 1 / 9) - phi(q * 8 / 9) for q in p]
    assert torch.allclose(mixed[0], torch.tensor(add, dtype=torch.float64))
    assert torch.allclose(mixed[1], expected[0])


def test_entropy_counter_update_moves_counts() -> None:
    n = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)
    new = constraints.entropy_update_counters(n, torch.tensor([1, 1, 2]), torch.tensor([0, 1, -1]))
    # +1 at 1, +1 at 1, +1 at 2; -1 at 0, -1 at 1; -1 ignored
    assert new.tolist() == [4.0, 3.0, 2.0]
    first = constraints.entropy_update_counters(torch.zeros(3, dtype=torch.float64), torch.tensor([2, 2]), None)
    assert first.tolist() == [0.0, 0.0, 2.0]


def test_entropy_constraint_spreads_labels() -> None:
    """With a strong alpha the entropy rule balances a biased cost; with alpha = 0 it does not."""
    gen = torch.Generator().manual_seed(1)
    k = 4
    bias = torch.tensor([0.0, 0.2, 0.4, 0.6])
    # delta shrinks like 1/S, so alpha scales with the number of instances (6000 for N = 50k).
    for alpha, balanced in ((0.0, False), (1e4, True)):
        n = torch.zeros(k, dtype=torch.float64)
        for _ in range(200):
            labels = constraints.entropy_assign(bias + 0.05 * torch.rand(32, k, generator=gen), n, alpha, None)
            n = constraints.entropy_update_counters(n, labels, None)
        frac = n / n.sum()
        assert (float(frac.min()) > 0.1) == balanced, frac
