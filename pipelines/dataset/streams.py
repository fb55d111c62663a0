"""Streaming Ray Data datasets over ingested WebDataset shards: training (two views) and evaluation.

Pipeline (nothing is materialised; each epoch re-reads the shards):

```
ShardDatasource(committed shards, explicit pyarrow fs, raw bytes, file order shuffled per epoch, and
                for training each shard's rows too (RowShuffle), one read task per shard)
  -> "decode"             bytes -> uint8 H x W x C (channels of AugmentConfig), bad input counted
  -> "augment_two_views"  view1, view2 (uint8 B x C x S x S), sample_index (int64)   [training]
  -> "decoded_for_device" canvas (uint8 B x C x R x R), height, width, sample_index
                          [training, views on the device: the worker's device_views makes
                           view1, view2 from each batch]
  -> "eval_transform"     image (uint8 C x S x S), sample_index, key, shard, label  [evaluation]
```

The stages (``pipelines.dataset.stream_stages``) run in batches of ``DECODE_BATCH`` rows. With at least one
shard per CPU of the cluster (``fuses_read``), decode and the last stage run inside the read tasks
(``decode_and_transform``, one Ray Data operator: the encoded bytes never pass through the object store
and there is no second round of tasks per block); with fewer shards the read's output is split into blocks
of ~ROWS_PER_BLOCK rows and the two stages are ``map_batches`` stages that Ray fuses with each other, so
several tasks share one shard's decoding. Either way decoded (variable-size) pixels never enter the object
store; only the encoded bytes (unfused) and the fixed-size uint8 views do. Decoding (the
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
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
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
from pipelines.dataset.stream_stages import (
    DECODE_BATCH,
    Stage,
    augment_two_views,
    decode_and_transform,
    decoded_for_device,
    eval_transform,
    train_images,
)
from pipelines.storage import Storage, join
from secu.batch_augment import BatchTwoViewAugment
from secu.config import AugmentConfig

logger = logging.getLogger(__name__)

ROWS_PER_BLOCK = 1024
"""Read output is split into blocks of about this many rows, so that decode + augment run as many small
tasks (the first batch arrives after ~1,000 images, not after a whole 10,000-image shard)."""
TRAIN_COLUMNS = ("view1", "view2", "sample_index")
DECODED_COLUMNS = ("canvas", "height", "width", "sample_index")

__all__ = [
    "BadInputPolicy",
    "DatasetPlan",
    "build_eval_dataset",
    "build_train_dataset",
    "device_views",
    "plan_dataset",
]


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


def fuses_read(plan: DatasetPlan) -> bool:
    """Whether the stream runs decode and the transforms inside the read tasks (one Ray Data operator):
    when the dataset has at least one shard per CPU of the cluster, so one task per shard keeps every
    core busy. Fewer shards keep the read apart and split its output, so that several tasks share the
    decoding of one shard."""
    return len(plan.paths) >= max(1, int(ray.cluster_resources().get("CPU", 1)))


def _stream(storage: Storage, plan: DatasetPlan, channels: int, policy: BadInputPolicy,
            shuffle: FileShuffleConfig | None, rows: RowShuffle | None, after: Sequence[Stage]) -> ray.data.Dataset:
    """Read -> ``decode`` -> the stages ``after``, fused into the read tasks or not (:func:`fuses_read`)."""
    fused = fuses_read(plan)
    # One read task per shard either way (a failing shard loses only itself). Unfused, override_num_blocks =
    # shards x split also splits each task's output into `split` blocks (Ray's SplitBlocks), which Ray then
    # never fuses with what follows.
    largest = max(s.count for s in plan.info.shards)
    split = 1 if fused else max(1, math.ceil(largest / ROWS_PER_BLOCK))
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
    decoding: Stage = (decode, {"channels": channels, "policy": policy, "shard_first": plan.shard_first,
                                "counter": plan.counter})
    # casts: Ray types a UDF's batch as a union of formats; these stages take the numpy format they ask for.
    if fused:
        # Ray fuses a map into the read only when it takes whole blocks (batch_size=None); decode_and_transform
        # slices the block itself.
        return ds.map_batches(cast(Any, decode_and_transform), batch_size=None, batch_format="numpy",
                              fn_kwargs={"stages": (decoding, *after)})
    for fn, kwargs in (decoding, *after):
        ds = ds.map_batches(cast(Any, fn), batch_size=DECODE_BATCH, batch_format="numpy", fn_kwargs=kwargs)
    return ds


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
    cfg_json = json.dumps(asdict(augment))
    last: Stage
    if not views:
        last = (train_images, {"cfg_json": cfg_json})
    elif views_on_device:
        last = (decoded_for_device, {"cfg_json": cfg_json})
    else:
        last = (augment_two_views, {"cfg_json": cfg_json, "seed": seed,
                                    "weak_json": None if weak is None else json.dumps(asdict(weak))})
    return _stream(storage, plan, augment.channels, policy,
                   FileShuffleConfig(seed=seed, reseed_after_execution=True), RowShuffle(seed), (last,))


def build_eval_dataset(storage: Storage, dataset: str, augment: AugmentConfig, *,
                       policy: BadInputPolicy | None = None, counter: Any | None = None,
                       shards: Collection[str] | None = None, then: Stage | None = None) -> ray.data.Dataset:
    """The evaluation stream: ``image`` (uint8 C x S x S, deterministic), ``sample_index``, ``key``,
    ``shard``, ``label`` (int64, -1 when unknown). Shards (all, or those named in ``shards``) are read in
    order (no shuffle). ``then``: one more stage in the same tasks (batch inference's model on CPUs), whose
    output the stream then carries instead."""
    policy = policy or BadInputPolicy()
    plan = plan_dataset(storage, dataset, policy, counter, shards)
    transform: Stage = (eval_transform, {"cfg_json": json.dumps(asdict(augment))})
    return _stream(storage, plan, augment.channels, policy, None, None,
                   (transform,) if then is None else (transform, then))
