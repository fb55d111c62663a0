"""Streaming Ray Data datasets over ingested WebDataset shards: training (two views) and evaluation.

Pipeline (nothing is materialised; each epoch re-reads the shards):

```
ShardDatasource(committed shards, explicit pyarrow fs, raw bytes, file order shuffled per epoch, and
                for training each shard's rows too (RowShuffle), one read task per shard, its output
                split into blocks of ~ROWS_PER_BLOCK rows)
  -> map_batches "decode"             bytes -> uint8 H x W x C (channels of AugmentConfig), bad input counted
  -> map_batches "augment_two_views"  view1, view2 (uint8 B x C x S x S), sample_index (int64)   [training]
  -> map_batches "decoded_for_device" canvas (uint8 B x C x R x R), height, width, sample_index
                                      [training, views on the device: the worker's device_views makes
                                       view1, view2 from each batch]
  -> map_batches "eval_transform"     image (uint8 C x S x S), sample_index, key, shard, label  [evaluation]
```

The two map stages fuse into one Ray Data operator, so decoded (variable-size) pixels never enter
the object store; only the compact encoded bytes and the fixed-size uint8 views do. Decoding (the
``decode`` stage, and how every PIL mode becomes uint8 pixels) is ``pipelines.dataset.decode``'s.

Only shards listed in ``dataset.json`` are read (uncommitted shards of a failed ingest are ignored).
``pipelines.dataset.shard_reader`` reads them (WebDataset rows, as ``ray.data.read_webdataset`` gives) and
keeps the whole samples before a damaged spot of a shard; shards that are gone or larger than ingest wrote
them are left out before reading (``pipelines.dataset.bad_input`` has the whole bad-input policy).

Randomness: the shard order of each epoch comes from ``FileShuffleConfig(seed,
reseed_after_execution=True)`` (reproducible per epoch, different between epochs), and the order of the
samples inside each shard from ``RowShuffle(seed)`` (``pipelines.dataset.shard_reader``), so that a training
batch is a new draw every epoch, not the same run of consecutive samples. Augmentation
draws are seeded per batch from a per-process generator (seeded from ``seed``, the process id and the
clock): torch's global generator starts from the same constant in every worker process, which would
give every worker the same views. Views are therefore not reproducible run to run.

Views on the device (``AugmentConfig.views_on_device``): the training stream ends with
``decoded_for_device`` (fixed-size canvases, ``secu.batch_augment.to_canvas``; R = ceil(S * 8 / 7)), and
every training worker turns each batch into both views on its device with :func:`device_views`
(``BatchTwoViewAugment.views_of_canvas``), seeded by the experiment's seed, the rank, the epoch and the
step: the same batch on the same rank and step gets the same views in every run. What reaches a
worker is then R^2 C bytes per image instead of 2 S^2 C (0.65x at 224 px) and the stream's CPUs only
read and decode.

Consumers: ``streaming_split(n, equal=False)`` hands every row to exactly one consumer per epoch;
``equal=True`` (what Ray Train's ``DataConfig`` uses for split datasets) makes the splits the same
length and may drop up to ``n - 1`` rows per epoch (different rows each epoch because of the file
shuffle), which a training loop with ``drop_last=True`` batches loses anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, cast

import numpy as np
import ray
import ray.data
import torch
from ray.data import FileShuffleConfig

from pipelines.dataset.bad_input import BadInputError, BadInputPolicy, new_bad_input_counter
from pipelines.dataset.decode import decode
from pipelines.dataset.info import DatasetInfo, ShardInfo, dataset_dir, load_dataset_info
from pipelines.dataset.shard_reader import RowShuffle, ShardDatasource
from pipelines.storage import Storage, join
from secu.augment import EvalTransform, eval_batch
from secu.batch_augment import BatchTwoViewAugment, canvas_side, to_canvas
from secu.config import AugmentConfig

logger = logging.getLogger(__name__)

DECODE_BATCH = 256
ROWS_PER_BLOCK = 1024
"""Read output is split into blocks of about this many rows, so that decode + augment run as many small
tasks (the first batch arrives after ~1,000 images, not after a whole 10,000-image shard)."""
TRAIN_COLUMNS = ("view1", "view2", "sample_index")
EVAL_COLUMNS = ("image", "sample_index", "key", "shard", "label", "source")
DECODED_COLUMNS = ("canvas", "height", "width", "sample_index")

__all__ = [
    "BadInputPolicy",
    "DatasetPlan",
    "build_eval_dataset",
    "build_train_dataset",
    "device_views",
    "plan_dataset",
]


# ---------------------------------------------------------------------------------------------
# Ray Data stages (dict[str, np.ndarray] -> dict[str, np.ndarray])
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _two_views(cfg_json: str) -> BatchTwoViewAugment:
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
    cfg = _augment_config(cfg_json)
    side = canvas_side(cfg.image_size)
    images = list(batch["image"])
    made = [to_canvas(image, cfg.channels, side) for image in images]
    canvas = (np.stack([c for c, _, _ in made]) if made
              else np.zeros((0, cfg.channels, side, side), dtype=np.uint8))
    return {"canvas": canvas, "height": np.array([h for _, h, _ in made], dtype=np.int64),
            "width": np.array([w for _, _, w in made], dtype=np.int64),
            "sample_index": np.asarray(batch["sample_index"], dtype=np.int64)}


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The views' seed of one batch of ``device_views`` (62 bits, from all four numbers)."""
    words = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 30) ^ int(words[1])


def device_views(batches: Iterable[dict[str, torch.Tensor]], augment: AugmentConfig, *, seed: int, rank: int,
                 epoch: int, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
    """The training worker's side of views on the device: every batch of the ``decoded_for_device`` stream
    (``iter_torch_batches`` on the CPU) as ``view1``, ``view2`` (uint8 B x C x S x S on ``device``) and
    ``sample_index``, seeded per (``seed``, ``rank``, ``epoch``, step) by :func:`step_seed`."""
    aug = BatchTwoViewAugment(augment, batched=True)
    for step, batch in enumerate(batches):
        canvas = batch["canvas"].to(device, non_blocking=True)
        view1, view2 = aug.views_of_canvas(canvas, batch["height"], batch["width"],
                                           seed=step_seed(seed, rank, epoch, step))
        yield {"view1": view1, "view2": view2, "sample_index": batch["sample_index"]}


# ---------------------------------------------------------------------------------------------
# Building datasets
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetPlan:
    """What a dataset build reads, after the shard check."""

    info: DatasetInfo
    paths: list[str]
    """Filesystem paths (no scheme) of the shards to read."""
    shard_first: dict[str, int]
    """first sample_index of every shard (to recover ids from keys)."""
    excluded: dict[str, str]
    """Shards left out, with the reason."""
    counter: Any
    """The ``BadInputCounter`` actor handle."""
    max_errored_blocks: int
    """Read tasks (= shards) allowed to fail within the policy's budget."""
    truncated: list[str] = field(default_factory=list)
    """Shards smaller than ingest wrote them: read up to the cut (``truncated_shard``)."""


def selected_shards(info: DatasetInfo, shards: Collection[str] | None) -> list[ShardInfo]:
    """The committed shards named in ``shards`` (all of them for None), in dataset order.

    Raises:
        ValueError: A name is not a committed shard of the dataset, or the selection is empty.
    """
    if shards is None:
        return list(info.shards)
    wanted = set(shards)
    unknown = sorted(wanted - {s.name for s in info.shards})
    if unknown or not wanted:
        raise ValueError(f"dataset {info.name!r}: shards {unknown[:5] or '(none)'} are not committed shards of the "
                         f"dataset (it has {len(info.shards)}: {info.shards[0].name if info.shards else '-'} ...); "
                         "pass names listed in dataset.json")
    return [s for s in info.shards if s.name in wanted]


def plan_dataset(storage: Storage, dataset: str, policy: BadInputPolicy,
                 counter: Any | None = None, shards: Collection[str] | None = None) -> DatasetPlan:
    """Check the committed shards (all, or the ones named in ``shards``) against their recorded sizes and
    set up the bad-input counter (sized for the selected shards). Missing shards and shards larger than
    recorded are left out; smaller ones (cut short) are read up to the cut.

    Raises:
        FileNotFoundError: The dataset does not exist (the message names the ingest command).
        ValueError: ``shards`` names a shard the dataset does not have.
        BadInputError: Missing or changed shards alone exceed the policy's budget.
    """
    storage.check_reachable()
    info = load_dataset_info(storage, dataset)
    if info.num_samples == 0:
        raise ValueError(f"dataset {dataset!r} has no samples: ingest images first")
    chosen = selected_shards(info, shards)
    num_chosen = sum(s.count for s in chosen)
    if counter is None:
        counter = new_bad_input_counter(num_chosen, policy)
    present = {e.path: e.size for e in storage.list(join(dataset_dir(dataset), "shards"))}
    paths, excluded, truncated, lost = [], {}, [], 0
    for shard in chosen:
        size = present.get(shard.name)
        if size is None:
            excluded[shard.name] = "missing_shard"
        elif size > shard.bytes:
            excluded[shard.name] = "changed_shard"
            logger.warning("shard %s has %d bytes, %d were written at ingest: replaced since, left out (%d samples)",
                           shard.name, size, shard.bytes, shard.count)
        else:
            if size < shard.bytes:
                truncated.append(shard.name)
                logger.warning("shard %s has %d bytes, %d were written at ingest: its whole samples before the cut "
                               "are read, the rest counted (truncated_shard)", shard.name, size, shard.bytes)
            paths.append(storage.path(dataset_dir(dataset), "shards", shard.name))
            continue
        lost += shard.count
        ray.get(counter.exclude_shard.remote(shard.name, excluded[shard.name], shard.count))
    budget = policy.budget(num_chosen)
    if lost > budget or not paths:
        raise BadInputError(
            f"dataset {dataset!r}: shards {sorted(excluded)} are missing or changed since ingest ({lost} of "
            f"{num_chosen} samples, the policy allows {budget}); restore them or re-ingest the dataset"
        )
    largest = max(s.count for s in chosen)
    return DatasetPlan(info, paths, {s.name: s.first_index for s in info.shards}, excluded, counter,
                       max_errored_blocks=(budget - lost) // max(largest, 1), truncated=truncated)


def _read_and_decode(storage: Storage, plan: DatasetPlan, channels: int, policy: BadInputPolicy,
                     shuffle: FileShuffleConfig | None, rows: RowShuffle | None = None) -> ray.data.Dataset:
    # override_num_blocks = shards x split: Ray still runs exactly one read task per shard (a failing
    # shard loses only itself) and splits each task's output into `split` blocks (SplitBlocks).
    largest = max(s.count for s in plan.info.shards)
    split = max(1, math.ceil(largest / ROWS_PER_BLOCK))
    source = ShardDatasource(
        plan.paths,
        counts={s.name: s.count for s in plan.info.shards},
        reasons=dict.fromkeys(plan.truncated, "truncated_shard"),
        counter=plan.counter,
        filesystem=storage.filesystem,
        shuffle=shuffle,
        row_shuffle=rows,
    )
    ds = ray.data.read_datasource(source, override_num_blocks=len(plan.paths) * split)
    ds.context.max_errored_blocks = plan.max_errored_blocks
    # casts: Ray types a UDF's batch as a union of formats; these stages take the numpy format they ask for.
    return ds.map_batches(
        cast(Any, decode), batch_size=DECODE_BATCH, batch_format="numpy",
        fn_kwargs={"channels": channels, "policy": policy, "shard_first": plan.shard_first,
                   "counter": plan.counter},
    )


def build_train_dataset(storage: Storage, dataset: str, augment: AugmentConfig, *, seed: int,
                        policy: BadInputPolicy | None = None, counter: Any | None = None,
                        weak: AugmentConfig | None = None, views: bool = True,
                        views_on_device: bool = False) -> ray.data.Dataset:
    """The training stream: columns ``view1``, ``view2`` (uint8 B x C x S x S) and ``sample_index`` (int64);
    with ``views=False`` (a method whose ``batch_inputs`` is ``("image",)``) ``image`` instead of the views;
    with ``views_on_device=True`` (and views) the decode-only stream ``canvas``, ``height``, ``width``,
    ``sample_index`` (``decoded_for_device``), for the worker's :func:`device_views`.

    Args:
        storage: Where the dataset lives.
        dataset: Dataset name under ``<storage>/datasets``.
        augment: View settings (size, channels, probabilities).
        seed: Seeds the per-epoch shard and sample order (and the augmentation streams, see the module doc).
        policy: Bad-input policy (default ``BadInputPolicy()``).
        counter: A ``BadInputCounter`` to report into (to read its report or pass it to
            ``verify_epoch``); one is created when None.
        weak: Self-labeling: ``view1`` becomes a view of this weak augmentation (``augment_two_views``).
        views_on_device: End with ``decoded_for_device`` instead of the views (ignored with ``views=False``).

    Raises:
        ValueError: ``weak`` with ``views_on_device`` (self-labeling makes its views in the stream).
    """
    if weak is not None and views_on_device and views:
        raise ValueError("views_on_device does not support a weak view (self-labeling): build the stream with "
                         "views_on_device=False")
    policy = policy or BadInputPolicy()
    plan = plan_dataset(storage, dataset, policy, counter)
    ds = _read_and_decode(storage, plan, augment.channels, policy,
                          FileShuffleConfig(seed=seed, reseed_after_execution=True), RowShuffle(seed))
    cfg_json = json.dumps(asdict(augment))
    if not views:
        return ds.map_batches(cast(Any, train_images), batch_size=DECODE_BATCH, batch_format="numpy",
                              fn_kwargs={"cfg_json": cfg_json})
    if views_on_device:
        return ds.map_batches(cast(Any, decoded_for_device), batch_size=DECODE_BATCH, batch_format="numpy",
                              fn_kwargs={"cfg_json": cfg_json})
    return ds.map_batches(cast(Any, augment_two_views), batch_size=DECODE_BATCH, batch_format="numpy",
                          fn_kwargs={"cfg_json": cfg_json, "seed": seed,
                                     "weak_json": None if weak is None else json.dumps(asdict(weak))})


def build_eval_dataset(storage: Storage, dataset: str, augment: AugmentConfig, *,
                       policy: BadInputPolicy | None = None, counter: Any | None = None,
                       shards: Collection[str] | None = None) -> ray.data.Dataset:
    """The evaluation stream: ``image`` (uint8 C x S x S, deterministic), ``sample_index``, ``key``,
    ``shard``, ``label`` (int64, -1 when unknown). Shards (all, or those named in ``shards``) are read in
    order (no shuffle)."""
    policy = policy or BadInputPolicy()
    plan = plan_dataset(storage, dataset, policy, counter, shards)
    ds = _read_and_decode(storage, plan, augment.channels, policy, None)
    return ds.map_batches(cast(Any, eval_transform), batch_size=DECODE_BATCH, batch_format="numpy",
                          fn_kwargs={"cfg_json": json.dumps(asdict(augment))})
