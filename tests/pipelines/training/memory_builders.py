"""Shared helpers of the coordinator tests: simulated rank writes, epoch close of a plain memory, exact equality."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipelines.training.memory import AssignmentMemory, combine_stats

Batch = tuple[np.ndarray, np.ndarray]


def rank_batches(rng: np.random.Generator, n: int, ks: list[int], world: int, batch: int) -> list[list[Batch]]:
    """One epoch of writes: rank r gets ids perm[r::world] in batches; every rank's first batch also
    repeats its first id with another label, as a padding distributed sampler does."""
    perm = rng.permutation(n)
    out = []
    for r in range(world):
        ids = perm[r::world]
        batches = []
        for s in range(0, ids.size, batch):
            ids_B = ids[s : s + batch]
            labels_HB = np.stack([rng.integers(0, k, ids_B.size) for k in ks])
            if s == 0:
                pad_HB = (labels_HB[:, :1] + 1) % np.asarray(ks)[:, None]
                ids_B = np.concatenate([ids_B, ids_B[:1]])
                labels_HB = np.concatenate([labels_HB, pad_HB], axis=1)
            batches.append((ids_B, labels_HB))
        out.append(batches)
    return out


def interleave(per_rank: list[list[Batch]]) -> Iterator[tuple[int, Batch]]:
    """(rank, batch) in step order: step 0 of every rank, then step 1, ..."""
    for step in range(max(len(b) for b in per_rank)):
        for r, batches in enumerate(per_rank):
            if step < len(batches):
                yield r, batches[step]


def counts(memory: AssignmentMemory) -> list[np.ndarray]:
    """What the replicated counters hold at the end of an epoch in which every row was written."""
    return [np.bincount(memory.next_HN[h][memory.next_HN[h] >= 0], minlength=k) for h, k in enumerate(memory.ks)]


def close_epoch(memory: AssignmentMemory, counters: Sequence[np.ndarray] | None = None,
                duals: Sequence[np.ndarray] | None = None, true_labels: np.ndarray | None = None,
                epoch: int | None = None) -> dict[str, float]:
    """What ``CoordinatorClient.end_epoch`` does with a one-shard coordinator, on a plain memory."""
    stats = combine_stats([memory.sufficient_stats(true_labels, epoch=epoch)], memory.ks, counters)
    memory.commit_epoch(counters, duals, epoch=epoch)
    return stats


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact, recursive equality of states: arrays and tensors by dtype and values, floats exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "to_dict"):
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        assert_same(a.to_dict(), b.to_dict(), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
