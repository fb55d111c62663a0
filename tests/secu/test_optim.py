"""LARS against updates computed by hand; the two named parameter groups."""

import math

import pytest
import torch
from torch import nn

from secu.config import OptimConfig
from secu.optim import LARS, build_optimizer, set_learning_rates


def test_lars_two_steps_match_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([w], lr=1.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)

    # Step 1: u = g + 0.1 w = [0.9, 1.2], ||u|| = 1.5, ||w|| = 5, ratio = 0.001 * 5 / 1.5 = 1/300.
    w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    opt.step()
    m = [0.9 / 300, 1.2 / 300]
    expected = [3.0 - m[0], 4.0 - m[1]]
    torch.testing.assert_close(w.data, torch.tensor([expected], dtype=torch.float64))

    # Step 2 from the new weights, with momentum carried over.
    g = [1.0, -1.0]
    u = [g[0] + 0.1 * expected[0], g[1] + 0.1 * expected[1]]
    ratio = 0.001 * math.hypot(*expected) / math.hypot(*u)
    m = [0.9 * m[0] + ratio * u[0], 0.9 * m[1] + ratio * u[1]]
    expected = [expected[0] - m[0], expected[1] - m[1]]
    w.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.data, torch.tensor([expected], dtype=torch.float64))


def test_lars_skips_adaptation_and_decay_for_vectors() -> None:
    bias = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([bias], lr=0.5, weight_decay=0.1, momentum=0.9)
    bias.grad = torch.tensor([0.5, -0.5])
    opt.step()
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.25, 2.0 + 0.25]))
    opt.step()  # momentum: m = 0.9 * g + g
    torch.testing.assert_close(bias.data, torch.tensor([0.75 - 0.5 * 1.9 * 0.5, 2.25 + 0.5 * 1.9 * 0.5]))


def test_lars_zero_weight_uses_ratio_one() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, weight_decay=0.1, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.data, torch.full((2, 2), -0.1))


def test_lars_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.ones(2))], momentum=1.5)


@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_build_optimizer_groups_and_rates(kind: str) -> None:
    encoder = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    centers = nn.Parameter(torch.randn(3, 5))
    cfg = OptimConfig(optimizer=kind, lr=0.2, clr=1.2, weight_decay=1e-4, momentum=0.9)
    opt = build_optimizer(encoder.parameters(), [centers], cfg)
    assert isinstance(opt, LARS if kind == "lars" else torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["encoder", "centers"]
    assert [g["lr"] for g in opt.param_groups] == [0.2, 1.2]
    assert all(g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 for g in opt.param_groups)
    assert len(opt.param_groups[0]["params"]) == 4 and opt.param_groups[1]["params"] == [centers]

    set_learning_rates(opt, 0.05, 0.7)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.7]

    # A step with lr 0 on the encoder moves only the centers.
    set_learning_rates(opt, 0.0, 0.7)
    before = [p.detach().clone() for p in encoder.parameters()]
    c_before = centers.detach().clone()
    loss = encoder(torch.randn(8, 4)).pow(2).sum() + (centers * torch.randn(3, 5)).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, encoder.parameters(), strict=True))
    assert not torch.equal(c_before, centers)


def test_build_optimizer_errors() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="both"):
        build_optimizer(layer.parameters(), [layer.weight], OptimConfig())
    with pytest.raises(ValueError, match="no trainable encoder"):
        build_optimizer([], [layer.weight], OptimConfig())
    with pytest.raises(ValueError, match="no param group"):
        set_learning_rates(torch.optim.SGD(layer.parameters(), lr=0.1), 0.1, 0.1)
