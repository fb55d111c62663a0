"""The two SeCu views (spec 5) computed for a whole batch at once: the training data path's augmentation.

:class:`secu.augment.TwoViewAugment` applies torchvision's v2 transforms image by image; on small images
(28-96 px) the per-call overhead of those transforms, not the arithmetic, is most of the cost (about
0.35 ms per image for the Fashion-MNIST recipe on one core, more than the training step of a small
CNN). :class:`BatchTwoViewAugment` draws the same random parameters from the same distributions and
applies each operation to the whole batch as a few tensor operations:

- RandomResizedCrop(S, scale=(min_crop, 1), ratio=(3/4, 4/3)): the crop box is drawn per image with
  torchvision's algorithm (10 attempts, then the central crop of the closest aspect ratio). When every
  image of the batch has the same size and is no larger than S (CIFAR, STL-10, Fashion-MNIST: the crop
  is only ever enlarged), crop, resize and horizontal flip are one bilinear ``grid_sample`` over the
  batch; the only difference from torchvision's crop-then-resize is at the crop's border, where the
  sample may blend in the neighbouring pixel outside the box (at most half a pixel). Otherwise (large
  or mixed sizes, e.g. ImageNet JPEGs) each image is cropped and resized with antialiasing by
  ``torchvision``'s ``resized_crop`` and the rest of the chain runs batched.
- ColorJitter(0.4, 0.4, 0.2, 0.1) with probability ``jitter_p``: brightness, contrast, saturation and
  hue (the last two on 3 channels only) with factors drawn per image and applied in an order drawn
  per image, as torchvision does.
- RandomGrayscale(``grayscale_p``, 3 channels only), GaussianBlur (kernel about 10% of S, sigma in
  [0.1, 2] per image, reflect padding, separable) with probability ``blur_p[v]``, horizontal flip
  (p = 0.5) if ``flip``, Solarize(128) with probability ``solarize_p[v]``.

Arithmetic stays in float32 from the crop to the end and is rounded to uint8 once before the
solarize threshold; torchvision rounds (truncates) to uint8 after every operation, so pixel values may
differ by a few levels. Every draw comes from one ``torch.Generator`` on the CPU (parameters are moved
to the images' device): the same seed and images give the same views, on any device.

Views on the training device (``AugmentConfig.views_on_device``): the data stream only decodes, and
:func:`to_canvas` makes every image a fixed-size uint8 C x R x R canvas (R = :func:`canvas_side`,
about S * 8 / 7) so that batches stack; the worker calls :meth:`BatchTwoViewAugment.views_of_canvas`
on the batch, on its device. Differences from the CPU path (``__call__`` on the decoded images):

- Images no larger than R on both sides are kept as they are (top-left, edge-replicated into the
  canvas, their height and width recorded); crop boxes are drawn on the image's own size, so the crop
  distribution is unchanged. For same-size images no larger than S (CIFAR, STL-10, Fashion-MNIST) the
  views equal the CPU path's for the same seed (up to float rounding). Images between S and R are
  downscaled at most R / S = 8 / 7 by a bilinear sample without antialiasing (the CPU path
  antialiases): a negligible softening.
- Larger images (ImageNet JPEGs) are first resized so that the shorter side is R (antialiased) and
  center-cropped to at most R x R. Their crops come only from that central square, at R px: a 4:3
  image loses 1/8 of its long side at each end, its crop areas are fractions of the square (crops
  cover sqrt(3/4) as much of the long side as on the CPU path, and about 0.92x as much of the short
  side, where the CPU path's boxes are capped by the image), and small crops are upscaled from
  as little as sqrt(min_crop) * R px (the CPU path crops the full-resolution image), so fine detail
  is a little softer. Per-pixel statistics of the views (brightness, contrast) are the same.

Legend: B = batch, C = channels, H, W = input size, S = output side, K = blur taps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from secu.augment import TwoViewAugment, _blur_kernel, augment_batch, image_to_tensor
from secu.config import AugmentConfig

__all__ = ["BatchTwoViewAugment", "canvas_side", "crop_boxes", "to_canvas"]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# ColorJitter(0.4, 0.4, 0.2, 0.1): factor ranges of brightness, contrast, saturation; hue shift range.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.4, 0.4, 0.2, 0.1


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _coins(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    """A bool mask of n independent draws that are True with probability p."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=gen) < p


def crop_boxes(gen: torch.Generator, heights: torch.Tensor, widths: torch.Tensor,
               scale: tuple[float, float], attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes, one per image, by torchvision's algorithm, vectorised over the batch.

    Each image tries ``attempts`` (area fraction, log-uniform aspect ratio) draws and keeps the first
    box that fits; an image where none fits gets the central crop of the closest allowed aspect ratio.

    Args:
        gen: Source of the random draws.
        heights, widths: int64 B, the images' sizes.
        scale: Range of the crop's area as a fraction of the image's area.

    Returns:
        int64 B x 4: top, left, height, width of each box.
    """
    B = heights.shape[0]
    H, W = heights.double().unsqueeze(1), widths.double().unsqueeze(1)
    area = H * W * _uniform(gen, (B, attempts), scale[0], scale[1]).double()
    log_r = _uniform(gen, (B, attempts), math.log(_RATIO[0]), math.log(_RATIO[1])).double()
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    # The first attempt that fits (argmax of a bool row is its first True); rows without one fall back.
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    h_B = h.gather(1, first).squeeze(1)
    w_B = w.gather(1, first).squeeze(1)
    u_top, u_left = torch.rand(B, generator=gen).double(), torch.rand(B, generator=gen).double()
    top = torch.floor(u_top * (H.squeeze(1) - h_B + 1))
    left = torch.floor(u_left * (W.squeeze(1) - w_B + 1))

    # Fallback: the whole image clipped to the allowed aspect ratios, centred.
    Hs, Ws = H.squeeze(1), W.squeeze(1)
    in_ratio = Ws / Hs
    fb_w = torch.where(in_ratio < _RATIO[0], Ws, torch.where(in_ratio > _RATIO[1], torch.round(Hs * _RATIO[1]), Ws))
    fb_h = torch.where(in_ratio < _RATIO[0], torch.round(Ws / _RATIO[0]), Hs)
    fb_top = torch.div(Hs - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(Ws - fb_w, 2, rounding_mode="floor")
    box = torch.stack([torch.where(found, top, fb_top), torch.where(found, left, fb_left),
                       torch.where(found, h_B, fb_h), torch.where(found, w_B, fb_w)], dim=1)
    return box.long()


def _gray(x_BCSS: torch.Tensor) -> torch.Tensor:
    """Luminance B x 1 x S x S of float RGB images (a 1-channel image is its own luminance)."""
    if x_BCSS.shape[1] == 1:
        return x_BCSS
    r, g, b = x_BCSS.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _shift_hue(x_BCSS: torch.Tensor, shift_B: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of float RGB images in [0, 255] by ``shift_B`` turns (HSV round trip)."""
    x = x_BCSS / 255.0
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    gray = delta == 0
    safe = torch.where(gray, torch.ones_like(delta), delta)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0 + shift_B.view(-1, 1, 1), 1.0)
    # HSV -> RGB: each channel is v - v s max(0, min(k, 4 - k, 1)) with k = (n + 6 h) mod 6.
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * hue, 6.0)
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1) * 255.0


def _jitter(gen: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """ColorJitter on every image of ``x`` (float B x C x S x S in [0, 255]): factors and order per image."""
    B, C = x.shape[0], x.shape[1]
    ops = 4 if C == 3 else 2
    dev = x.device
    brightness = _uniform(gen, (B,), 1 - _BRIGHTNESS, 1 + _BRIGHTNESS).view(-1, 1, 1, 1).to(dev)
    contrast = _uniform(gen, (B,), 1 - _CONTRAST, 1 + _CONTRAST).view(-1, 1, 1, 1).to(dev)
    saturation = _uniform(gen, (B,), 1 - _SATURATION, 1 + _SATURATION).view(-1, 1, 1, 1).to(dev)
    hue = _uniform(gen, (B,), -_HUE, _HUE).to(dev)
    order_BO = torch.argsort(torch.rand(B, ops, generator=gen), dim=1)  # a random permutation per image
    x = x.clone()
    for slot in range(ops):
        for op in range(ops):
            idx = (order_BO[:, slot] == op).nonzero().squeeze(1).to(dev)
            if idx.numel() == 0:
                continue
            xs = x[idx]
            if op == 0:
                xs = xs * brightness[idx]
            elif op == 1:
                f = contrast[idx]
                xs = f * xs + (1 - f) * _gray(xs).mean(dim=(1, 2, 3), keepdim=True)
            elif op == 2:
                f = saturation[idx]
                xs = f * xs + (1 - f) * _gray(xs)
            else:
                xs = _shift_hue(xs, hue[idx])
            x[idx] = xs.clamp_(0, 255)
    return x


def _blur(gen: torch.Generator, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gaussian blur of every image with its own sigma in [0.1, 2] (separable, reflect padding)."""
    B = x.shape[0]
    sigma_B1 = _uniform(gen, (B,), 0.1, 2.0).view(-1, 1)
    offsets_K = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    w_BK = torch.exp(-0.5 * (offsets_K / sigma_B1) ** 2)
    w_BK = (w_BK / w_BK.sum(dim=1, keepdim=True)).to(x.device)
    half = kernel // 2
    out = x
    for dim, pad in ((-1, [half, half, 0, 0]), (-2, [0, 0, half, half])):
        padded = F.pad(out, pad, mode="reflect")
        n = padded.shape[dim] - (kernel - 1)
        acc = padded.narrow(dim, 0, n) * w_BK[:, 0].view(-1, 1, 1, 1)
        for i in range(1, kernel):
            acc.addcmul_(padded.narrow(dim, i, n), w_BK[:, i].view(-1, 1, 1, 1))
        out = acc
    return out


def canvas_side(view_side: int) -> int:
    """R, the side of the decoded images the device path receives: ceil(S * 8 / 7) (256 for 224 px views),
    so that a crop is downscaled at most 8/7 by one bilinear sample."""
    return math.ceil(view_side * 8 / 7)


def to_canvas(image: np.ndarray, channels: int, side: int) -> tuple[np.ndarray, int, int]:
    """One decoded image as a fixed-size canvas for ``views_of_canvas`` (see the module docstring).

    An image no larger than ``side`` is kept as it is; a larger one is resized so that its shorter side
    is ``side`` (antialiased) and center-cropped to at most ``side`` on each axis. The result sits at the
    top left of the canvas; the rest repeats its last row and column (so a bilinear sample at its border
    sees the image's own edge, as on the CPU path).

    Args:
        image: uint8 H x W or H x W x C (C in 1, 3, 4).
        channels: Channels of the canvas (``secu.augment.image_to_tensor``'s channel policy).
        side: R, the canvas side.

    Returns:
        ``(canvas, height, width)``: uint8 C x R x R and the size of the image inside it.

    Raises:
        ValueError: For a malformed image.
    """
    x_CHW = image_to_tensor(image, channels)
    if min(x_CHW.shape[-2:]) > side:
        x_CHW = TF.resize(x_CHW, [side], antialias=True)
    H, W = x_CHW.shape[-2:]
    h, w = min(H, side), min(W, side)
    top, left = (H - h) // 2, (W - w) // 2
    crop = x_CHW[:, top:top + h, left:left + w].numpy()
    return np.pad(crop, ((0, 0), (0, side - h), (0, side - w)), mode="edge"), h, w


BATCHED_MAX_SIDE = 64
"""Views up to this side are computed batched; larger ones image by image with torchvision.

Measured with ``python -m benchmarks.augment`` and at intermediate sides (1 thread): batched is 9.7x
faster at 28 px, 4.4x at 32, 1.4x at 64, 0.93x at 96, 0.64x at 128 and 0.41x at 224 px. At large
sides the arithmetic dominates and torchvision's uint8 kernels beat this module's float32 passes."""


class BatchTwoViewAugment:
    """The two asymmetric SeCu views of a batch of images, as uint8 B x C x S x S arrays.

    View 1 uses ``blur_p[0]`` and ``solarize_p[0]``, view 2 ``blur_p[1]`` and ``solarize_p[1]``; the
    rest of ``cfg`` is shared (see the module docstring for each operation). Views larger than
    ``BATCHED_MAX_SIDE`` come from the per-image pipeline (``secu.augment.TwoViewAugment``), which is
    faster there; ``batched=True`` forces the batched path (tests, benchmarks).
    """

    def __init__(self, cfg: AugmentConfig, batched: bool | None = None) -> None:
        """Views of side ``cfg.image_size`` with ``cfg.channels`` channels."""
        self.cfg = cfg
        self.kernel = _blur_kernel(cfg.image_size)
        self.batched = cfg.image_size <= BATCHED_MAX_SIDE if batched is None else batched
        self._per_image = None if self.batched else TwoViewAugment(cfg)

    def __call__(self, images: Sequence[np.ndarray], seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Two views of every image.

        Args:
            images: uint8 H x W or H x W x C images (C in 1, 3, 4), possibly of different sizes.
            seed: Seeds every random draw of the batch; None draws the seed from torch's global
                generator (so ``torch.manual_seed`` makes a process reproducible).

        Returns:
            ``(views1, views2)``, uint8 arrays of shape B x C x S x S.

        Raises:
            ValueError: For an empty batch or malformed images.
        """
        if self._per_image is not None:
            return augment_batch(self._per_image, images, seed=seed)
        if len(images) == 0:
            raise ValueError("augment_batch got no images")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed(seed)
        tensors = [image_to_tensor(image, self.cfg.channels) for image in images]
        same_size = all(t.shape == tensors[0].shape for t in tensors)
        stacked = torch.stack(tensors) if same_size else None
        return self._view(gen, tensors, stacked, 0), self._view(gen, tensors, stacked, 1)

    def _view(self, gen: torch.Generator, tensors: list[torch.Tensor], stacked: torch.Tensor | None,
              which: int) -> np.ndarray:
        cfg, S = self.cfg, self.cfg.image_size
        B = len(tensors)
        heights = torch.tensor([t.shape[-2] for t in tensors], dtype=torch.int64)
        widths = torch.tensor([t.shape[-1] for t in tensors], dtype=torch.int64)
        box_B4 = crop_boxes(gen, heights, widths, (cfg.min_crop, 1.0))
        flip_B = _coins(gen, B, 0.5 if cfg.flip else 0.0)
        if stacked is not None and stacked.shape[-2] <= S and stacked.shape[-1] <= S:
            x = self._crop_resize_flip_grid(stacked, box_B4, flip_B, S)
        else:
            crops = [TF.resized_crop(t, int(b[0]), int(b[1]), int(b[2]), int(b[3]), [S, S], antialias=True)
                     for t, b in zip(tensors, box_B4.tolist(), strict=True)]
            x = torch.stack(crops).float()
            x = torch.where(flip_B.view(-1, 1, 1, 1), x.flip(-1), x)
        return self._colour_blur_solarize(gen, x, which).numpy()

    def views_of_canvas(self, canvas_BCRR: torch.Tensor, heights_B: torch.Tensor, widths_B: torch.Tensor,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of a batch of canvases (``to_canvas``), computed on the canvases' device.

        Every crop is one bilinear ``grid_sample`` over the batch, the rest of the chain as in
        ``__call__`` (the same draws in the same order: for same-size images no larger than S the views
        equal ``__call__``'s for the same seed). The differences from the CPU path are in the module
        docstring. Ignores ``batched`` (this path is always batched).

        Args:
            canvas_BCRR: uint8 B x C x R x R, on any device (C = ``cfg.channels``).
            heights_B, widths_B: The size of every image inside its canvas (top left), <= R.
            seed: Seeds every random draw of the batch (a CPU ``torch.Generator``).

        Returns:
            ``(views1, views2)``, uint8 B x C x S x S tensors on the canvases' device.

        Raises:
            ValueError: For an empty or malformed batch.
        """
        if canvas_BCRR.ndim != 4 or canvas_BCRR.dtype != torch.uint8 or canvas_BCRR.shape[1] != self.cfg.channels:
            raise ValueError(f"views_of_canvas needs uint8 B x {self.cfg.channels} x R x R canvases "
                             f"(secu.batch_augment.to_canvas), got {canvas_BCRR.dtype} {tuple(canvas_BCRR.shape)}")
        if canvas_BCRR.shape[0] == 0:
            raise ValueError("views_of_canvas got no images")
        gen = torch.Generator().manual_seed(seed)
        heights, widths = heights_B.cpu().long(), widths_B.cpu().long()
        view1 = self._canvas_view(gen, canvas_BCRR, heights, widths, 0)
        return view1, self._canvas_view(gen, canvas_BCRR, heights, widths, 1)

    def _canvas_view(self, gen: torch.Generator, canvas_BCRR: torch.Tensor, heights: torch.Tensor,
                     widths: torch.Tensor, which: int) -> torch.Tensor:
        box_B4 = crop_boxes(gen, heights, widths, (self.cfg.min_crop, 1.0))
        flip_B = _coins(gen, canvas_BCRR.shape[0], 0.5 if self.cfg.flip else 0.0)
        x = self._crop_resize_flip_grid(canvas_BCRR, box_B4, flip_B, self.cfg.image_size)
        return self._colour_blur_solarize(gen, x, which)

    def _colour_blur_solarize(self, gen: torch.Generator, x: torch.Tensor, which: int) -> torch.Tensor:
        """Jitter, grayscale, blur, rounding and solarize of float B x C x S x S crops: uint8, x's device."""
        cfg, B, dev = self.cfg, x.shape[0], x.device
        jitter_B = _coins(gen, B, cfg.jitter_p)
        if jitter_B.any():
            idx = jitter_B.nonzero().squeeze(1).to(dev)
            x[idx] = _jitter(gen, x[idx])
        if x.shape[1] == 3 and cfg.grayscale_p > 0:
            gray_B = _coins(gen, B, cfg.grayscale_p).to(dev)
            x = torch.where(gray_B.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        blur_B = _coins(gen, B, cfg.blur_p[which])
        if blur_B.any():
            idx = blur_B.nonzero().squeeze(1).to(dev)
            x[idx] = _blur(gen, x[idx], self.kernel)
        x = x.round_().clamp_(0, 255)
        solarize_B = _coins(gen, B, cfg.solarize_p[which]).to(dev)
        if solarize_B.any():
            x = torch.where(solarize_B.view(-1, 1, 1, 1) & (x >= 128), 255 - x, x)
        return x.to(torch.uint8)

    @staticmethod
    def _crop_resize_flip_grid(x_BCHW: torch.Tensor, box_B4: torch.Tensor, flip_B: torch.Tensor,
                               side: int) -> torch.Tensor:
        """Crop each box, resize it to S x S bilinearly and flip where asked, as one ``grid_sample``."""
        B, C, H, W = x_BCHW.shape
        top, left, h, w = (box_B4[:, i].float() for i in range(4))
        # Output coordinate t in (-1, 1) maps to input (2 left + w) / W - 1 + t w / W (align_corners=False).
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0] = torch.where(flip_B, -w / W, w / W)
        theta[:, 0, 2] = (2 * left + w) / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = (2 * top + h) / H - 1
        grid = F.affine_grid(theta.to(x_BCHW.device), [B, C, side, side], align_corners=False)
        return F.grid_sample(x_BCHW.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
