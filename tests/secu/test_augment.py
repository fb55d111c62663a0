"""Two-view augmentation, evaluation transform and normalisation on uint8 tensors."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from secu.augment import (
    EvalTransform,
    TwoViewAugment,
    augment_batch,
    eval_batch,
    image_to_tensor,
    normalize,
    separable_gaussian_blur,
)
from secu.config import AugmentConfig

GRAY = AugmentConfig(image_size=28, channels=1, mean=(0.286,), std=(0.353,), grayscale_p=0.0)
RGB = AugmentConfig(image_size=32)
# Only the deterministic parts: full-image crop, no colour, blur, flip or solarize.
PLAIN = dict(min_crop=1.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), flip=False)


def _images(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


def test_grayscale_views_shapes_and_dtypes() -> None:
    rng = np.random.default_rng(0)
    images = _images(rng, [(28, 28), (28, 28, 1), (40, 30)])
    v1, v2 = augment_batch(TwoViewAugment(GRAY), images, seed=0)
    for v in (v1, v2):
        assert v.shape == (3, 1, 28, 28) and v.dtype == np.uint8


def test_rgb_views_of_mixed_sizes() -> None:
    rng = np.random.default_rng(1)
    images = _images(rng, [(32, 32, 3), (50, 70, 3), (20, 24, 4), (30, 30)])  # RGBA and grayscale too
    v1, v2 = augment_batch(TwoViewAugment(RGB), images, seed=1)
    assert v1.shape == v2.shape == (4, 3, 32, 32) and v1.dtype == v2.dtype == np.uint8


def test_views_differ_and_seed_reproduces_without_touching_global_rng() -> None:
    rng = np.random.default_rng(2)
    images = _images(rng, [(32, 32, 3)] * 4)
    aug = TwoViewAugment(RGB)
    state = torch.get_rng_state()
    a1, a2 = augment_batch(aug, images, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    b1, b2 = augment_batch(aug, images, seed=7)
    c1, _ = augment_batch(aug, images, seed=8)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2)
    assert not np.array_equal(a1, c1)


def test_grayscale_image_is_replicated_to_three_equal_channels() -> None:
    # Jitter (hue, saturation included), blur and solarize keep equal channels equal.
    image = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    v1, v2 = augment_batch(TwoViewAugment(AugmentConfig(image_size=32, jitter_p=1.0)), [image] * 3, seed=3)
    for v in (v1, v2):
        assert v.shape[1] == 3
        np.testing.assert_array_equal(v[:, 0], v[:, 1])
        np.testing.assert_array_equal(v[:, 0], v[:, 2])


def test_rgb_image_becomes_luminance_for_one_channel() -> None:
    image = np.zeros((28, 28, 3), dtype=np.uint8)
    image[..., 1] = 200  # pure green: luminance 0.587 * 200 = 117
    x = image_to_tensor(image, channels=1)
    assert x.shape == (1, 28, 28) and int(x[0, 0, 0]) == 117


def test_random_grayscale_p1_gives_equal_channels() -> None:
    cfg = AugmentConfig(image_size=32, **{**PLAIN, "grayscale_p": 1.0})
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    v1, _ = TwoViewAugment(cfg)(image)
    assert torch.equal(v1[0], v1[1]) and torch.equal(v1[1], v1[2])


def test_plain_pipeline_is_identity_and_solarize_inverts_bright_pixels() -> None:
    image = np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)
    plain = TwoViewAugment(AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,), **PLAIN))
    v1, v2 = plain(image)
    np.testing.assert_array_equal(v1[0].numpy(), image)
    np.testing.assert_array_equal(v2[0].numpy(), image)
    cfg = AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,), **{**PLAIN, "solarize_p": (1.0, 1.0)})
    s1, s2 = TwoViewAugment(cfg)(image)
    expected = np.where(image >= 128, 255 - image, image)
    np.testing.assert_array_equal(s1[0].numpy(), expected)
    np.testing.assert_array_equal(s2[0].numpy(), expected)


def test_view_probabilities_are_asymmetric() -> None:
    # Spec 5: view 1 is always blurred, view 2 never here; the blurred view has less high frequency.
    image = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cfg = AugmentConfig(image_size=32, **{**PLAIN, "blur_p": (1.0, 0.0)})
    v1, v2 = augment_batch(TwoViewAugment(cfg), [image] * 8, seed=6)
    np.testing.assert_array_equal(v2, np.broadcast_to(image.transpose(2, 0, 1), v2.shape))

    def roughness(v: np.ndarray) -> float:
        return float(np.abs(np.diff(v.astype(np.int32), axis=-1)).mean())

    assert roughness(v1) < roughness(v2)


@pytest.mark.parametrize(("size", "kernel", "sigma"), [(28, 3, 0.7), (96, 9, 2.0), (224, 23, 1.3)])
def test_separable_blur_matches_torchvision(size: int, kernel: int, sigma: float) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    ours = separable_gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    ref = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert (ours.int() - ref.int()).abs().max() <= 1  # float summation order only
    xf = x.float()
    torch.testing.assert_close(
        separable_gaussian_blur(xf, [kernel, kernel], [sigma, sigma]),
        TF.gaussian_blur(xf, [kernel, kernel], [sigma, sigma]),
        atol=1e-3,
        rtol=1e-5,
    )


def test_eval_transform_is_deterministic_and_centre_crops() -> None:
    # A 40 x 60 image with a bright vertical stripe in the middle third of the width.
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255
    t = EvalTransform(AugmentConfig(image_size=24, eval_resize=30))
    a, b = t(image), t(image)
    assert torch.equal(a, b) and a.shape == (3, 24, 24) and a.dtype == torch.uint8
    # Short side 40 -> 30, long side 60 -> 45; the centre crop keeps columns 10.5..34.5 of 45, so the
    # stripe (columns 15..30 after the resize) sits in the middle with dark margins at both sides.
    row = a[0, 12].int()
    assert row[12] == 255 and row[0] == 0 and row[-1] == 0
    batch = eval_batch(t, [image, image[:, :50]])
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == np.uint8


def test_eval_transform_keeps_an_image_of_the_right_size() -> None:
    image = np.random.default_rng(7).integers(0, 256, (28, 28), dtype=np.uint8)
    out = EvalTransform(GRAY)(image)
    np.testing.assert_array_equal(out[0].numpy(), image)


def test_normalize_matches_hand_computation() -> None:
    batch = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # 1 x 2 x 1 x 2
    out = normalize(batch, mean=(0.5, 0.2), std=(0.25, 0.1))
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])  # (0.2 - 0.2) / 0.1, (0.4 - 0.2) / 0.1
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normalize_keeps_the_device() -> None:
    batch = torch.zeros(2, 1, 4, 4, dtype=torch.uint8, device="cuda")
    assert normalize(batch, (0.5,), (0.5,)).device == batch.device


def test_input_errors() -> None:
    aug = TwoViewAugment(GRAY)
    with pytest.raises(ValueError, match="uint8"):
        aug(np.zeros((28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W"):
        aug(np.zeros((28, 28, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        augment_batch(aug, [])
    with pytest.raises(ValueError, match="one per channel"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 1, 2, 2), (0.5,), (0.5,))
