"""Reading committed WebDataset shards for Ray Data, keeping every whole sample before a damaged spot.

``ShardDatasource`` is what the streams read (``pipelines.dataset.streams``) in place of
``ray.data.read_webdataset``: the same rows (``__key__``, ``__url__``, the image member under ``IMAGE_FIELD``
and ``json``, raw bytes, one row per sample key), but a tar that is cut short or damaged does not fail its
read task, which would drop the whole shard, intact samples too. ``ShardSamples`` reads the members in order
with Python's ``tarfile`` in stream mode and stops at the first damage (a member whose data ends early, a
header that does not parse); the samples before it are yielded, and the sample being read when the damage
came is kept only when both its image and its json arrived whole. The samples that did not come, the
shard's count in ``dataset.json`` minus those read, are reported once per shard to the ``BadInputCounter``
(``cut_shard``) under the reason the stream chose (``truncated_shard`` when the file is shorter than
ingest wrote it, ``damaged_shard`` otherwise), before the shard's last block is yielded, so that
``verify_epoch`` at the epoch's end finds them counted and not lost.

Row shuffle (``RowShuffle``, the training streams): the file shuffle only changes the order of the shards, so
without more every training batch would hold the same consecutive samples every epoch (a fixed partition of
the collection into batches, which one process with a fresh permutation per epoch does not have). With a
``RowShuffle`` each read task permutes its shard's samples in windows of up to ``window_rows`` samples and
``window_bytes`` of encoded images (the whole shard at the default shard size and small images), seeded by
the seed, Ray Data's execution index (one per epoch) and the shard's name: another order every epoch, the
same one when Ray retries the task (its retry replays the task and skips the blocks already delivered).

Storage errors (``OSError`` from the filesystem: a dropped connection, a missing object) are not tar damage:
they propagate, Ray Data retries them, and a read task that still fails loses its shard as before
(``lost`` in ``pipelines.dataset.bad_input``).
"""

from __future__ import annotations

import copy
import logging
import os
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from pipelines.dataset.decode import IMAGE_FIELD, rename_member

logger = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema([("__key__", pa.string()), ("__url__", pa.string()), (IMAGE_FIELD, pa.large_binary()),
                        ("json", pa.large_binary())])
"""Columns of a read block (``large_binary``: a block of big images can pass 2 GiB)."""
_BLOCK_ROWS = 512
_BLOCK_BYTES = 64 << 20


def _split_name(fname: str) -> tuple[str, str] | None:
    """``dir/s000001_0000002.img`` -> (``dir/s000001_0000002``, ``img``): key and suffix, as WebDataset splits."""
    slash = fname.rfind("/")
    dot = fname.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return fname[:dot], fname[dot + 1:]


class ShardSamples:
    """The samples of one tar, read in order up to the first damage (no Ray).

    Iterate it once; afterwards ``read`` holds the samples yielded and ``damage`` the reason reading stopped
    early (None when the tar ended cleanly).
    """

    def __init__(self, fileobj: IO[bytes], url: str, expected: int | None = None) -> None:
        self.fileobj, self.url, self.expected = fileobj, url, expected
        self.read = 0
        self.damage: str | None = None

    def _members(self) -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(fileobj=self.fileobj, mode="r|*") as stream:
                for info in stream:
                    if not info.isreg():
                        continue
                    handle = stream.extractfile(info)
                    assert handle is not None  # a regular file always has data
                    yield info.name, handle.read()
        except (tarfile.TarError, EOFError) as err:  # the tar's own damage; OSError (storage) propagates
            self.damage = f"{type(err).__name__}: {err}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        current: dict[str, Any] | None = None
        seen = 0
        for name, data in self._members():
            split = _split_name(rename_member(name))
            if split is None:
                continue
            key, suffix = split
            if current is None or current["__key__"] != key:
                if current is not None:
                    self.read += 1
                    yield current
                current = {"__key__": key, "__url__": self.url}
                seen += 1
            if suffix in (IMAGE_FIELD, "json"):
                current[suffix] = data
        if current is None:
            return
        short = self.damage is not None or (self.expected is not None and seen < self.expected)
        if short and self.damage is None:
            self.damage = f"the tar ends after {seen} of {self.expected} samples"
        if not short or (IMAGE_FIELD in current and "json" in current):
            self.read += 1
            yield current


def _block(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _image_size(sample: dict[str, Any]) -> int:
    return len(sample.get(IMAGE_FIELD) or b"")


def _blocks(rows: list[dict[str, Any]], rng: np.random.Generator | None) -> Iterator[pa.Table]:
    """``rows`` (permuted by ``rng`` when given) as blocks of at most ``_BLOCK_ROWS`` rows and about
    ``_BLOCK_BYTES`` of images."""
    if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    start, size = 0, 0
    for i, row in enumerate(rows):
        size += _image_size(row)
        if i + 1 - start >= _BLOCK_ROWS or size >= _BLOCK_BYTES:
            yield _block(rows[start:i + 1])
            start, size = i + 1, 0
    if start < len(rows):
        yield _block(rows[start:])


@dataclass(frozen=True)
class RowShuffle:
    """Shuffle each shard's samples inside its read task, another order every epoch (module doc)."""

    seed: int
    window_rows: int = 10_000
    """At most this many samples are held and permuted together (the default shard size)."""
    window_bytes: int = 128 << 20
    """... and at most about this many bytes of encoded images (large images: smaller windows)."""

    def rng(self, execution: int, shard: str) -> np.random.Generator:
        """The generator of one shard's read in one execution (epoch): the same for a retry of the task."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, execution, zlib.crc32(shard.encode())])


class ShardDatasource(FileBasedDatasource):
    """Ray Data source over committed shards: ``ShardSamples`` per file, losses reported to the counter."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], *, counts: Mapping[str, int], reasons: Mapping[str, str],
                 counter: Any, row_shuffle: RowShuffle | None = None, **file_based_kwargs: Any) -> None:
        """
        Args:
            paths: Filesystem paths of the shards.
            counts: Samples of each shard (by file name) in ``dataset.json``.
            reasons: The reason to count a short shard under, by file name (default ``damaged_shard``).
            counter: The ``BadInputCounter`` actor (None: losses are only logged).
            row_shuffle: Permute each shard's samples per epoch (None: in shard order, as evaluation reads).
            file_based_kwargs: ``filesystem``, ``shuffle``, ... of ``FileBasedDatasource``.
        """
        super().__init__(paths, file_extensions=["tar"], **file_based_kwargs)
        self._counts, self._reasons, self._counter = dict(counts), dict(reasons), counter
        self._row_shuffle = row_shuffle
        self._execution = 0

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        # Ray Data plans every execution (epoch) anew and counts them in the context (its own file shuffle reseeds
        # from the same index). The read tasks capture the datasource, so each execution's tasks get a copy that
        # knows its index, and tasks of an epoch still running never see the next one's.
        planned = copy.copy(self)
        planned._execution = int(getattr(data_context, "_execution_idx", 0) or 0)
        return FileBasedDatasource.get_read_tasks(planned, parallelism, per_task_row_limit=per_task_row_limit,
                                                  data_context=data_context)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        shard = os.path.basename(path)
        samples = ShardSamples(f, path, self._counts.get(shard))
        shuffle = self._row_shuffle
        rng = None if shuffle is None else shuffle.rng(self._execution, shard)
        max_rows = _BLOCK_ROWS if shuffle is None else shuffle.window_rows
        max_bytes = _BLOCK_BYTES if shuffle is None else shuffle.window_bytes
        rows: list[dict[str, Any]] = []
        size = 0
        for sample in samples:
            rows.append(sample)
            size += _image_size(sample)
            if len(rows) >= max_rows or size >= max_bytes:
                yield from _blocks(rows, rng)
                rows, size = [], 0
        if samples.damage is not None:
            expected = self._counts.get(shard, samples.read)
            missing = max(0, expected - samples.read)
            reason = self._reasons.get(shard, "damaged_shard")
            logger.warning("shard %s is damaged (%s): its first %d samples are read, %d counted as %s", shard,
                           samples.damage, samples.read, missing, reason)
            if self._counter is not None and missing:
                ray.get(self._counter.cut_shard.remote(shard, reason, missing, samples.damage))
        if rows:
            yield from _blocks(rows, rng)
