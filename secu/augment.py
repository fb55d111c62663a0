"""Two asymmetric augmented views (spec 5); the deterministic evaluation transform is re-exported from
``secu.eval_transform`` (plain torch, so that inference's processes need no torchvision).

Views are made with ``torchvision.transforms.v2`` directly on uint8 C x H x W tensors (no PIL round
trip) and stay uint8, so that data moves between processes and to the GPU at a quarter of the float
size; :func:`normalize` turns a batch into float32 on the training device.

Channel policy (``AugmentConfig.channels``), applied by :func:`image_to_tensor` (``secu.images``):

- an image with ``channels`` channels is used as is;
- a 1-channel image is replicated to 3 channels when ``channels == 3`` (grayscale images in an RGB
  dataset);
- a 3-channel image is converted to luminance when ``channels == 1``;
- a 4-channel image (RGBA) loses its alpha channel first.

Randomness: every random draw comes from torch's global CPU generator, because the v2 transforms
take no ``torch.Generator``. A worker that needs reproducible views passes ``seed=`` to
:func:`augment_batch`, which draws the batch from a forked generator seeded with it and leaves the
global state untouched (for example ``seed = hash((epoch, batch_id))``); otherwise a worker process
seeds torch once per task with ``torch.manual_seed``.

Legend: B = batch, C = channels, H, W = input size, S = output side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from secu.config import AugmentConfig
from secu.eval_transform import EvalTransform, eval_batch  # re-exported: part of this module's API
from secu.images import image_to_tensor  # re-exported
from secu.normalize import normalize  # re-exported

__all__ = [
    "EvalTransform",
    "SeparableGaussianBlur",
    "TwoViewAugment",
    "augment_batch",
    "eval_batch",
    "image_to_tensor",
    "normalize",
    "separable_gaussian_blur",
]


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` computed as two 1-D passes: same random sigma, same output up to rounding.

    torchvision convolves with the full k x k kernel (k^2 taps per pixel: 529 at 224 px, where the blur
    then costs more than every other step together); the Gaussian is separable, so a horizontal and a
    vertical pass of k taps each give the same image (reflect padding commutes with the other axis).
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Blur a plain C x H x W (or B x C x H x W) tensor; other input types go to torchvision."""
        if type(inpt) is not torch.Tensor:
            return super().transform(inpt, params)
        return separable_gaussian_blur(inpt, self.kernel_size, params["sigma"])


def _gaussian_weights(size: int, sigma: float) -> list[float]:
    half = (size - 1) * 0.5
    pdf = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(size)]
    total = sum(pdf)
    return [v / total for v in pdf]


def _blur_pass(padded: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    # k shifted multiply-adds beat conv2d with a 1 x k kernel about 3x on CPU (oneDNN handles such
    # thin kernels poorly) and run as plain elementwise kernels on a GPU.
    n = padded.shape[dim] - (len(weights) - 1)
    out = padded.narrow(dim, 0, n) * weights[0]
    for i in range(1, len(weights)):
        out.add_(padded.narrow(dim, i, n), alpha=weights[i])
    return out


def separable_gaussian_blur(image: torch.Tensor, kernel_size: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian blur with reflect padding, as torchvision's ``gaussian_blur`` but in two 1-D passes.

    Args:
        image: ... x H x W tensor (e.g. C x H x W), uint8 or float.
        kernel_size: Odd kernel sizes (x, y); reflect padding needs kernel_size // 2 < the image side.
        sigma: Standard deviations (x, y), positive.

    Returns:
        The blurred image, same shape and dtype (integer images are rounded back).
    """
    kx, ky = int(kernel_size[0]), int(kernel_size[1])
    shape = image.shape
    planes = image.reshape(-1, 1, shape[-2], shape[-1])
    fp = torch.is_floating_point(image)
    out = planes if fp else planes.to(torch.float32)
    pad = torch.nn.functional.pad
    out = _blur_pass(pad(out, [kx // 2, kx // 2, 0, 0], mode="reflect"), _gaussian_weights(kx, float(sigma[0])), -1)
    out = _blur_pass(pad(out, [0, 0, ky // 2, ky // 2], mode="reflect"), _gaussian_weights(ky, float(sigma[1])), -2)
    out = out.reshape(shape)
    return out if fp else out.round_().clamp_(0, 255).to(image.dtype)


def _blur_kernel(size: int) -> int:
    # About 10% of the side, odd, at least 3 (23 at 224 px as in BYOL; 3 at 28-32 px; 9 at 96 px).
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _view(cfg: AugmentConfig, blur_p: float, solarize_p: float) -> v2.Compose:
    size = cfg.image_size
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=(cfg.min_crop, 1.0), antialias=True)]
    if cfg.jitter_p > 0:
        # Saturation and hue are undefined for one channel, so grayscale views jitter brightness and
        # contrast only (v2 would silently skip them anyway; this makes it explicit).
        jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1) if cfg.channels == 3 else v2.ColorJitter(0.4, 0.4)
        steps.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.channels == 3 and cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=cfg.grayscale_p))
    if blur_p > 0:
        steps.append(v2.RandomApply([SeparableGaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p))
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(steps)


class TwoViewAugment:
    """The two asymmetric SeCu views of one image (spec 5), as uint8 C x S x S tensors.

    View 1: RandomResizedCrop(S, scale=(min_crop, 1)); ColorJitter(0.4, 0.4, 0.2, 0.1) with
    probability ``jitter_p``; RandomGrayscale(``grayscale_p``, 3 channels only); GaussianBlur(sigma in
    [0.1, 2]) with probability ``blur_p[0]``; horizontal flip if ``flip``; Solarize(128) with
    probability ``solarize_p[0]``. View 2: the same with ``blur_p[1]`` and ``solarize_p[1]``.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        """Build both view pipelines from ``cfg``."""
        self.cfg = cfg
        self.view1 = _view(cfg, cfg.blur_p[0], cfg.solarize_p[0])
        self.view2 = _view(cfg, cfg.blur_p[1], cfg.solarize_p[1])

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of ``image`` (uint8 H x W or H x W x C, any size).

        Returns:
            Two uint8 tensors of shape (``cfg.channels``, S, S).
        """
        x_CHW = image_to_tensor(image, self.cfg.channels)
        return self.view1(x_CHW), self.view2(x_CHW)


def augment_batch(
    aug: TwoViewAugment, images: Sequence[np.ndarray], seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two views of every image, stacked.

    Args:
        aug: The augmentation.
        images: uint8 images, possibly of different sizes.
        seed: If given, the batch's random draws come from a generator seeded with it (same seed and
            images, same views); torch's global generator is left as it was.

    Returns:
        ``(views1, views2)``, uint8 arrays of shape B x C x S x S.

    Raises:
        ValueError: For an empty batch or malformed images.
    """
    if len(images) == 0:
        raise ValueError("augment_batch got no images")
    if seed is None:
        pairs = [aug(image) for image in images]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pairs = [aug(image) for image in images]
    views1 = torch.stack([a for a, _ in pairs]).numpy()
    views2 = torch.stack([b for _, b in pairs]).numpy()
    return views1, views2

