"""Each image's source (its original path or URI) by ``sample_index``, read from the dataset's manifest.

Inference takes each row's ``source`` from the stream (the shard's ``<key>.json``); this lookup names the
sources of bad images in inference's error message, fills the column for outputs written before it existed
(schema version 1, ``read_assignments``) and serves callers with batches of their own (the plain-loop
benchmark).

Why from the manifest: ingest records the source of every sample once, in ``manifest.parquet`` (the same
string as in the shard's ``<key>.json``), and ``sample_index`` is dense, so row ``i`` of the sorted
manifest is sample ``i`` and the lookup is an array index. The lookup keeps the strings as two numpy
arrays (int64 offsets, UTF-8 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.dataset.info import DatasetInfo, load_dataset_info, read_manifest
from pipelines.storage import Storage


@dataclass(frozen=True)
class SourceLookup:
    """The ``source`` string of every sample of one dataset, indexed by ``sample_index``."""

    dataset: str
    offsets: np.ndarray
    """int64, ``num_samples + 1``: sample i's UTF-8 bytes are ``data[offsets[i]:offsets[i + 1]]``."""
    data: np.ndarray
    """uint8: the sources' UTF-8 bytes, one after another."""

    @classmethod
    def from_manifest(cls, manifest: pa.Table, dataset: str) -> SourceLookup:
        """The lookup of a manifest sorted by ``sample_index`` (as ``read_manifest`` returns it).

        Raises:
            ValueError: If the ids are not exactly 0..N-1 in order (a corrupt manifest).
        """
        ids = manifest["sample_index"].to_numpy()
        if not np.array_equal(ids, np.arange(ids.size)):
            raise ValueError(f"the manifest of dataset {dataset!r} does not hold sample_index 0..{ids.size - 1} "
                             "in order: the dataset is corrupt; re-ingest it into a new name")
        column = manifest["source"].combine_chunks().cast(pa.large_string())
        _, offsets_buf, data_buf = column.buffers()
        assert offsets_buf is not None
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[column.offset: column.offset + len(column) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        start, end = int(offsets[0]), int(offsets[-1])
        return cls(dataset, (offsets - start).copy(), data[start:end].copy())

    @property
    def num_samples(self) -> int:
        """Samples in the lookup."""
        return int(self.offsets.size - 1)

    def take(self, sample_index: np.ndarray) -> pa.Array:
        """The sources of ``sample_index`` (any order, repeats allowed) as a ``string`` array.

        Raises:
            ValueError: If an id lies outside the dataset (it changed while the caller ran).
        """
        ids = np.asarray(sample_index, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"sample_index {int(ids.max()) if ids.max() >= self.num_samples else int(ids.min())} "
                             f"is outside dataset {self.dataset!r} ({self.num_samples} samples in its manifest): "
                             "the dataset changed while this ran; re-run it")
        strings = pa.LargeStringArray.from_buffers(self.num_samples, pa.py_buffer(self.offsets),
                                                   pa.py_buffer(self.data))
        return strings.take(pa.array(ids)).cast(pa.string())


def load_source_lookup(storage: Storage, dataset: str | DatasetInfo) -> SourceLookup:
    """The source lookup of a dataset's committed manifest (by name, or its already loaded ``DatasetInfo``).

    Raises:
        FileNotFoundError: If the dataset does not exist (the message names the ingest command).
    """
    info = dataset if isinstance(dataset, DatasetInfo) else load_dataset_info(storage, dataset)
    return SourceLookup.from_manifest(read_manifest(storage, info), info.name)
