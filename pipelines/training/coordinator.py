"""The ClusterCoordinator: owner of SeCu's global clustering state across epochs.

SeCu (ICCV 2023, Sec. 3.2-3.3) keeps one label per training instance and head, y_h[i], plus small
per-head counters n_h and duals rho_h. Counters and duals are replicated on every training rank
(``secu/``); the assignment memory is N x H labels and is owned here, never replicated per worker
(``secu-algorithm.md`` section 8; ``architecture.md`` "Where state lives").

Three layers, each usable alone:

- ``AssignmentMemory``: plain, Ray-free state for one id range [lo, hi). Double-buffered: ``prev``
  holds the previous epoch's labels (read-only during an epoch, what training reads in Sec. 3.3);
  ``next`` receives the labels computed during the current epoch; ``end_epoch`` swaps them.
- Sharding by id range: ``shard_ranges``, ``route`` and the pure ``combine_stats``, which merges
  per-shard sufficient statistics (``ShardStats``) into global metrics, so that the statistics never
  depend on the number of shards.
- Ray: ``ClusterCoordinator`` (an actor that is a thin wrapper over one ``AssignmentMemory``) and
  ``CoordinatorClient`` (driver and workers: publish/lookup, batched asynchronous writes, epoch end,
  checkpoint state across shards).

Fault model: shard actors are created with ``max_restarts=-1``; a restarted actor re-runs
``__init__`` with empty state and refuses every state-touching call with
``CoordinatorNotRestoredError`` until ``load_state_dict`` (state of the last training checkpoint) or
``reset`` (no checkpoint yet) is called. Restoring always returns to an epoch boundary.

Legend: H = number of heads, N = ids in a range, B = rows of one write, K = clusters of a head,
C = number of true classes, R = distinct rows of a write.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
"""Version of the dicts returned by ``state_dict`` (bumped on incompatible changes)."""

DEFAULT_FLUSH_EVERY = 4096
"""Rows a ``CoordinatorClient`` buffers before sending them to the shard actors."""

MAX_PENDING_WRITES = 16
"""Unfinished write calls a client allows before it waits (bounds its object-store use)."""

_INT16_MAX_K = int(np.iinfo(np.int16).max)


class CoordinatorNotRestoredError(RuntimeError):
    """A coordinator shard was restarted by Ray and has not been given its state back yet."""


class StaleEpochError(ValueError):
    """A call names an epoch other than the one the coordinator is writing (e.g. a stale worker)."""


def label_dtype(ks: Sequence[int]) -> np.dtype[Any]:
    """Smallest signed dtype holding every label of heads with ``ks`` clusters and the -1 sentinel."""
    return np.dtype(np.int16) if max(ks) <= _INT16_MAX_K else np.dtype(np.int32)


def _validate_ks(ks: Sequence[int]) -> list[int]:
    out = [int(k) for k in ks]
    if not out:
        raise ValueError("ks is empty: give the number of clusters of every head, e.g. ks=[10, 20]")
    if any(k < 1 or k > np.iinfo(np.int32).max for k in out):
        raise ValueError(f"ks={out}: every head needs 1 <= K <= 2**31 - 1 clusters")
    return out


def _as_ids(sample_index_B: np.ndarray) -> np.ndarray:
    ids_B = np.asarray(sample_index_B)
    if ids_B.ndim != 1 or not (np.issubdtype(ids_B.dtype, np.integer) or ids_B.size == 0):
        raise ValueError(f"sample_index must be a 1-D integer array, got shape {ids_B.shape} {ids_B.dtype}")
    return ids_B.astype(np.int64, copy=False)


def _as_labels(labels_HB: np.ndarray, num_heads: int, batch: int) -> np.ndarray:
    labels = np.asarray(labels_HB)
    if labels.shape != (num_heads, batch) or not (np.issubdtype(labels.dtype, np.integer) or batch == 0):
        raise ValueError(
            f"labels must be an integer array of shape (heads, batch) = ({num_heads}, {batch}), "
            f"got shape {labels.shape} {labels.dtype}"
        )
    return labels


def _per_head(values: Sequence[np.ndarray] | None, ks: Sequence[int], what: str) -> list[np.ndarray] | None:
    """Validates per-head vectors (counters or duals) and returns float64 copies."""
    if values is None:
        return None
    if len(values) != len(ks):
        raise ValueError(f"{what}: expected one array per head ({len(ks)}), got {len(values)}")
    out = []
    for h, (v, k) in enumerate(zip(values, ks, strict=True)):
        arr = np.array(v, dtype=np.float64, copy=True).reshape(-1)
        if arr.shape != (k,):
            raise ValueError(f"{what}[{h}]: expected shape ({k},), got {np.shape(v)}")
        out.append(arr)
    return out


# --------------------------------------------------------------------------------------------------
# Sufficient statistics and their (shard-independent) combination
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    """Additive statistics of one id range at the end of an epoch (before the buffer swap).

    Summing these over shards and then deriving the metrics gives exactly the unsharded metrics.
    """

    epoch: int
    """The epoch whose labels are summarised."""
    num_samples: int
    """Size of the id range."""
    written: int
    """Rows written during the epoch."""
    sizes: list[np.ndarray]
    """Per head, int64 [K]: cluster sizes over the labelled rows of ``next``."""
    had_prev: list[int]
    """Per head: rows that had a label in ``prev``."""
    changed: list[int]
    """Per head: rows with a ``prev`` label whose ``next`` label differs."""
    contingency: list[np.ndarray] | None = None
    """Per head, int64 [K, C]: counts of (cluster, true class) over labelled rows of known class."""


def _clustering_scores(tables_KC: Sequence[np.ndarray]) -> dict[str, float] | None:
    """ACC/NMI/ARI of the summed per-shard contingency tables; None when no row has a known class."""
    # Imported lazily: only runs that pass true labels need it (and its scipy dependency).
    from secu.metrics import metrics_from_contingency, sum_contingency

    # secu.metrics orders tables classes x clusters; ours are clusters x classes.
    table_CK = sum_contingency(t.T for t in tables_KC)
    return metrics_from_contingency(table_CK) if table_CK.sum() > 0 else None


def combine_stats(
    parts: Sequence[ShardStats],
    ks: Sequence[int],
    counters: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Merges per-shard statistics into global metrics (pure; identical for any sharding).

    Keys, per head h: ``clusters/h{h}/{min_size_frac, max_size_frac, empty, entropy, entropy_norm,
    changed_frac, labelled_frac}``; with ``counters``: ``counter_gap_frac`` (sum_k |n_h[k] - size_k| /
    labelled rows; 0 when the replicated counters agree with the memory); with true labels:
    ``acc, nmi, ari`` of head h against the known classes. Global: ``clusters/epoch`` and
    ``clusters/written_frac``. Fractions with a zero denominator (e.g. ``changed_frac`` in the first
    epoch, when no row had a label yet) are 0.0, as is ``entropy_norm`` for K = 1 (the convention of
    ``secu.metrics.size_stats``).
    """
    if not parts:
        raise ValueError("combine_stats needs at least one ShardStats")
    ks = list(ks)
    epochs = {p.epoch for p in parts}
    if len(epochs) != 1:
        raise StaleEpochError(f"shard statistics come from different epochs {sorted(epochs)}")
    for p in parts:
        if [s.size for s in p.sizes] != ks:
            raise ValueError(f"shard statistics have heads {[s.size for s in p.sizes]}, expected ks={ks}")
    num_samples = sum(p.num_samples for p in parts)
    out: dict[str, float] = {
        "clusters/epoch": float(parts[0].epoch),
        "clusters/written_frac": sum(p.written for p in parts) / num_samples,
    }
    with_truth = all(p.contingency is not None for p in parts)
    for h, k in enumerate(ks):
        sizes_K = np.sum([p.sizes[h] for p in parts], axis=0).astype(np.int64)
        labelled = int(sizes_K.sum())
        had_prev = sum(p.had_prev[h] for p in parts)
        changed = sum(p.changed[h] for p in parts)
        frac_K = sizes_K / labelled if labelled else np.zeros(k)
        nonzero = frac_K[frac_K > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum())
        prefix = f"clusters/h{h}/"
        out[prefix + "min_size_frac"] = float(frac_K.min())
        out[prefix + "max_size_frac"] = float(frac_K.max())
        out[prefix + "empty"] = float(np.count_nonzero(sizes_K == 0))
        out[prefix + "entropy"] = entropy
        out[prefix + "entropy_norm"] = entropy / math.log(k) if k > 1 else 0.0
        out[prefix + "changed_frac"] = changed / had_prev if had_prev else 0.0
        out[prefix + "labelled_frac"] = labelled / num_samples
        if counters is not None:
            gap = float(np.abs(np.asarray(counters[h], dtype=np.float64) - sizes_K).sum())
            out[prefix + "counter_gap_frac"] = gap / max(labelled, 1)
        if with_truth:
            scores = _clustering_scores([p.contingency[h] for p in parts if p.contingency is not None])
            for name, value in (scores or {}).items():
                out[prefix + name] = float(value)
    return out


# --------------------------------------------------------------------------------------------------
# The plain, Ray-free memory of one id range
# --------------------------------------------------------------------------------------------------


class AssignmentMemory:
    """Double-buffered assignment memory y_h[i] for ids in [lo, hi) and H heads (SeCu Sec. 3.2-3.3).

    Labels are int16 when every K <= 32767, else int32; -1 means "no label yet". During epoch
    ``epoch``, ``published()`` (the previous epoch's labels) is read-only and ``write`` fills
    ``next``, which starts as a copy of ``prev`` so that rows not seen this epoch keep their label.

    Writes are first-write-wins per row and epoch: inside one write the first occurrence of a
    duplicated id wins (a distributed sampler pads with repeated ids, ``secu-algorithm.md`` section 8),
    and a row already written this epoch ignores later writes. Repeating a write is therefore
    harmless, which matters because Ray actor tasks with retries are at-least-once.
    """

    def __init__(self, lo: int, hi: int, ks: Sequence[int], *, restored: bool = True) -> None:
        """Creates an empty memory (epoch 0, every label -1).

        Args:
            lo: first id of the range.
            hi: one past the last id of the range.
            ks: number of clusters K of each head.
            restored: False for an actor restarted by Ray, whose state must be loaded before use.
        """
        if not 0 <= lo < hi:
            raise ValueError(f"id range [{lo}, {hi}) is empty or negative: need 0 <= lo < hi")
        self.lo = int(lo)
        self.hi = int(hi)
        self.ks = _validate_ks(ks)
        self.dtype = label_dtype(self.ks)
        self.restored = restored
        self._clear()

    def _clear(self) -> None:
        self.epoch = 0
        self.counters: list[np.ndarray] | None = None
        self.duals: list[np.ndarray] | None = None
        self.history: list[dict[str, float]] = []
        self._set_prev(np.full((self.num_heads, self.num_samples), -1, dtype=self.dtype))
        self._begin_next()

    @property
    def num_heads(self) -> int:
        """H, the number of heads."""
        return len(self.ks)

    @property
    def num_samples(self) -> int:
        """Size of the id range."""
        return self.hi - self.lo

    def _set_prev(self, prev_HN: np.ndarray) -> None:
        prev_HN.flags.writeable = False  # prev is what workers read this epoch: nobody may edit it
        self.prev_HN = prev_HN

    def _begin_next(self) -> None:
        self.next_HN = self.prev_HN.copy()
        self.written_N = np.zeros(self.num_samples, dtype=bool)

    def check_restored(self) -> None:
        """Raises ``CoordinatorNotRestoredError`` when the state was lost in an actor restart."""
        if not self.restored:
            raise CoordinatorNotRestoredError(
                f"coordinator shard for ids [{self.lo}, {self.hi}) was restarted by Ray and lost its state; "
                "call CoordinatorClient.load_state_dict(<coordinator state of the last checkpoint>), or "
                "reset() when no checkpoint exists yet, before writing or publishing"
            )

    def _check_epoch(self, epoch: int | None, what: str) -> None:
        if epoch is not None and epoch != self.epoch:
            raise StaleEpochError(
                f"{what} for epoch {epoch} but ids [{self.lo}, {self.hi}) are at epoch {self.epoch}; "
                "a worker from before a restart must reload the checkpoint and start again"
            )

    def published(self) -> np.ndarray:
        """The previous epoch's labels [H, N] (read-only): what training reads (Sec. 3.3)."""
        self.check_restored()
        return self.prev_HN

    def adopt_published(self, prev_HN: np.ndarray) -> None:
        """Replaces ``prev`` by an equal array (its zero-copy object-store view) to free the heap copy."""
        assert prev_HN.shape == self.prev_HN.shape and prev_HN.dtype == self.dtype
        self._set_prev(prev_HN)

    def write(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> int:
        """Stores new labels of the current epoch into ``next``.

        Args:
            sample_index_B: ids, all in [lo, hi).
            labels_HB: label of every id for every head, 0 <= label < K_h.
            epoch: the epoch the labels were computed in; must equal ``self.epoch``.

        Returns:
            Rows newly written (duplicates and rows already written this epoch do not count).

        Raises:
            StaleEpochError: ``epoch`` is not the current epoch. Nothing is written.
            ValueError: bad shapes, ids or labels. Nothing is written.
        """
        self.check_restored()
        self._check_epoch(epoch, "write")
        ids_B = _as_ids(sample_index_B)
        labels_HB = _as_labels(labels_HB, self.num_heads, ids_B.size)
        if ids_B.size == 0:
            return 0
        if ids_B.min() < self.lo or ids_B.max() >= self.hi:
            raise ValueError(
                f"ids out of range: [{ids_B.min()}, {ids_B.max()}] not inside [{self.lo}, {self.hi}); "
                "route writes to the shard that owns the ids"
            )
        if labels_HB.min() < 0 or (labels_HB.max(axis=1) >= np.asarray(self.ks)).any():
            raise ValueError(f"labels out of range: head h needs 0 <= label < K_h with ks={self.ks}")
        # np.unique returns the index of each id's FIRST occurrence, which makes the winner among
        # duplicates well defined (fancy assignment with repeated indices has no defined winner).
        rows_R, first_R = np.unique(ids_B - self.lo, return_index=True)
        fresh_R = ~self.written_N[rows_R]
        rows_R, first_R = rows_R[fresh_R], first_R[fresh_R]
        self.next_HN[:, rows_R] = np.take(labels_HB, first_R, axis=1)  # np.take: faster than [:, idx]
        self.written_N[rows_R] = True
        return int(rows_R.size)

    def sufficient_stats(
        self, true_labels: np.ndarray | None = None, *, epoch: int | None = None
    ) -> ShardStats:
        """Additive statistics of ``next`` vs ``prev`` for ``combine_stats``.

        Args:
            true_labels: class of each id of the range (entries < 0 are unknown and ignored).
            epoch: when given, must equal the current epoch.
        """
        self.check_restored()
        self._check_epoch(epoch, "sufficient_stats")
        truth_N: np.ndarray | None = None
        num_classes = 0
        if true_labels is not None:
            truth_N = np.asarray(true_labels)
            if truth_N.shape != (self.num_samples,) or not np.issubdtype(truth_N.dtype, np.integer):
                raise ValueError(
                    f"true_labels must be an integer array of shape ({self.num_samples},), one per id in "
                    f"[{self.lo}, {self.hi}); got {truth_N.shape} {truth_N.dtype}"
                )
            num_classes = max(int(truth_N.max()) + 1, 0)
        sizes, had_prev, changed, tables = [], [], [], []
        for h, k in enumerate(self.ks):
            next_N, prev_N = self.next_HN[h], self.prev_HN[h]
            labelled_N = next_N >= 0
            sizes.append(np.bincount(next_N[labelled_N], minlength=k).astype(np.int64))
            had_prev_N = prev_N >= 0
            had_prev.append(int(np.count_nonzero(had_prev_N)))
            changed.append(int(np.count_nonzero(had_prev_N & (next_N != prev_N))))
            if truth_N is not None:
                both_N = labelled_N & (truth_N >= 0)
                cell_M = next_N[both_N].astype(np.int64) * num_classes + truth_N[both_N]
                tables.append(np.bincount(cell_M, minlength=k * num_classes).reshape(k, num_classes))
        return ShardStats(
            epoch=self.epoch,
            num_samples=self.num_samples,
            written=int(np.count_nonzero(self.written_N)),
            sizes=sizes,
            had_prev=had_prev,
            changed=changed,
            contingency=tables if truth_N is not None else None,
        )

    def commit_epoch(
        self,
        counters: Sequence[np.ndarray] | None,
        duals: Sequence[np.ndarray] | None,
        stats: dict[str, float],
        *,
        epoch: int | None = None,
    ) -> None:
        """Stores counters, duals and the epoch's global stats, then swaps: prev = next, epoch += 1.

        ``counters``/``duals`` (per head, K_h floats; None when the run has none) become the
        authoritative copies saved in checkpoints.
        """
        self.check_restored()
        self._check_epoch(epoch, "end_epoch")
        self.counters = _per_head(counters, self.ks, "counters")
        self.duals = _per_head(duals, self.ks, "duals")
        self.history.append(dict(stats))
        self._set_prev(self.next_HN)
        self._begin_next()
        self.epoch += 1

    def end_epoch(
        self,
        counters: Sequence[np.ndarray] | None,
        duals: Sequence[np.ndarray] | None,
        true_labels: np.ndarray | None = None,
        *,
        epoch: int | None = None,
    ) -> dict[str, float]:
        """Computes the epoch's statistics (see ``combine_stats``), then commits and swaps buffers."""
        counters = _per_head(counters, self.ks, "counters")
        stats = combine_stats([self.sufficient_stats(true_labels, epoch=epoch)], self.ks, counters)
        self.commit_epoch(counters, duals, stats, epoch=epoch)
        return stats

    def recount(self, head: int) -> np.ndarray:
        """Cluster sizes (int64 [K]) of the labels in ``prev`` for one head."""
        self.check_restored()
        prev_N = self.prev_HN[head]
        return np.bincount(prev_N[prev_N >= 0], minlength=self.ks[head]).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to come back to the current epoch boundary (``next`` is not saved).

        ``prev_HN`` is returned without a copy: it is read-only and never modified in place.
        """
        self.check_restored()
        return {
            "format": STATE_FORMAT,
            "lo": self.lo,
            "hi": self.hi,
            "ks": list(self.ks),
            "epoch": self.epoch,
            "prev_HN": self.prev_HN,
            "counters": None if self.counters is None else [c.copy() for c in self.counters],
            "duals": None if self.duals is None else [d.copy() for d in self.duals],
            "history": [dict(s) for s in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict`` exactly, at its epoch boundary (``next`` = ``prev``, nothing written).

        Also marks a memory restarted by Ray as restored.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"coordinator state format {state.get('format')!r} is not {STATE_FORMAT}")
        if (state["lo"], state["hi"], list(state["ks"])) != (self.lo, self.hi, self.ks):
            raise ValueError(
                f"state is for ids [{state['lo']}, {state['hi']}) with ks={list(state['ks'])}, this memory "
                f"holds [{self.lo}, {self.hi}) with ks={self.ks}; use the same num_samples, num_shards, ks"
            )
        prev_HN = np.asarray(state["prev_HN"])
        if prev_HN.shape != (self.num_heads, self.num_samples):
            raise ValueError(f"prev_HN has shape {prev_HN.shape}, expected {(self.num_heads, self.num_samples)}")
        if int(state["epoch"]) < 0:
            raise ValueError(f"epoch {state['epoch']} is negative")
        counters = _per_head(state["counters"], self.ks, "counters")
        duals = _per_head(state["duals"], self.ks, "duals")
        self.counters, self.duals = counters, duals
        self.history = [dict(s) for s in state["history"]]
        self.epoch = int(state["epoch"])
        self._set_prev(prev_HN.astype(self.dtype, copy=True))
        self._begin_next()
        self.restored = True

    def reset(self) -> None:
        """Back to the empty state of a fresh run (a restart that has no checkpoint yet)."""
        self._clear()
        self.restored = True


# --------------------------------------------------------------------------------------------------
# Sharding by id range
# --------------------------------------------------------------------------------------------------


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
    ids_B = _as_ids(sample_index_B)
    if ids_B.size and (ids_B.min() < ranges[0][0] or ids_B.max() >= ranges[-1][1]):
        raise ValueError(
            f"ids out of range: [{ids_B.min()}, {ids_B.max()}] not inside [{ranges[0][0]}, {ranges[-1][1]})"
        )
    starts = np.asarray([lo for lo, _ in ranges], dtype=np.int64)
    shard_B = np.searchsorted(starts, ids_B, side="right") - 1
    return [np.flatnonzero(shard_B == s) for s in range(len(ranges))]


# --------------------------------------------------------------------------------------------------
# Ray: the shard actor and its client
# --------------------------------------------------------------------------------------------------


class ClusterCoordinator:
    """Ray actor owning one id range's ``AssignmentMemory`` (a thin wrapper; the logic is tested plain).

    Create it through ``CoordinatorClient.create``. With ``max_restarts=-1`` Ray re-runs ``__init__``
    after a crash; the actor then knows it was reconstructed and refuses to serve until restored.
    """

    def __init__(self, lo: int, hi: int, ks: list[int], true_labels: np.ndarray | None = None) -> None:
        """Creates the shard; ``true_labels`` (one per id in [lo, hi), < 0 unknown) enables ACC/NMI/ARI."""
        with warnings.catch_warnings():
            # Ray 2.60's own implementation of this property reads the deprecated ``actor_id``.
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._memory = AssignmentMemory(lo, hi, ks, restored=not reconstructed)
        self._true_labels = None if true_labels is None else np.asarray(true_labels)
        self._published: tuple[int, ray.ObjectRef] | None = None
        if reconstructed:
            logger.warning("coordinator shard [%d, %d) restarted with empty state; waits for a restore", lo, hi)

    def is_restored(self) -> bool:
        """False after a Ray restart until ``load_state_dict`` or ``reset``."""
        return self._memory.restored

    def publish(self) -> tuple[int, ray.ObjectRef]:
        """(epoch, ref to the previous epoch's labels [H, N]); ``ray.put`` at most once per epoch."""
        if self._published is None or self._published[0] != self._memory.epoch:
            ref = ray.put(self._memory.published())
            # Serve prev from the object store's zero-copy view and drop the heap copy, so that the
            # published labels are held once on this node, not twice.
            self._memory.adopt_published(ray.get(ref))
            self._published = (self._memory.epoch, ref)
        return self._published

    def write(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> int:
        """See ``AssignmentMemory.write``."""
        return self._memory.write(sample_index_B, labels_HB, epoch)

    def sufficient_stats(self, epoch: int | None) -> ShardStats:
        """See ``AssignmentMemory.sufficient_stats`` (with the true labels given at creation)."""
        return self._memory.sufficient_stats(self._true_labels, epoch=epoch)

    def commit_epoch(
        self,
        epoch: int | None,
        counters: list[np.ndarray] | None,
        duals: list[np.ndarray] | None,
        stats: dict[str, float],
    ) -> None:
        """See ``AssignmentMemory.commit_epoch``."""
        self._memory.commit_epoch(counters, duals, stats, epoch=epoch)
        self._published = None

    def recount(self, head: int) -> np.ndarray:
        """See ``AssignmentMemory.recount``."""
        return self._memory.recount(head)

    def state_dict(self) -> dict[str, Any]:
        """See ``AssignmentMemory.state_dict``."""
        return self._memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See ``AssignmentMemory.load_state_dict``."""
        self._memory.load_state_dict(state)
        self._published = None

    def reset(self) -> None:
        """See ``AssignmentMemory.reset``."""
        self._memory.reset()
        self._published = None


_ClusterCoordinatorActor = ray.remote(ClusterCoordinator)

_INLINE_ARG_BYTES = 64 * 1024
"""Constructor arguments up to this size are sent inline (Ray inlines task arguments below 100 KiB)."""


class CoordinatorClient:
    """Handle on the coordinator shards for the driver and the training workers (picklable).

    Driver: ``create`` before ``trainer.fit()`` and pass the client in ``train_loop_config``.
    Worker, per epoch e: ``begin_epoch(e)`` once, then per step ``labels_for(ids)`` (local lookup, no
    actor call) and ``write_async(ids, labels, e)``; ``flush()`` at the epoch end. One rank, after
    every rank flushed: ``end_epoch(counters, duals, epoch=e)``, then ``state_dict()`` into the checkpoint.
    On a (re)start, rank 0 calls ``load_state_dict(state from the checkpoint)`` or ``reset()`` (no
    checkpoint yet) before any rank begins the epoch. Pickling keeps the actor handles and drops the
    local buffers and caches.
    """

    def __init__(
        self,
        handles: Sequence[Any],
        ranges: Sequence[tuple[int, int]],
        ks: Sequence[int],
        flush_every: int = DEFAULT_FLUSH_EVERY,
    ) -> None:
        """Wraps existing shard actors (one per id range); most callers use ``create``."""
        if len(handles) != len(ranges):
            raise ValueError(f"{len(handles)} actor handles for {len(ranges)} id ranges")
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every} must be >= 1")
        self._handles = list(handles)
        self._ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        self._ks = _validate_ks(ks)
        self._flush_every = int(flush_every)
        self._reset_local()

    def _reset_local(self) -> None:
        self._pinned_args: list[ray.ObjectRef] = []
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffer_rows = 0
        self._buffer_epoch: int | None = None
        self._pending: list[ray.ObjectRef] = []
        self._written_rows = 0
        self._published_epoch: int | None = None
        self._published: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"handles": self._handles, "ranges": self._ranges, "ks": self._ks, "flush": self._flush_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._handles = state["handles"]
        self._ranges = state["ranges"]
        self._ks = state["ks"]
        self._flush_every = state["flush"]
        self._reset_local()

    @classmethod
    def create(
        cls,
        run_id: str,
        num_samples: int,
        ks: Sequence[int],
        num_shards: int = 1,
        true_labels: np.ndarray | None = None,
        *,
        flush_every: int = DEFAULT_FLUSH_EVERY,
    ) -> CoordinatorClient:
        """Creates the shard actors ``secu-coord-<run_id>-<i>`` (driver side; Ray must be initialised).

        Args:
            run_id: the run's stable id (actor names must be unique within the Ray namespace).
            num_samples: N; ids are [0, N).
            ks: clusters of each head.
            num_shards: shard actors, each owning a contiguous id range.
            true_labels: optional class of every id (< 0 unknown) for ACC/NMI/ARI in the epoch stats.
            flush_every: rows a client buffers before sending a write.

        Raises:
            ValueError: bad arguments, or actors of this run id exist already in the Ray namespace
                (deliberately no ``get_if_exists``: a leftover coordinator holds another attempt's state).
        """
        ks = _validate_ks(ks)
        ranges = shard_ranges(num_samples, num_shards)
        truth_N = None
        if true_labels is not None:
            truth_N = np.asarray(true_labels)
            if truth_N.shape != (num_samples,) or not np.issubdtype(truth_N.dtype, np.integer):
                raise ValueError(f"true_labels must be integers of shape ({num_samples},), got {truth_N.shape}")
        # A restarted actor re-runs __init__ with the same arguments. Small ones travel inline in the
        # task spec; larger ones live in the object store, where this client holds a reference to them
        # so that they stay in scope (and a restart can read them) for as long as the run's driver lives.
        args: list[Any] = [None] * len(ranges)
        pinned: list[ray.ObjectRef] = []
        if truth_N is not None:
            # Classes in the narrowest signed type that holds them (unknown, < 0, as -1): 1 byte per id
            # for up to 127 classes, so up to 64k ids per shard travel inline.
            dtype = np.min_scalar_type(-(max(int(truth_N.max()), 0) + 1))
            narrow = np.where(truth_N < 0, -1, truth_N).astype(dtype)
            for i, (lo, hi) in enumerate(ranges):
                part = narrow[lo:hi]
                if part.nbytes > _INLINE_ARG_BYTES:
                    ref = ray.put(part)
                    pinned.append(ref)
                    args[i] = ref
                else:
                    args[i] = part
        handles = [
            _ClusterCoordinatorActor.options(
                name=f"secu-coord-{run_id}-{i}", max_restarts=-1, max_task_retries=-1, num_cpus=0
            ).remote(lo, hi, ks, args[i])
            for i, (lo, hi) in enumerate(ranges)
        ]
        client = cls(handles, ranges, ks, flush_every)
        client._pinned_args = pinned
        return client

    @property
    def ks(self) -> list[int]:
        """Clusters of each head."""
        return list(self._ks)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The id range of each shard."""
        return list(self._ranges)

    @property
    def handles(self) -> list[Any]:
        """The shard actor handles (for failure handling and tests)."""
        return list(self._handles)

    def is_restored(self) -> bool:
        """True when no shard is waiting for its state after a restart."""
        return all(ray.get([h.is_restored.remote() for h in self._handles]))

    def publish(self) -> list[ray.ObjectRef]:
        """One ref per shard to its previous-epoch labels [H, N_shard] in the object store."""
        return [ref for _, ref in self._publish()]

    def _publish(self) -> list[tuple[int, ray.ObjectRef]]:
        return list(ray.get([h.publish.remote() for h in self._handles]))

    def begin_epoch(self, epoch: int, timeout_s: float = 120.0) -> None:
        """Fetches every shard's previous-epoch labels once (zero-copy, read-only) for ``labels_for``.

        Waits up to ``timeout_s`` for shards still at an earlier epoch: a rank may get here before the
        rank that calls ``end_epoch`` has closed the previous epoch.

        Raises:
            StaleEpochError: a shard is past ``epoch``, or still behind it after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            published = self._publish()
            epochs = sorted({e for e, _ in published})
            if epochs == [epoch]:
                break
            if epochs[-1] > epoch or time.monotonic() > deadline:
                raise StaleEpochError(
                    f"begin_epoch({epoch}) but the coordinator is at epoch(s) {epochs} "
                    f"(waited {timeout_s} s for end_epoch of the previous epoch)"
                )
            time.sleep(0.05)
        self._published = list(ray.get([ref for _, ref in published]))
        self._published_epoch = epoch

    def labels_for(self, sample_index_B: np.ndarray) -> np.ndarray:
        """Previous-epoch labels int64 [H, B] of the given ids (-1: none yet), looked up locally."""
        if self._published_epoch is None:
            raise ValueError("labels_for before begin_epoch: call begin_epoch(epoch) at every epoch start")
        ids_B = _as_ids(sample_index_B)
        out_HB = np.empty((len(self._ks), ids_B.size), dtype=np.int64)
        for (lo, _), prev_HN, pos in zip(self._ranges, self._published, route(ids_B, self._ranges), strict=True):
            out_HB[:, pos] = prev_HN[:, ids_B[pos] - lo]
        return out_HB

    def write_async(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> None:
        """Buffers new labels; sends them without waiting once ``flush_every`` rows are buffered."""
        ids_B = _as_ids(sample_index_B)
        labels_HB = _as_labels(labels_HB, len(self._ks), ids_B.size)
        lo, hi = self._ranges[0][0], self._ranges[-1][1]
        if ids_B.size and (ids_B.min() < lo or ids_B.max() >= hi):  # fail here, not at the next flush
            raise ValueError(f"ids out of range: [{ids_B.min()}, {ids_B.max()}] not inside [{lo}, {hi})")
        if self._buffer_epoch is not None and epoch != self._buffer_epoch:
            self._send()
        # Copies: callers often pass views of tensors that they reuse (``tensor.numpy()``).
        self._buffer.append((ids_B.copy(), labels_HB.astype(np.int32)))
        self._buffer_rows += ids_B.size
        self._buffer_epoch = epoch
        if self._buffer_rows >= self._flush_every:
            self._send()

    def _send(self) -> None:
        if self._buffer_rows and self._buffer_epoch is not None:
            ids_B = np.concatenate([ids for ids, _ in self._buffer])
            labels_HB = np.concatenate([labels for _, labels in self._buffer], axis=1)
            for handle, pos in zip(self._handles, route(ids_B, self._ranges), strict=True):
                if pos.size:
                    ref = handle.write.remote(ids_B[pos], labels_HB[:, pos], self._buffer_epoch)
                    self._pending.append(ref)
        self._buffer, self._buffer_rows, self._buffer_epoch = [], 0, None
        # Collect finished writes now, so that a refused write fails soon after the step that made it,
        # and wait for the oldest ones when the shards fall behind (backpressure).
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        if len(self._pending) > MAX_PENDING_WRITES:
            done += self._pending[:-MAX_PENDING_WRITES]
            self._pending = self._pending[-MAX_PENDING_WRITES:]
        self._written_rows += sum(ray.get(done))

    def flush(self) -> int:
        """Sends the buffered rows and waits for every pending write.

        Returns:
            Rows newly written since the previous flush.

        Raises:
            The shard's error, e.g. ``StaleEpochError`` or ``CoordinatorNotRestoredError``.
        """
        self._send()
        pending, self._pending = self._pending, []
        written = self._written_rows + sum(ray.get(pending))
        self._written_rows = 0
        return written

    def end_epoch(
        self,
        counters: Sequence[np.ndarray] | None = None,
        duals: Sequence[np.ndarray] | None = None,
        *,
        epoch: int | None = None,
    ) -> dict[str, float]:
        """Global statistics of the epoch (``combine_stats``); then every shard commits and swaps.

        Call on one rank after all ranks flushed. ``counters``/``duals`` (per head, K_h floats) are
        stored as the authoritative copies for checkpoints. ``epoch``, when given, must be the epoch
        the shards are writing (``StaleEpochError`` otherwise): it makes a repeated call fail instead
        of closing the next epoch too.
        """
        counters = _per_head(counters, self._ks, "counters")
        duals = _per_head(duals, self._ks, "duals")
        parts = ray.get([h.sufficient_stats.remote(epoch) for h in self._handles])
        stats = combine_stats(parts, self._ks, counters)
        ray.get([h.commit_epoch.remote(epoch, counters, duals, stats) for h in self._handles])
        return stats

    def recount(self, head: int) -> np.ndarray:
        """Global cluster sizes (int64 [K]) of the previous epoch's labels for one head."""
        return np.sum(ray.get([h.recount.remote(head) for h in self._handles]), axis=0).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Every shard's state, for the training checkpoint."""
        return {
            "format": STATE_FORMAT,
            "ranges": list(self._ranges),
            "ks": list(self._ks),
            "shards": ray.get([h.state_dict.remote() for h in self._handles]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores every shard to the checkpointed epoch boundary (also after a shard restart)."""
        ranges = [(int(lo), int(hi)) for lo, hi in state["ranges"]]
        if ranges != self._ranges or list(state["ks"]) != self._ks:
            raise ValueError(
                f"checkpointed coordinator has ranges {ranges} and ks={list(state['ks'])}; this one has "
                f"{self._ranges} and ks={self._ks}: create it with the same num_samples, num_shards and ks"
            )
        ray.get([h.load_state_dict.remote(s) for h, s in zip(self._handles, state["shards"], strict=True)])
        self._reset_local()

    def reset(self) -> None:
        """Every shard back to a fresh run's empty state (a restart before the first checkpoint)."""
        ray.get([h.reset.remote() for h in self._handles])
        self._reset_local()

    def kill_shard(self, index: int) -> None:
        """Fault injection: kills one shard actor; Ray restarts it with empty state (see module doc)."""
        ray.kill(self._handles[index], no_restart=False)

    def shutdown(self) -> None:
        """Kills the shard actors for good (driver, at the end of the run)."""
        for handle in self._handles:
            ray.kill(handle, no_restart=True)
