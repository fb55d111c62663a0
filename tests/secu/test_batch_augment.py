"""The batched two-view augmentation (the training data path): shapes, determinism, each operation
against its definition or torchvision, and the same view statistics as the per-image pipeline."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from secu.augment import TwoViewAugment, augment_batch
from secu.batch_augment import BatchTwoViewAugment, _blur, _shift_hue, crop_boxes
from secu.config import AugmentConfig

GRAY = AugmentConfig(image_size=28, channels=1, mean=(0.286,), std=(0.353,), grayscale_p=0.0)
RGB = AugmentConfig(image_size=32)
PLAIN = dict(min_crop=1.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), flip=False)


def _images(seed: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


def _structured(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth images with edges (random rectangles on a gradient), closer to photos than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        img = rng.uniform(0, 120) + rng.uniform(0, 4) * xx
        for _ in range(3):
            y0, x0 = rng.integers(0, size - 4, 2)
            h, w = rng.integers(3, size // 2, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize(("cfg", "shapes"), [
    (GRAY, [(28, 28)] * 5),                             # one grid_sample for the batch
    (GRAY, [(28, 28), (28, 28, 1), (40, 30)]),           # mixed sizes: per-image crops
    (RGB, [(32, 32, 3), (50, 70, 3), (20, 24, 4), (30, 30)]),
])
def test_shapes_dtypes_and_seed(cfg: AugmentConfig, shapes: list[tuple[int, ...]]) -> None:
    images = _images(0, shapes)
    aug = BatchTwoViewAugment(cfg)
    state = torch.get_rng_state()
    a1, a2 = aug(images, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # a seeded batch leaves the global generator alone
    b1, b2 = aug(images, seed=7)
    c1, _ = aug(images, seed=8)
    expected = (len(images), cfg.channels, cfg.image_size, cfg.image_size)
    for v in (a1, a2):
        assert v.shape == expected and v.dtype == np.uint8
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2) and not np.array_equal(a1, c1)


def test_unseeded_batches_follow_torch_manual_seed() -> None:
    images = _images(1, [(28, 28)] * 4)
    aug = BatchTwoViewAugment(GRAY)
    torch.manual_seed(3)
    first = aug(images)[0]
    torch.manual_seed(3)
    np.testing.assert_array_equal(first, aug(images)[0])


@pytest.mark.parametrize("shapes", [[(28, 28)] * 3, [(28, 28), (20, 20)]])
def test_plain_config_is_identity_on_both_crop_paths(shapes: list[tuple[int, ...]]) -> None:
    images = _images(2, shapes)
    v1, v2 = BatchTwoViewAugment(AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,), **PLAIN))(images)
    np.testing.assert_array_equal(v1[0, 0], images[0])
    np.testing.assert_array_equal(v2[0, 0], images[0])


def test_flip_only_gives_the_image_or_its_mirror_both_seen() -> None:
    image = _images(3, [(28, 28)])[0]
    cfg = AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,), **{**PLAIN, "flip": True})
    v1, v2 = BatchTwoViewAugment(cfg)([image] * 64, seed=1)
    views = np.concatenate([v1, v2])[:, 0]
    same = np.all(views == image, axis=(1, 2))
    mirrored = np.all(views == image[:, ::-1], axis=(1, 2))
    assert np.all(same | mirrored)
    assert 0.3 < same.mean() < 0.7


def test_solarize_only_inverts_bright_pixels() -> None:
    image = _images(4, [(28, 28)])[0]
    cfg = AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,), **{**PLAIN, "solarize_p": (1.0, 1.0)})
    v1, v2 = BatchTwoViewAugment(cfg)([image] * 2, seed=0)
    expected = np.where(image >= 128, 255 - image, image)
    np.testing.assert_array_equal(v1[:, 0], np.stack([expected] * 2))
    np.testing.assert_array_equal(v2[:, 0], np.stack([expected] * 2))


def test_grayscale_input_stays_equal_in_three_channels_through_jitter_and_blur() -> None:
    image = _images(5, [(32, 32)])[0]
    v1, v2 = BatchTwoViewAugment(AugmentConfig(image_size=32, jitter_p=1.0))([image] * 8, seed=3)
    for v in (v1, v2):
        assert v.shape[1] == 3
        np.testing.assert_array_equal(v[:, 0], v[:, 1])
        np.testing.assert_array_equal(v[:, 0], v[:, 2])


def test_random_grayscale_p1_gives_equal_channels() -> None:
    images = _images(6, [(32, 32, 3)] * 4)
    v1, _ = BatchTwoViewAugment(AugmentConfig(image_size=32, **{**PLAIN, "grayscale_p": 1.0}))(images)
    np.testing.assert_array_equal(v1[:, 0], v1[:, 1])
    np.testing.assert_array_equal(v1[:, 1], v1[:, 2])


def test_crop_boxes_follow_random_resized_crop() -> None:
    gen = torch.Generator().manual_seed(0)
    n, H, W, scale = 4000, 28, 40, (0.3, 1.0)
    box = crop_boxes(gen, torch.full((n,), H), torch.full((n,), W), scale).double()
    top, left, h, w = box.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W) & (h > 0) & (w > 0)).all())
    area = h * w / (H * W)
    ratio = w / h
    # Rounding to whole pixels widens the ranges a little.
    assert float(area.min()) >= 0.25 and float(area.max()) <= 1.0
    assert float(ratio.min()) >= 0.7 and float(ratio.max()) <= 1.45
    torch.manual_seed(0)
    ref = torch.tensor([_tv_box(H, W, scale) for _ in range(n)]).double()
    ref_area = ref[:, 2] * ref[:, 3] / (H * W)
    assert abs(float(area.mean()) - float(ref_area.mean())) < 0.02
    assert abs(float(top.mean()) - float(ref[:, 0].mean())) < 0.5


def _tv_box(H: int, W: int, scale: tuple[float, float]) -> list[int]:
    t = v2.RandomResizedCrop(8, scale=scale)
    params = t.make_params([torch.zeros(1, H, W)])
    return [params["top"], params["left"], params["height"], params["width"]]


def test_crop_boxes_fall_back_to_the_central_crop() -> None:
    # A 10 x 100 strip: no box with aspect in [3/4, 4/3] and area >= 90% fits, so the central
    # 10 x 13 crop (the widest allowed aspect) is used.
    gen = torch.Generator().manual_seed(0)
    box = crop_boxes(gen, torch.tensor([10]), torch.tensor([100]), (0.9, 1.0))
    assert box.tolist() == [[0, 43, 10, 13]]


def test_blur_matches_torchvision_for_the_drawn_sigmas() -> None:
    x = torch.from_numpy(np.stack(_structured(6, 28, 7))[:, None]).float()
    gen = torch.Generator().manual_seed(5)
    sigmas = torch.rand(6, generator=torch.Generator().manual_seed(5)) * 1.9 + 0.1
    ours = _blur(gen, x, 3)
    for i in range(6):
        ref = TF.gaussian_blur(x[i], [3, 3], [float(sigmas[i])] * 2)
        torch.testing.assert_close(ours[i], ref, atol=1e-3, rtol=1e-5)


def test_hue_shift_matches_torchvision() -> None:
    x = torch.rand(5, 3, 8, 8)
    shifts = torch.tensor([0.0, 0.05, -0.1, 0.1, -0.03])
    ours = _shift_hue(x * 255, shifts) / 255
    for i in range(5):
        torch.testing.assert_close(ours[i], TF.adjust_hue(x[i], float(shifts[i])), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [GRAY, RGB])
def test_view_statistics_match_the_per_image_pipeline(cfg: AugmentConfig) -> None:
    # Same distributions of crops, colour changes, blur and solarize: the two pipelines' views agree
    # in mean brightness, contrast and roughness (per view, over many images) to within a few levels.
    images = _structured(512, cfg.image_size, 8)
    if cfg.channels == 3:
        rng = np.random.default_rng(9)
        images = [np.stack([im, np.roll(im, 3, axis=1), (im * rng.uniform(0.5, 1)).astype(np.uint8)], -1)
                  for im in images]
    ours = BatchTwoViewAugment(cfg)(images, seed=0)
    ref = augment_batch(TwoViewAugment(cfg), images, seed=0)

    def stats(v: np.ndarray) -> tuple[float, float, float]:
        f = v.astype(np.float64)
        return float(f.mean()), float(f.std(axis=(1, 2, 3)).mean()), float(np.abs(np.diff(f, axis=-1)).mean())

    for view in (0, 1):
        (m1, s1, r1), (m2, s2, r2) = stats(ours[view]), stats(ref[view])
        assert math.isclose(m1, m2, abs_tol=4.0), (view, m1, m2)
        assert math.isclose(s1, s2, rel_tol=0.06), (view, s1, s2)
        assert math.isclose(r1, r2, rel_tol=0.08), (view, r1, r2)


def test_input_errors() -> None:
    aug = BatchTwoViewAugment(GRAY)
    with pytest.raises(ValueError, match="no images"):
        aug([])
    with pytest.raises(ValueError, match="uint8"):
        aug([np.zeros((28, 28), dtype=np.float32)])


def test_large_views_use_the_per_image_pipeline() -> None:
    # Above BATCHED_MAX_SIDE the per-image torchvision pipeline is the faster one (benchmarks.augment).
    cfg = AugmentConfig(image_size=96)
    images = _images(10, [(120, 100, 3), (96, 96, 3)])
    aug = BatchTwoViewAugment(cfg)
    assert not aug.batched
    ours = aug(images, seed=4)
    ref = augment_batch(TwoViewAugment(cfg), images, seed=4)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    forced = BatchTwoViewAugment(cfg, batched=True)(images, seed=4)
    assert forced[0].shape == (2, 3, 96, 96) and BatchTwoViewAugment(GRAY).batched
