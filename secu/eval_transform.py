"""The deterministic evaluation transform (resize the short side, center-crop S x S) in plain torch.

Inference and the evaluation stream need only this one transform. Written against torch alone, a process that
runs it (a Ray Data read task that decodes, transforms and assigns) does not import torchvision, whose package
import pulls in ``torch._dynamo`` through ``torchvision.ops``: about 2 s of CPU per fresh worker process.

The pixels are those of ``torchvision.transforms.v2.Resize(size, antialias=True)`` followed by
``CenterCrop(S)`` on uint8 tensors (``tests/secu/test_eval_transform.py`` compares them on many shapes):
bilinear, ``align_corners=False``, antialiased, on uint8 directly where torch's uint8 kernel runs (AVX2,
AVX-512, ARM CPUs), else in float32, rounded; the long side becomes ``int(size * long / short)``; the crop's
offset is ``round((side - S) / 2)``. A crop larger than the resized image (``eval_resize`` < ``image_size``)
needs padding, which goes to torchvision.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from secu.config import AugmentConfig
from secu.images import image_to_tensor


@cache  # asked once per process, not per image
def _native_uint8_bilinear() -> bool:
    """Whether torch's uint8 bilinear kernel runs on this CPU (torchvision uses it there)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_short_side(x_CHW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 C x H x W tensor so that its short side is ``size`` (bilinear, antialiased)."""
    _, h, w = x_CHW.shape
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w) or x_CHW.numel() == 0:
        return x_CHW
    x = x_CHW[None]
    if x.device.type == "cpu" and _native_uint8_bilinear():
        return F.interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(x.float(), size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)[0]


def center_crop(x_CHW: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` of a C x H x W tensor at least that large."""
    _, h, w = x_CHW.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x_CHW[:, top:top + size, left:left + size]


class EvalTransform:
    """Deterministic transform for inference: resize the short side, then center-crop S x S."""

    def __init__(self, cfg: AugmentConfig) -> None:
        """Resize to ``cfg.eval_resize`` (or S when 0), center-crop ``cfg.image_size``."""
        self.cfg = cfg
        self.resize = cfg.eval_resize or cfg.image_size
        self._padded = None
        if self.resize < cfg.image_size:  # the crop pads: torchvision's CenterCrop does that
            from torchvision.transforms import v2

            self._padded = v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(cfg.image_size)])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """The uint8 C x S x S evaluation view of a uint8 H x W (x C) image."""
        x_CHW = image_to_tensor(image, self.cfg.channels)
        if self._padded is not None:
            return self._padded(x_CHW)
        return center_crop(resize_short_side(x_CHW, self.resize), self.cfg.image_size)


def eval_batch(t: EvalTransform, images: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluation views of every image, stacked into a uint8 B x C x S x S array.

    Raises:
        ValueError: For an empty batch or malformed images.
    """
    if len(images) == 0:
        raise ValueError("eval_batch got no images")
    return torch.stack([t(image) for image in images]).numpy()
