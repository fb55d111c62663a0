"""The decode-only training stream (``augment.views_on_device``): its stage and the worker's view making,
without Ray."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from pipelines.dataset.stream_stages import decoded_for_device
from pipelines.dataset.streams import DECODED_COLUMNS, build_train_dataset, device_views, step_seed
from secu.config import AugmentConfig

CFG = AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.5,))


def _batch(shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = np.empty(len(shapes), dtype=object)
    for i, shape in enumerate(shapes):
        images[i] = rng.integers(0, 256, shape, dtype=np.uint8)
    return {"image": images, "sample_index": np.arange(10, 10 + len(shapes)), "key": np.array(["k"] * len(shapes))}


def test_stage_makes_fixed_size_canvases_of_mixed_images() -> None:
    out = decoded_for_device(_batch([(28, 28), (20, 36, 3), (300, 200)]), cfg_json=json.dumps(asdict(CFG)))
    assert tuple(out) == DECODED_COLUMNS
    assert out["canvas"].shape == (3, 1, 32, 32) and out["canvas"].dtype == np.uint8  # R = ceil(28 * 8 / 7)
    assert out["height"].tolist() == [28, 20, 32] and out["width"].tolist() == [28, 32, 32]
    assert out["sample_index"].tolist() == [10, 11, 12]
    empty = decoded_for_device({"image": np.empty(0, dtype=object), "sample_index": np.zeros(0, dtype=np.int64)},
                               cfg_json=json.dumps(asdict(CFG)))
    assert empty["canvas"].shape == (0, 1, 32, 32)


def test_worker_views_are_seeded_per_rank_epoch_and_step() -> None:
    stage = decoded_for_device(_batch([(28, 28)] * 8), cfg_json=json.dumps(asdict(CFG)))
    batch = {k: torch.from_numpy(v) for k, v in stage.items()}

    def views(rank: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        return list(device_views([batch, batch], CFG, seed=0, rank=rank, epoch=epoch, device="cpu"))

    first, again = views(0, 0), views(0, 0)
    assert set(first[0]) == {"view1", "view2", "sample_index"}
    assert first[0]["view1"].shape == (8, 1, 28, 28) and first[0]["view1"].dtype == torch.uint8
    assert torch.equal(first[0]["sample_index"], batch["sample_index"])
    assert torch.equal(first[1]["view2"], again[1]["view2"])  # reproducible
    assert not torch.equal(first[0]["view1"], first[1]["view1"])  # another step
    assert not torch.equal(first[0]["view1"], views(1, 0)[0]["view1"])  # another rank
    assert not torch.equal(first[0]["view1"], views(0, 1)[0]["view1"])  # another epoch
    seeds = {step_seed(s, r, e, t) for s in range(2) for r in range(2) for e in range(2) for t in range(2)}
    assert len(seeds) == 16 and all(0 <= x < 2**62 for x in seeds)


def test_weak_view_with_views_on_device_is_refused() -> None:
    with pytest.raises(ValueError, match="views_on_device does not support a weak view"):
        build_train_dataset(None, "any", CFG, seed=0, weak=CFG, views_on_device=True)  # type: ignore[arg-type]
