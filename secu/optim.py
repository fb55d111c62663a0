"""Optimisers with the two parameter groups of SeCu (spec 4): encoder (lr) and centers (clr).

Small-image runs use SGD with momentum; ImageNet uses LARS. Weight decay and momentum apply to both
groups; the per-iteration rates come from ``secu.schedules`` and are written with
:func:`set_learning_rates`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from secu.config import OptimConfig

__all__ = ["GROUP_NAMES", "LARS", "build_optimizer", "set_learning_rates"]

GROUP_NAMES = ("encoder", "centers")
"""Values of ``group["name"]`` of the two parameter groups, in this order."""


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and a layer-wise trust ratio (You et al., 2017).

    For every parameter w with gradient g and ``w.ndim > 1``:

        u = g + wd * w
        u <- u * eta * ||w|| / ||u||     (factor 1 when ||w|| or ||u|| is 0)
        m <- momentum * m + u
        w <- w - lr * m

    Parameters with ``ndim <= 1`` (biases, BatchNorm affine) skip both the weight decay and the
    adaptation (m <- momentum * m + g), as in the ImageNet recipes of MoCo v3 / BYOL that SeCu follows.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        """Create the optimiser.

        Args:
            params: Parameters or parameter-group dicts.
            lr: Learning rate (usually overwritten every iteration by the schedule).
            weight_decay: L2 term wd * w added to the gradient before the trust ratio; not for ndim <= 1.
            momentum: Momentum coefficient.
            trust_coefficient: eta of the trust ratio.
        """
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    # torch.where keeps this on the device (no host sync for the norms).
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["trust_coefficient"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(
    encoder_params: Iterable[nn.Parameter],
    center_params: Iterable[nn.Parameter],
    cfg: OptimConfig,
) -> torch.optim.Optimizer:
    """SGD (momentum) or LARS over two groups named ``"encoder"`` and ``"centers"``.

    The groups start at ``cfg.lr`` and ``cfg.clr``; the training loop sets the scheduled rates with
    :func:`set_learning_rates` before every step.

    Args:
        encoder_params: Parameters of the encoder f (backbone, projection, predictor).
        center_params: The center matrices W_h of every head.
        cfg: ``optimizer``, ``lr``, ``clr``, ``momentum`` and ``weight_decay`` are used.

    Returns:
        The optimiser; ``param_groups[0]`` is the encoder group and ``param_groups[1]`` the centers.

    Raises:
        ValueError: If the encoder has no parameters or a parameter is in both groups.
    """
    encoder = [p for p in encoder_params if p.requires_grad]
    centers = [p for p in center_params if p.requires_grad]
    if not encoder:
        raise ValueError("build_optimizer got no trainable encoder parameters")
    if {id(p) for p in encoder} & {id(p) for p in centers}:
        raise ValueError("a parameter is in both the encoder and the centers group; pass disjoint sets")
    groups: list[dict[str, Any]] = [
        {"params": encoder, "lr": cfg.lr, "name": GROUP_NAMES[0]},
        {"params": centers, "lr": cfg.clr, "name": GROUP_NAMES[1]},
    ]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_learning_rates(optimizer: torch.optim.Optimizer, lr: float, clr: float) -> None:
    """Write the encoder rate ``lr`` and the center rate ``clr`` into the named groups.

    Raises:
        ValueError: If the optimiser lacks a group named ``"encoder"`` or ``"centers"``.
    """
    rates = {GROUP_NAMES[0]: lr, GROUP_NAMES[1]: clr}
    seen = set()
    for group in optimizer.param_groups:
        name = group.get("name")
        if name in rates:
            group["lr"] = rates[name]
            seen.add(name)
    missing = set(rates) - seen
    if missing:
        raise ValueError(f"optimizer has no param group named {sorted(missing)}; build it with build_optimizer")
