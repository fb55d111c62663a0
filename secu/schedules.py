"""Per-iteration learning-rate schedules of the encoder and the centers (spec 4).

The training loop reads both rates from arrays precomputed once (DINO-style, ``lr_schedule``); the
scalar functions define the same values and are what the tests check by hand.

Notation: t = global iteration (0-based), I = iterations per epoch, E = ``cfg.epochs``,
W = ``cfg.warmup_epochs`` (11 in the reference runs).

Encoder (SeCu, ICCV 2023; authors' schedule):

- epoch 0 (t < I): lr = 0. Epoch 0 only initialises centers and labels. With Z = ``cfg.init_epochs``
  > 1 (the adaptation to small collections, ``secu.adapt``) the first Z epochs do: t < Z I.
- epochs Z .. W-1 (Z I <= t < W I): linear warm-up, lr * max(1, t - Z I) / (W I - Z I).
- afterwards (t >= W I): cosine decay, lr * (1 + cos(pi (t - W I) / (E I - W I))) / 2.

Centers: constant ``clr``, or ``cosine_rise`` = clr * (1 - cos(pi t / (E I))) / 2 (ImageNet with the
entropy constraint).
"""

from __future__ import annotations

import math

import numpy as np

from secu.config import OptimConfig

__all__ = ["center_lr", "encoder_lr", "lr_schedule", "warmup_cosine"]


def _check(t: int, iters_per_epoch: int) -> None:
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch={iters_per_epoch} must be >= 1 (is the dataset smaller than a batch?)")
    if t < 0:
        raise ValueError(f"iteration t={t} must be >= 0")


def encoder_lr(t: int, iters_per_epoch: int, cfg: OptimConfig) -> float:
    """Encoder learning rate at global iteration ``t``.

    Edge cases, chosen so that no branch divides by zero:

    - ``W == 1``: there is no warm-up range (it would be empty); the cosine starts at t = I.
    - ``E == W``: the cosine range is empty, so every iteration of the run is in epoch 0 or in the
      warm-up. Iterations at or past the end of the run (t >= E I) return the cosine's end value 0.

    Args:
        t: Global iteration, 0-based.
        iters_per_epoch: I, iterations per epoch.
        cfg: ``lr``, ``epochs`` (E) and ``warmup_epochs`` (W) are used.

    Returns:
        The learning rate.
    """
    _check(t, iters_per_epoch)
    i, e, w, z = iters_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.init_epochs
    if t < z * i:
        return 0.0
    if t < w * i:  # only reachable when W > Z, so W I - Z I >= I > 0
        return cfg.lr * max(1, t - z * i) / (w * i - z * i)
    decay_iters = e * i - w * i
    if decay_iters <= 0 or t >= e * i:
        return 0.0
    return cfg.lr * (1.0 + math.cos(math.pi * (t - w * i) / decay_iters)) / 2.0


def center_lr(t: int, iters_per_epoch: int, cfg: OptimConfig) -> float:
    """Center learning rate at global iteration ``t`` (``cfg.center_lr_schedule``).

    ``cosine_rise`` is held at ``clr`` for t >= E I (past the end of the run).
    """
    _check(t, iters_per_epoch)
    if cfg.center_lr_schedule == "constant":
        return cfg.clr
    total = cfg.epochs * iters_per_epoch
    return cfg.clr * (1.0 - math.cos(math.pi * min(t, total) / total)) / 2.0


def lr_schedule(iters_per_epoch: int, cfg: OptimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Both schedules for a whole run, indexed by the global iteration.

    Args:
        iters_per_epoch: I, iterations per epoch.
        cfg: The optimisation config.

    Returns:
        ``(encoder_lrs, center_lrs)``, float64 arrays of length E * I; entry t equals
        ``encoder_lr(t, ...)`` and ``center_lr(t, ...)``.
    """
    _check(0, iters_per_epoch)
    i, e, w, z = iters_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.init_epochs
    t = np.arange(e * i, dtype=np.float64)
    enc = np.zeros_like(t)
    warm = (t >= z * i) & (t < w * i)
    if warm.any():
        enc[warm] = cfg.lr * np.maximum(1.0, t[warm] - z * i) / (w * i - z * i)
    decay = t >= w * i
    if decay.any():  # non-empty only when E > W, so E I - W I > 0
        enc[decay] = cfg.lr * (1.0 + np.cos(np.pi * (t[decay] - w * i) / (e * i - w * i))) / 2.0
    if cfg.center_lr_schedule == "constant":
        cen = np.full_like(t, cfg.clr)
    else:
        cen = cfg.clr * (1.0 - np.cos(np.pi * t / (e * i))) / 2.0
    return enc, cen


def warmup_cosine(iters_per_epoch: int, cfg: OptimConfig) -> np.ndarray:
    """The learning rate of the methods other than SeCu, per global iteration (length E * I): no epochs at lr 0
    (SeCu's init epochs initialise its centers; the other methods have nothing to initialise), a linear warm-up
    of as many epochs as SeCu's (W - Z), then the cosine decay to 0 of ``lr_schedule``."""
    _check(0, iters_per_epoch)
    i, e = iters_per_epoch, cfg.epochs
    w = cfg.warmup_epochs - cfg.init_epochs
    t = np.arange(e * i, dtype=np.float64)
    lrs = np.zeros_like(t)
    warm = t < w * i
    lrs[warm] = cfg.lr * (t[warm] + 1.0) / (w * i)
    decay = ~warm
    if decay.any():
        lrs[decay] = cfg.lr * (1.0 + np.cos(np.pi * (t[decay] - w * i) / max(1.0, e * i - w * i))) / 2.0
    return lrs
