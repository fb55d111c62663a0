"""Ids and their ranges, Ray-free: the checks of an id batch, the split of [0, N) into the coordinator's shard
ranges, the routing of a batch to the shards, and how workers fetch the previous epoch's labels
(``compute.label_fetch``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.training.coordinator_state import label_dtype

LABEL_FETCH_MODES = ("auto", "all", "pages")
"""How a worker gets the previous epoch's labels: ``all`` fetches every shard's labels [H, N] once per
epoch (zero-copy on a node, then local lookups); ``pages`` fetches only the pages of ids the worker reads,
on first use, into a bounded cache; ``auto`` is ``all`` up to ``ALL_LABELS_MAX_BYTES``, ``pages`` above."""

ALL_LABELS_MAX_BYTES = 256 << 20
"""``auto`` fetches all labels when they take at most this (N = 134M ids x 1 int16 head, 13.4M x 10)."""


def as_ids(sample_index_B: np.ndarray) -> np.ndarray:
    """The ids of a write or lookup as int64 [B]; ValueError unless a 1-D integer array."""
    ids_B = np.asarray(sample_index_B)
    if ids_B.ndim != 1 or not (np.issubdtype(ids_B.dtype, np.integer) or ids_B.size == 0):
        raise ValueError(f"sample_index must be a 1-D integer array, got shape {ids_B.shape} {ids_B.dtype}")
    return ids_B.astype(np.int64, copy=False)


def check_in_range(ids_B: np.ndarray, lo: int, hi: int) -> None:
    """ValueError naming the ids and the range unless every id lies in [lo, hi)."""
    if ids_B.size and (ids_B.min() < lo or ids_B.max() >= hi):
        raise ValueError(f"ids out of range: [{ids_B.min()}, {ids_B.max()}] not inside [{lo}, {hi})")


def shard_ranges(num_samples: int, num_shards: int) -> list[tuple[int, int]]:
    """Splits [0, num_samples) into ``num_shards`` contiguous ranges whose sizes differ by at most 1."""
    if num_shards < 1 or num_samples < num_shards:
        raise ValueError(
            f"need 1 <= num_shards <= num_samples, got num_shards={num_shards}, num_samples={num_samples}"
        )
    bounds = [i * num_samples // num_shards for i in range(num_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def route(sample_index_B: np.ndarray, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """For each shard, the positions in the batch of the ids it owns (``ranges`` from ``shard_ranges``)."""
    ids_B = as_ids(sample_index_B)
    check_in_range(ids_B, ranges[0][0], ranges[-1][1])
    starts = np.asarray([lo for lo, _ in ranges], dtype=np.int64)
    shard_B = np.searchsorted(starts, ids_B, side="right") - 1
    return [np.flatnonzero(shard_B == s) for s in range(len(ranges))]


def resolve_label_fetch(mode: str, num_samples: int, ks: Sequence[int]) -> str:
    """``all`` or ``pages`` for a ``label_fetch`` mode (``auto`` by the size of all labels)."""
    if mode not in LABEL_FETCH_MODES:
        raise ValueError(f"label_fetch={mode!r}: use one of {', '.join(LABEL_FETCH_MODES)}")
    if mode != "auto":
        return mode
    size = num_samples * len(ks) * np.dtype(label_dtype(list(ks))).itemsize
    return "all" if size <= ALL_LABELS_MAX_BYTES else "pages"
