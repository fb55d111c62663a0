"""Per-channel normalisation of uint8 image batches, the network's input (a module without torchvision, so
inference actors and the methods do not pay its import)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["normalize"]


def normalize(batch_BCHW: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 (x / 255 - mean) / std per channel, on the batch's device.

    Args:
        batch_BCHW: uint8 images B x C x H x W (any device).
        mean: C per-channel means in [0, 1] units.
        std: C per-channel standard deviations.

    Returns:
        A float32 tensor of the same shape and device.

    Raises:
        ValueError: If the batch is not uint8 B x C x H x W or mean/std do not have C entries.
    """
    if batch_BCHW.dtype != torch.uint8 or batch_BCHW.ndim != 4:
        raise ValueError(
            f"normalize needs a uint8 B x C x H x W batch, got {batch_BCHW.dtype} of shape {tuple(batch_BCHW.shape)}"
        )
    channels = batch_BCHW.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values (one per channel), got {list(mean)} / {list(std)}")
    device = batch_BCHW.device
    std_C = torch.tensor(std, dtype=torch.float32, device=device)
    mean_C = torch.tensor(mean, dtype=torch.float32, device=device)
    # One fused multiply-add: x * (1 / (255 std)) - mean / std.
    scale = (1.0 / (255.0 * std_C)).view(1, -1, 1, 1)
    shift = (mean_C / std_C).view(1, -1, 1, 1)
    return torch.addcmul(-shift, batch_BCHW.float(), scale)
