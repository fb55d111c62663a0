"""Decoded images as tensors, with the channel policy of ``secu.augment`` (no torchvision: inference's
processes import this and not the view augmentations)."""

from __future__ import annotations

import numpy as np
import torch


def image_to_tensor(image: np.ndarray, channels: int) -> torch.Tensor:
    """A uint8 H x W (x C) array as a uint8 C x H x W tensor with ``channels`` channels.

    Args:
        image: H x W (grayscale) or H x W x C with C in {1, 3, 4}, dtype uint8.
        channels: 1 or 3, the channels wanted (see the channel policy in the module docstring).

    Returns:
        A uint8 tensor of shape (channels, H, W). It may share memory with ``image``.

    Raises:
        ValueError: For a dtype other than uint8 or an unsupported shape.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (decoded pixels), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"images must be H x W or H x W x C with C in (1, 3, 4), got shape {array.shape}")
    if not array.flags.writeable:
        # torch.from_numpy warns on read-only arrays (Ray Data hands those out); copying is cheap.
        array = array.copy()
    x_CHW = torch.from_numpy(array).permute(2, 0, 1)
    if x_CHW.shape[0] == 4:
        x_CHW = x_CHW[:3]
    if x_CHW.shape[0] == channels:
        return x_CHW
    if channels == 3:
        return x_CHW.expand(3, -1, -1)
    # ITU-R 601-2 luma, in float32 and truncated to uint8, as torchvision's rgb_to_grayscale on uint8 tensors.
    r, g, b = x_CHW.unbind(dim=0)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(0).to(torch.uint8)
