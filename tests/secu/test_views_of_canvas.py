"""Views on the training device (``augment.views_on_device``): the fixed-size canvas of a decoded image and
the batched views computed from a batch of canvases, against the CPU path (``BatchTwoViewAugment`` on the
decoded images): equal for same-size small images, the same view distributions otherwise, and the
documented crop difference for large non-square images."""

import math

import numpy as np
import pytest
import torch

from secu.batch_augment import BatchTwoViewAugment, canvas_side, to_canvas
from secu.config import AugmentConfig, ExperimentConfig
from tests.secu.test_batch_augment import GRAY, RGB, _images, _structured


def _canvas_batch(images: list[np.ndarray], cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    side = canvas_side(cfg.image_size)
    made = [to_canvas(image, cfg.channels, side) for image in images]
    return (torch.from_numpy(np.stack([c for c, _, _ in made])), torch.tensor([h for _, h, _ in made]),
            torch.tensor([w for _, _, w in made]))


def _device_views(images: list[np.ndarray], cfg: AugmentConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    canvas, heights, widths = _canvas_batch(images, cfg)
    v1, v2 = BatchTwoViewAugment(cfg).views_of_canvas(canvas, heights, widths, seed=seed)
    return v1.numpy(), v2.numpy()


def _rgb(images: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.stack([im, np.roll(im, 3, axis=1), (im * rng.uniform(0.5, 1)).astype(np.uint8)], -1) for im in images]


def test_canvas_side() -> None:
    assert canvas_side(224) == 256 and canvas_side(32) == 37 and canvas_side(28) == 32


def test_small_image_is_kept_as_is_with_its_edges_repeated() -> None:
    image = _images(0, [(20, 30, 3)])[0]
    canvas, h, w = to_canvas(image, 3, 32)
    assert canvas.shape == (3, 32, 32) and canvas.dtype == np.uint8 and (h, w) == (20, 30)
    np.testing.assert_array_equal(canvas[:, :20, :30], image.transpose(2, 0, 1))
    np.testing.assert_array_equal(canvas[:, 25, :30], image[19].T)  # the last row repeated
    np.testing.assert_array_equal(canvas[:, :20, 31], image[:, 29].T)  # the last column repeated
    gray, _, _ = to_canvas(image[:, :, 0], 3, 32)  # a grayscale image in an RGB stream: 3 equal channels
    np.testing.assert_array_equal(gray[0], gray[2])


def test_large_image_is_resized_by_its_shorter_side_and_center_cropped() -> None:
    # A 4:3 image whose columns hold their own index: the canvas keeps the central square.
    W, H, R = 400, 300, 100
    image = np.broadcast_to((np.arange(W) * 255 // (W - 1)).astype(np.uint8), (H, W)).copy()
    canvas, h, w = to_canvas(image, 1, R)
    assert (h, w) == (R, R)
    row = canvas[0, R // 2].astype(float)
    # Columns 50..349 of the original (the central 300) span the canvas: about 32..223 in value.
    assert abs(row[0] - 50 * 255 / (W - 1)) < 3 and abs(row[-1] - 349 * 255 / (W - 1)) < 3
    tall, h, w = to_canvas(np.zeros((300, 80), dtype=np.uint8), 1, R)  # short side <= R: only cropped
    assert (h, w) == (R, 80) and tall.shape == (1, R, R)


@pytest.mark.parametrize("cfg", [GRAY, RGB])
def test_same_size_small_images_give_the_cpu_paths_views(cfg: AugmentConfig) -> None:
    # The same draws in the same order and the same sample positions: equal up to float rounding
    # (a pixel on a .5 boundary may round the other way).
    images = _structured(64, cfg.image_size, 1)
    if cfg.channels == 3:
        images = _rgb(images, 2)
    ours = _device_views(images, cfg, seed=5)
    ref = BatchTwoViewAugment(cfg)(images, seed=5)
    for a, b in zip(ours, ref, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert float((diff > 1).mean()) < 1e-3, float((diff > 1).mean())


def _stats(v: np.ndarray) -> tuple[float, float, float]:
    f = v.astype(np.float64)
    return float(f.mean()), float(f.std(axis=(1, 2, 3)).mean()), float(np.abs(np.diff(f, axis=-1)).mean())


@pytest.mark.parametrize(("cfg", "sizes"), [
    (RGB, [24, 28, 32, 36]),                                    # mixed sizes up to R = 37: kept as they are
    (AugmentConfig(image_size=96, min_crop=0.3), [140]),        # larger than R = 110: resized to R first
])
def test_view_statistics_match_the_cpu_path(cfg: AugmentConfig, sizes: list[int]) -> None:
    # Per-pixel mean brightness, contrast and roughness of each view over 384 images, as
    # tests/secu/test_batch_augment.py compares the batched and the per-image pipelines. The reference is
    # the CPU path's batched implementation (forced at 96 px), whose draws are the same: the per-image
    # torchvision pipeline draws differently, and with 20 % solarized views the count of solarized
    # images alone moves a 384-image mean by about 4 levels (tests/secu/test_batch_augment.py shows the
    # two CPU implementations agree).
    images = [im for s in sizes for im in _rgb(_structured(384 // len(sizes), s, 8 + s), s)]
    ours = _device_views(images, cfg, seed=0)
    ref = BatchTwoViewAugment(cfg, batched=True)(images, seed=0)
    for view in (0, 1):
        (m1, s1, r1), (m2, s2, r2) = _stats(ours[view]), _stats(ref[view])
        assert math.isclose(m1, m2, abs_tol=4.0), (view, m1, m2)
        assert math.isclose(s1, s2, rel_tol=0.06), (view, s1, s2)
        assert math.isclose(r1, r2, rel_tol=0.1), (view, r1, r2)


def _ramps(n: int, H: int, W: int) -> list[np.ndarray]:
    """Channel 0 holds the column (0..255 across the width), channel 1 the row: a view's range of values
    in a channel is the fraction of the image's width (height) its crop covered."""
    xx = np.broadcast_to(np.linspace(0, 255, W), (H, W))
    yy = np.broadcast_to(np.linspace(0, 255, H)[:, None], (H, W))
    image = np.stack([xx, yy, np.full((H, W), 128.0)], -1).round().astype(np.uint8)
    return [image] * n


def _crop_fractions(views: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = views.astype(np.float64) / 255
    width = v[:, 0, :, -1].mean(1) - v[:, 0, :, 0].mean(1)
    height = v[:, 1, -1, :].mean(1) - v[:, 1, 0, :].mean(1)
    return width, height, v[:, 0, :, 0].mean(1)  # and where the crop starts (left edge)


CROPS = AugmentConfig(image_size=96, min_crop=0.3, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0),
                      solarize_p=(0.0, 0.0), flip=False)  # crops only


def test_crop_sizes_match_the_cpu_path_for_square_images() -> None:
    images = _ramps(400, 150, 150)
    ours, ref = _device_views(images, CROPS, seed=1), BatchTwoViewAugment(CROPS)(images, seed=1)
    for a, b in zip(_crop_fractions(ours[0]), _crop_fractions(ref[0]), strict=True):
        assert abs(a.mean() - b.mean()) < 0.025, (a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 0.025, (a.std(), b.std())


def test_crops_of_a_non_square_image_come_from_its_central_square() -> None:
    # The documented difference: a 4:3 image's crops cover sqrt(3/4) as much of its long side as on the
    # CPU path (areas are fractions of the central square), a little less of its short side, and never
    # reach the outer eighths.
    images = _ramps(400, 150, 200)
    ours, ref = _device_views(images, CROPS, seed=2), BatchTwoViewAugment(CROPS)(images, seed=2)
    (w_dev, h_dev, left_dev), (w_cpu, h_cpu, left_cpu) = _crop_fractions(ours[0]), _crop_fractions(ref[0])
    assert math.isclose(w_dev.mean() / w_cpu.mean(), math.sqrt(0.75), rel_tol=0.05), (w_dev.mean(), w_cpu.mean())
    # Along the short side the CPU path's boxes are already capped by the image's height: a smaller loss.
    assert math.sqrt(0.75) < h_dev.mean() / h_cpu.mean() < 0.97, (h_dev.mean(), h_cpu.mean())
    assert float(left_dev.min()) >= 0.125 - 0.01 and float(left_cpu.min()) < 0.05
    assert float((left_dev + w_dev).max()) <= 0.875 + 0.01


def test_views_of_canvas_are_seeded_and_checked() -> None:
    canvas, heights, widths = _canvas_batch(_images(3, [(28, 28)] * 4), GRAY)
    aug = BatchTwoViewAugment(GRAY)
    a, b = aug.views_of_canvas(canvas, heights, widths, seed=3), aug.views_of_canvas(canvas, heights, widths, seed=3)
    c = aug.views_of_canvas(canvas, heights, widths, seed=4)
    assert a[0].shape == (4, 1, 28, 28) and a[0].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="uint8 B x 1 x R x R"):
        aug.views_of_canvas(canvas.float(), heights, widths, seed=0)
    with pytest.raises(ValueError, match="no images"):
        aug.views_of_canvas(canvas[:0], heights[:0], widths[:0], seed=0)


def test_views_on_device_option() -> None:
    assert AugmentConfig().views_on_device == "false"  # until the device path has run on a GPU
    assert not AugmentConfig().views_on_device_for(use_gpu=True)
    auto = AugmentConfig(views_on_device="auto")
    assert auto.views_on_device_for(use_gpu=True) and not auto.views_on_device_for(use_gpu=False)
    assert AugmentConfig(views_on_device="True").views_on_device_for(use_gpu=False)
    assert not AugmentConfig(views_on_device=False).views_on_device_for(use_gpu=True)  # type: ignore[arg-type]
    merged = ExperimentConfig.from_dict({"augment": {"views_on_device": True}})
    assert merged.augment.views_on_device == "true"
    with pytest.raises(ValueError, match="augment.views_on_device='gpu': choose one of"):
        AugmentConfig(views_on_device="gpu")
