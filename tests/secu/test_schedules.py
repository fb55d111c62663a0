"""Learning-rate schedules against values computed by hand from spec section 4."""

import math

import numpy as np
import pytest

from secu.config import OptimConfig
from secu.schedules import center_lr, encoder_lr, lr_schedule, warmup_cosine

# The CIFAR-10 reference: E = 401, W = 11, lr = 0.2; I = 10 keeps the arrays small.
I = 10
CFG = OptimConfig(lr=0.2, clr=1.2, epochs=401, warmup_epochs=11)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0, 0.0),  # epoch 0: centers and labels only
        (I - 1, 0.0),
        (I, 0.2 * 1 / 100),  # max(1, 0) / (11 I - I)
        (I + 1, 0.2 * 1 / 100),  # max(1, 1): the first two warm-up steps share a value
        (I + 2, 0.2 * 2 / 100),
        (11 * I - 1, 0.2 * 99 / 100),
        (11 * I, 0.2),  # cosine starts at the peak
        (11 * I + 1950, 0.1),  # the midpoint of 3900 decay iterations
        (401 * I - 1, 0.2 * (1 + math.cos(math.pi * 3899 / 3900)) / 2),
    ],
)
def test_encoder_lr_reference_values(t: int, expected: float) -> None:
    assert encoder_lr(t, I, CFG) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_arrays_equal_scalar_functions() -> None:
    for cfg in (CFG, OptimConfig(lr=1.6, clr=4.2, epochs=30, warmup_epochs=11, center_lr_schedule="cosine_rise")):
        enc, cen = lr_schedule(I, cfg)
        assert enc.shape == cen.shape == (cfg.epochs * I,)
        np.testing.assert_allclose(enc, [encoder_lr(t, I, cfg) for t in range(cfg.epochs * I)], rtol=1e-12)
        np.testing.assert_allclose(cen, [center_lr(t, I, cfg) for t in range(cfg.epochs * I)], rtol=1e-12)


def test_encoder_schedule_shape() -> None:
    enc, _ = lr_schedule(I, CFG)
    warm = enc[I : 11 * I]
    assert np.all(np.diff(warm) >= 0) and np.all(np.diff(enc[11 * I :]) <= 0)
    assert enc.max() == pytest.approx(0.2)


def test_center_lr_constant_and_cosine_rise() -> None:
    assert center_lr(0, I, CFG) == center_lr(4009, I, CFG) == 1.2
    cfg = OptimConfig(clr=4.2, epochs=100, warmup_epochs=11, center_lr_schedule="cosine_rise")
    total = 100 * I
    assert center_lr(0, I, cfg) == 0.0
    assert center_lr(total // 2, I, cfg) == pytest.approx(2.1)
    assert center_lr(total // 4, I, cfg) == pytest.approx(4.2 * (1 - math.cos(math.pi / 4)) / 2)
    assert center_lr(total + 50, I, cfg) == pytest.approx(4.2)  # held past the end


def test_no_warmup() -> None:
    cfg = OptimConfig(lr=0.5, epochs=5, warmup_epochs=1)
    enc, _ = lr_schedule(I, cfg)
    assert np.all(enc[:I] == 0.0)
    assert enc[I] == pytest.approx(0.5)  # cosine starts right after epoch 0
    assert enc[I + 20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)) / 2)


def test_all_warmup_has_no_cosine() -> None:
    cfg = OptimConfig(lr=0.5, epochs=3, warmup_epochs=3)  # E == W: the cosine range is empty
    enc, _ = lr_schedule(I, cfg)
    assert np.isfinite(enc).all()
    assert enc[-1] == pytest.approx(0.5 * (3 * I - 1 - I) / (2 * I))
    assert encoder_lr(3 * I, I, cfg) == 0.0  # past the end
    single = OptimConfig(lr=0.5, epochs=1, warmup_epochs=1)
    assert np.all(lr_schedule(I, single)[0] == 0.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="iters_per_epoch"):
        lr_schedule(0, CFG)
    with pytest.raises(ValueError, match="t=-1"):
        encoder_lr(-1, I, CFG)


def test_warmup_cosine_has_no_zero_epochs_and_decays_to_zero() -> None:
    cfg = OptimConfig(lr=0.4, epochs=5, warmup_epochs=3, init_epochs=1)
    lrs = warmup_cosine(10, cfg)
    assert lrs.shape == (50,)
    assert lrs[0] == pytest.approx(0.4 / 20) and lrs[19] == pytest.approx(0.4)  # 2 warm-up epochs
    assert lrs[20] == pytest.approx(0.4) and lrs[-1] < 0.01 and bool((lrs > 0).all())
    assert bool((np.diff(lrs[20:]) <= 0).all())
