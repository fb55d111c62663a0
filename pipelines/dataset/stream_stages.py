"""The per-batch stages of the Ray Data streams (``dict[str, np.ndarray] -> dict[str, np.ndarray]``).

``pipelines.dataset.streams`` chains them after ``decode`` (``pipelines.dataset.decode``): as separate
``map_batches`` stages of ``DECODE_BATCH`` rows, or, when the dataset has a read task for every CPU, as one
stage (:func:`decode_and_transform`) that Ray Data fuses into the read task itself, so encoded bytes never
pass through the object store between the read and the decode.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from secu.config import AugmentConfig
from secu.eval_transform import EvalTransform, eval_batch

if TYPE_CHECKING:
    from secu.batch_augment import BatchTwoViewAugment

DECODE_BATCH = 256
"""Rows per call of each stage (decode, augment, transform)."""
EVAL_COLUMNS = ("image", "sample_index", "key", "shard", "label", "source")

Stage = tuple[Callable[..., Any], dict[str, Any]]
"""A stage function and its keyword arguments: a batch (dict of numpy columns) in, a batch out (the last stage
of a stream may return an Arrow table instead, as batch inference's model does)."""


def decode_and_transform(block: dict[str, np.ndarray], *, stages: Sequence[Stage]) -> Iterator[dict[str, np.ndarray]]:
    """All ``stages`` (``decode`` first) over a whole read block, ``DECODE_BATCH`` rows at a time: one batch
    of output per slice, so a large block never holds more than one slice of decoded pixels."""
    rows = len(next(iter(block.values()))) if block else 0
    for start in range(0, rows, DECODE_BATCH):
        batch = {name: column[start:start + DECODE_BATCH] for name, column in block.items()}
        for fn, kwargs in stages:
            batch = fn(batch, **kwargs)
        yield batch




@lru_cache(maxsize=4)
def _two_views(cfg_json: str) -> BatchTwoViewAugment:
    # secu.batch_augment imports torchvision (and torch._dynamo with it): only the training stages need it, so
    # the evaluation stream's processes (inference) import it never.
    from secu.batch_augment import BatchTwoViewAugment

    return BatchTwoViewAugment(AugmentConfig(**json.loads(cfg_json)))


@lru_cache(maxsize=4)
def _eval_transform(cfg_json: str) -> EvalTransform:
    return EvalTransform(AugmentConfig(**json.loads(cfg_json)))


@lru_cache(maxsize=4)
def _augment_config(cfg_json: str) -> AugmentConfig:
    return AugmentConfig(**json.loads(cfg_json))


@lru_cache(maxsize=1)
def _process_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, os.getpid(), time.time_ns() & 0xFFFFFFFF])


def _empty_views(cfg: AugmentConfig) -> np.ndarray:
    return np.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)


def augment_two_views(batch: dict[str, np.ndarray], *, cfg_json: str, seed: int,
                      weak_json: str | None = None) -> dict[str, np.ndarray]:
    """Stage ``augment_two_views``: ``image`` -> ``view1``, ``view2`` (uint8 B x C x S x S), ``sample_index``
    (the only columns left, so training iterates over tensors only). With ``weak_json`` (self-labeling),
    ``view1`` is the first view of that weak augmentation and ``view2`` the second view of ``cfg_json``'s."""
    aug = _two_views(cfg_json)
    images = list(batch["image"])
    if not images:
        return {"view1": _empty_views(aug.cfg), "view2": _empty_views(aug.cfg),
                "sample_index": np.zeros(0, dtype=np.int64)}
    batch_seed = int(_process_rng(seed).integers(0, 2**62))
    view1, view2 = aug(images, seed=batch_seed)
    if weak_json is not None:
        view1, _ = _two_views(weak_json)(images, seed=batch_seed + 1)
    return {"view1": view1, "view2": view2, "sample_index": np.asarray(batch["sample_index"], dtype=np.int64)}


def eval_transform(batch: dict[str, np.ndarray], *, cfg_json: str) -> dict[str, np.ndarray]:
    """Stage ``eval_transform``: ``image`` -> deterministic uint8 C x S x S; ids, key, shard, label and source
    (the image's original path or URI, from the shard's json) kept."""
    transform = _eval_transform(cfg_json)
    images = list(batch["image"])
    out = {name: np.asarray(batch[name]) for name in EVAL_COLUMNS[1:]}
    out["image"] = eval_batch(transform, images) if images else _empty_views(transform.cfg)
    return out


def train_images(batch: dict[str, np.ndarray], *, cfg_json: str) -> dict[str, np.ndarray]:
    """Stage ``train_images`` (methods that train on no views, PFCA): ``image`` -> the deterministic uint8
    C x S x S of the evaluation transform and ``sample_index``, the only columns left."""
    transform = _eval_transform(cfg_json)
    images = list(batch["image"])
    return {"image": eval_batch(transform, images) if images else _empty_views(transform.cfg),
            "sample_index": np.asarray(batch["sample_index"], dtype=np.int64)}


def decoded_for_device(batch: dict[str, np.ndarray], *, cfg_json: str) -> dict[str, np.ndarray]:
    """Stage ``decoded_for_device`` (views on the device): ``image`` -> ``canvas`` (uint8 B x C x R x R,
    ``secu.batch_augment.to_canvas``), ``height`` and ``width`` (int64, the image inside the canvas) and
    ``sample_index``, the only columns left."""
    from secu.batch_augment import canvas_side, to_canvas

    cfg = _augment_config(cfg_json)
    side = canvas_side(cfg.image_size)
    images = list(batch["image"])
    made = [to_canvas(image, cfg.channels, side) for image in images]
    canvas = (np.stack([c for c, _, _ in made]) if made
              else np.zeros((0, cfg.channels, side, side), dtype=np.uint8))
    return {"canvas": canvas, "height": np.array([h for _, h, _ in made], dtype=np.int64),
            "width": np.array([w for _, _, w in made], dtype=np.int64),
            "sample_index": np.asarray(batch["sample_index"], dtype=np.int64)}
