"""Per-epoch shuffle of the samples inside each shard (``RowShuffle``): the training stream's batches are a new
draw every epoch, the evaluation stream keeps shard order, and a retried read gives the same order."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipelines.dataset.shard_reader import RowShuffle, ShardDatasource
from pipelines.dataset.shards import write_tar
from pipelines.dataset.streams import build_eval_dataset, build_train_dataset
from pipelines.storage import Storage
from secu.config import AugmentConfig
from tests.fixtures import image_bytes
from tests.pipelines.dataset.test_data import _fm_dataset

AUG = AugmentConfig(image_size=16, channels=1, mean=(0.5,), std=(0.5,))
N = 40


def _tar(path: Path, n: int = N) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, [(f"s000000_{p:07d}", "png", image_bytes("L", size=(8, 8), seed=p), {"sample_index": p})
                    for p in range(n)])
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _order(source: ShardDatasource, data: bytes, execution: int = 0) -> list[int]:
    source._execution = execution
    tables = list(source._read_stream(io.BytesIO(data), "/x/shard-000000.tar"))  # type: ignore[arg-type]
    return [int(k.rsplit("_", 1)[1]) for k in pa.concat_tables(tables).column("__key__").to_pylist()]


def _source(path: Path, shuffle: RowShuffle | None) -> ShardDatasource:
    return ShardDatasource([str(path)], counts={path.name: N}, reasons={}, counter=None, row_shuffle=shuffle)


def test_read_task_permutes_its_shard_anew_each_execution_and_alike_on_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    data = _tar(path)
    assert _order(_source(path, None), data) == list(range(N))  # evaluation: shard order
    source = _source(path, RowShuffle(seed=7))
    first, again, next_epoch = _order(source, data, 0), _order(source, data, 0), _order(source, data, 1)
    assert sorted(first) == sorted(next_epoch) == list(range(N))
    assert first != list(range(N)) and next_epoch != first
    assert again == first  # Ray's retry replays the task and skips the blocks already delivered
    assert _order(_source(path, RowShuffle(seed=8)), data, 0) != first


def test_windows_bound_what_a_read_task_holds(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    data = _tar(path)
    order = _order(_source(path, RowShuffle(seed=0, window_rows=8)), data)
    windows = [order[i:i + 8] for i in range(0, N, 8)]
    assert [sorted(w) for w in windows] == [list(range(i, i + 8)) for i in range(0, N, 8)]
    assert order != list(range(N))
    by_bytes = _order(_source(path, RowShuffle(seed=0, window_bytes=1)), data)  # every image fills a window
    assert by_bytes == list(range(N))


def test_a_cut_shard_still_gives_its_whole_samples_shuffled(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    data = _tar(path)
    order = _order(_source(path, RowShuffle(seed=3)), data[:len(data) // 2])
    assert 0 < len(order) < N and sorted(order) == list(range(len(order)))


def _batches(ds: Any, size: int) -> list[frozenset[int]]:
    return [frozenset(b["sample_index"].tolist()) for b in ds.iter_batches(batch_size=size)]


@pytest.mark.ray
def test_training_batches_are_a_new_draw_every_epoch(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    _fm_dataset(tmp_path, st, n=48, shard_size=24)
    ds = build_train_dataset(st, "fm", AUG, seed=0)
    epochs = [_batches(ds, 8) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(48))
    assert len({frozenset(batches) for batches in epochs}) == 3  # not the same partition into batches
    consecutive = {frozenset(range(i, i + 8)) for i in range(0, 48, 8)}
    assert not all(set(batches) <= consecutive for batches in epochs)
    evaluation = np.concatenate([b["sample_index"] for b in build_eval_dataset(st, "fm", AUG).iter_batches()])
    assert evaluation.tolist() == list(range(48))
