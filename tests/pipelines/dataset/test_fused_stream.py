"""Decode and the transforms inside the read tasks (``fuses_read``): the same rows as the separate stages, one
Ray Data operator when there is a shard per CPU, and the slicing of a read block into stage batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.dataset.bad_input import BadInputPolicy
from pipelines.dataset.ingest import IngestOptions, ingest
from pipelines.dataset.sources import open_source
from pipelines.dataset.stream_stages import DECODE_BATCH, decode_and_transform
from pipelines.dataset.streams import build_eval_dataset, build_train_dataset, fuses_read, plan_dataset
from pipelines.storage import Storage
from secu.config import AugmentConfig
from tests.fixtures import write_idx_dataset

AUG = AugmentConfig(image_size=16, channels=1, mean=(0.5,), std=(0.5,))
N = 30


def _store(tmp_path: Path, name: str, shard_size: int) -> Storage:
    """The same N images, ingested as shards of ``shard_size``."""
    if not (tmp_path / "fm").exists():
        write_idx_dataset(tmp_path / "fm", N, 1)
    st = Storage(str(tmp_path / name))
    ingest(st, "fm", open_source(f"idx:{tmp_path / 'fm'}"), IngestOptions(shard_size=shard_size, use_ray=False))
    return st


def _operators(ds: Any) -> str:
    return str(ds.stats())


def test_a_block_is_sliced_into_stage_batches_in_order() -> None:
    seen: list[int] = []

    def count(batch: dict[str, np.ndarray], *, add: int) -> dict[str, np.ndarray]:
        seen.append(len(batch["x"]))
        return {"x": batch["x"] + add}

    rows = 2 * DECODE_BATCH + 7
    out = list(decode_and_transform({"x": np.arange(rows)}, stages=((count, {"add": 1}), (count, {"add": 10}))))
    assert seen == [DECODE_BATCH, DECODE_BATCH, DECODE_BATCH, DECODE_BATCH, 7, 7]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in out]), np.arange(rows) + 11)
    assert list(decode_and_transform({}, stages=((count, {"add": 1}),))) == []


@pytest.mark.ray
def test_fused_and_separate_stages_give_the_same_rows(tmp_path: Path, ray_cluster: None) -> None:
    fused_st, split_st = _store(tmp_path, "fused", 10), _store(tmp_path, "split", N)  # 3 shards / 1 shard, 2 CPUs
    policy = BadInputPolicy()
    assert fuses_read(plan_dataset(fused_st, "fm", policy, None))
    assert not fuses_read(plan_dataset(split_st, "fm", policy, None))

    fused, split = build_eval_dataset(fused_st, "fm", AUG), build_eval_dataset(split_st, "fm", AUG)
    rows_f = {r["sample_index"]: r for r in fused.iter_rows()}
    rows_s = {r["sample_index"]: r for r in split.iter_rows()}
    assert sorted(rows_f) == sorted(rows_s) == list(range(N))
    for i in range(N):
        np.testing.assert_array_equal(rows_f[i]["image"], rows_s[i]["image"])
        assert rows_f[i]["label"] == rows_s[i]["label"]  # (keys name the shard, so they differ)
    assert "ReadShard->MapBatches(decode_and_transform)" in _operators(fused)
    assert "MapBatches(decode)->MapBatches(eval_transform)" in _operators(split)
    assert "ReadShard->" not in _operators(split)

    train = build_train_dataset(fused_st, "fm", AUG, seed=1)
    for _ in range(2):
        batches = list(train.iter_batches(batch_size=8))
        ids = np.concatenate([b["sample_index"] for b in batches])
        assert sorted(ids.tolist()) == list(range(N))
        assert all(b["view1"].shape[1:] == (1, 16, 16) and b["view1"].dtype == np.uint8 for b in batches)
    assert "ReadShard->MapBatches(decode_and_transform)" in _operators(train)
