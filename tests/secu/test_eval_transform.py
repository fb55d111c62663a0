"""The evaluation transform in plain torch (``secu.eval_transform``) gives torchvision's pixels, and the processes
of the evaluation stream and of inference import no torchvision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from secu.config import AugmentConfig
from secu.eval_transform import EvalTransform, eval_batch
from secu.images import image_to_tensor

SHAPES = [(28, 28), (32, 32), (27, 41), (41, 27), (375, 500), (500, 375), (64, 33), (17, 96), (224, 224), (9, 9)]


def _torchvision_view(image: np.ndarray, cfg: AugmentConfig) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])).permute(2, 0, 1)
    if x.shape[0] == 4:
        x = x[:3]
    if x.shape[0] != cfg.channels:
        x = x.expand(3, -1, -1) if cfg.channels == 3 else TF.rgb_to_grayscale(x, num_output_channels=1)
    resize = cfg.eval_resize or cfg.image_size
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.image_size)])(x)


def _config(size: int, resize: int, channels: int) -> AugmentConfig:
    stats = {"mean": (0.5,) * channels, "std": (0.25,) * channels}
    return AugmentConfig(image_size=size, eval_resize=resize, channels=channels, **stats)


@pytest.mark.parametrize(("size", "resize", "channels"), [(28, 0, 1), (32, 0, 1), (32, 36, 3), (96, 110, 3),
                                                          (224, 256, 3), (32, 28, 1)])
def test_the_evaluation_view_is_torchvisions_pixel_for_pixel(size: int, resize: int, channels: int) -> None:
    cfg = _config(size, resize, channels)
    transform = EvalTransform(cfg)
    rng = np.random.default_rng(size + resize)
    for h, w in SHAPES:
        for c in (1, 3, 4):
            image = rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)
            ours = transform(image)
            assert ours.shape == (channels, size, size) and ours.dtype == torch.uint8
            torch.testing.assert_close(ours, _torchvision_view(image, cfg), rtol=0, atol=0,
                                       msg=f"{h}x{w}x{c} -> {size} (resize {resize}, {channels} channel(s))")
    batch = eval_batch(transform, [rng.integers(0, 256, size=(30, 20), dtype=np.uint8)] * 2)
    assert batch.shape == (2, channels, size, size)


def test_luminance_is_torchvisions() -> None:
    image = np.random.default_rng(1).integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    expected = TF.rgb_to_grayscale(torch.from_numpy(image).permute(2, 0, 1), num_output_channels=1)
    torch.testing.assert_close(image_to_tensor(image, 1), expected, rtol=0, atol=0)


def test_the_evaluation_and_inference_stages_import_no_torchvision() -> None:
    code = ("import sys, numpy as np\n"
            "import pipelines.dataset.stream_stages as st, pipelines.outputs.assigner, pipelines.dataset.decode\n"
            "from secu.config import AugmentConfig\n"
            "from dataclasses import asdict; import json\n"
            "cfg = json.dumps(asdict(AugmentConfig(image_size=32, channels=1, mean=(0.5,), std=(0.25,))))\n"
            "batch = {'image': np.empty(2, dtype=object), 'sample_index': np.arange(2), 'key': np.array(['a', 'b']),\n"
            "         'shard': np.array(['s', 's']), 'label': np.arange(2), 'source': np.array(['x', 'y'])}\n"
            "batch['image'][:] = [np.zeros((28, 28), np.uint8), np.ones((40, 30), np.uint8)]\n"
            "out = st.eval_transform(batch, cfg_json=cfg)\n"
            "assert out['image'].shape == (2, 1, 32, 32), out['image'].shape\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision' or m == 'torch._dynamo'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    check = code.replace("out = st.eval_transform", "st._two_views(cfg)\nout = st.eval_transform")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert "torchvision" in result.stdout  # the training stages do import it: the check can fail
