"""The Ray-free assignment memory of SeCu's ClusterCoordinator, its epoch statistics and its sharding.

SeCu (ICCV 2023, Sec. 3.2-3.3) keeps one label per training instance and head, y_h[i], plus small
per-head counters n_h and duals rho_h. Counters and duals are replicated on every training rank
(``secu/``); the assignment memory is N x H labels and is owned by the coordinator, never replicated
per worker (``secu-algorithm.md`` section 8; ``architecture.md`` "Where state lives").

- ``AssignmentMemory``: the plain state of one id range [lo, hi). Double-buffered: ``prev`` holds the
  previous epoch's labels (read-only during an epoch, what training reads in Sec. 3.3); ``next``
  receives the labels computed during the current epoch; ``commit_epoch`` swaps them. Its checkpointed
  state is a typed ``ShardState`` (``pipelines.training.coordinator_state``).
- Epoch statistics: ``sufficient_stats`` of one range (``ShardStats``) and the pure ``combine_stats``,
  which merges them into global metrics, so that the statistics never depend on the number of shards.
- Sharding by id range (``shard_ranges``, ``route``) and the label-fetch modes: ``pipelines.training.id_ranges``.

The Ray actor and its client, which wrap one memory per shard, are ``pipelines.training.coordinator``.

Legend: H = number of heads, N = ids in a range, B = rows of one write, K = clusters of a head,
C = number of true classes, R = distinct rows of a write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.training.coordinator_state import ShardState, label_dtype, per_head, validate_ks
from pipelines.training.id_ranges import as_ids

STATS_CHUNK_IDS = 1 << 22
"""Ids per chunk of the epoch statistics and recounts (bounds their temporaries to ~50 MB per head)."""


class CoordinatorNotRestoredError(RuntimeError):
    """A coordinator shard was restarted by Ray and has not been given its state back yet."""


class StaleEpochError(ValueError):
    """A call names an epoch other than the one the coordinator is writing (e.g. a stale worker)."""


def as_labels(labels_HB: np.ndarray, num_heads: int, batch: int) -> np.ndarray:
    """The labels of a write [H, B]; ValueError unless an integer array of that shape."""
    labels = np.asarray(labels_HB)
    if labels.shape != (num_heads, batch) or not (np.issubdtype(labels.dtype, np.integer) or batch == 0):
        raise ValueError(
            f"labels must be an integer array of shape (heads, batch) = ({num_heads}, {batch}), "
            f"got shape {labels.shape} {labels.dtype}"
        )
    return labels


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
        self.ks = validate_ks(ks)
        self.dtype = label_dtype(self.ks)
        self.restored = restored
        self._clear()

    def _clear(self) -> None:
        self.epoch = 0
        self.counters: list[np.ndarray] | None = None
        self.duals: list[np.ndarray] | None = None
        self._drop_arrays()
        self._set_prev(np.full((self.num_heads, self.num_samples), -1, dtype=self.dtype))
        self._begin_next()

    def _drop_arrays(self) -> None:
        """Frees the buffers before new ones are made (a reset or restore would otherwise hold both)."""
        for name in ("prev_HN", "next_HN", "written_N"):
            self.__dict__.pop(name, None)

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

    def published_range(self, lo: int, hi: int, epoch: int | None = None) -> np.ndarray:
        """The previous epoch's labels [H, hi - lo] of the ids [lo, hi) (a copy), for a paged lookup.

        Raises:
            StaleEpochError: ``epoch`` is given and is not the current epoch.
            ValueError: [lo, hi) is empty or not inside this memory's range.
        """
        self.check_restored()
        self._check_epoch(epoch, "labels of a page")
        if not self.lo <= lo < hi <= self.hi:
            raise ValueError(f"page [{lo}, {hi}) is not a non-empty part of ids [{self.lo}, {self.hi})")
        return np.ascontiguousarray(self.prev_HN[:, lo - self.lo:hi - self.lo])

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
        ids_B = as_ids(sample_index_B)
        labels_HB = as_labels(labels_HB, self.num_heads, ids_B.size)
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
        sizes = [np.zeros(k, dtype=np.int64) for k in self.ks]
        tables = [np.zeros((k, num_classes), dtype=np.int64) for k in self.ks]
        had_prev, changed = [0] * self.num_heads, [0] * self.num_heads
        # In chunks of ids: whole-range temporaries (masks, bincount's int64 copy) would take 12 bytes
        # per id and head, more than the memory itself (4.1 bytes) at N = 1B.
        for a in range(0, self.num_samples, STATS_CHUNK_IDS):
            b = min(a + STATS_CHUNK_IDS, self.num_samples)
            for h, k in enumerate(self.ks):
                next_C, prev_C = self.next_HN[h, a:b], self.prev_HN[h, a:b]
                labelled_C = next_C >= 0
                sizes[h] += np.bincount(next_C[labelled_C], minlength=k)
                had_prev_C = prev_C >= 0
                had_prev[h] += int(np.count_nonzero(had_prev_C))
                changed[h] += int(np.count_nonzero(had_prev_C & (next_C != prev_C)))
                if truth_N is not None:
                    truth_C = truth_N[a:b]
                    both_C = labelled_C & (truth_C >= 0)
                    cell_M = next_C[both_C].astype(np.int64) * num_classes + truth_C[both_C]
                    tables[h] += np.bincount(cell_M, minlength=k * num_classes).reshape(k, num_classes)
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
        *,
        epoch: int | None = None,
    ) -> None:
        """Stores counters and duals, then swaps: prev = next, epoch += 1.

        ``counters``/``duals`` (per head, K_h floats; None when the run has none) become the
        authoritative copies saved in checkpoints. Call it after ``sufficient_stats`` of the epoch
        (the statistics compare ``next`` with ``prev``, which the swap replaces).
        """
        self.check_restored()
        self._check_epoch(epoch, "end_epoch")
        checked = per_head(counters, self.ks, "counters"), per_head(duals, self.ks, "duals")
        self.counters, self.duals = checked  # both checked first: a refused call changes nothing
        self._set_prev(self.next_HN)
        self._begin_next()
        self.epoch += 1

    def recount(self, head: int) -> np.ndarray:
        """Cluster sizes (int64 [K]) of the labels in ``prev`` for one head."""
        self.check_restored()
        sizes_K = np.zeros(self.ks[head], dtype=np.int64)
        for a in range(0, self.num_samples, STATS_CHUNK_IDS):
            prev_C = self.prev_HN[head, a:a + STATS_CHUNK_IDS]
            sizes_K += np.bincount(prev_C[prev_C >= 0], minlength=self.ks[head])
        return sizes_K

    def state_dict(self) -> ShardState:
        """Everything needed to come back to the current epoch boundary (``next`` is not saved).

        ``prev_HN`` is returned without a copy: it is read-only and never modified in place.
        """
        self.check_restored()
        return ShardState(lo=self.lo, hi=self.hi, ks=tuple(self.ks), epoch=self.epoch, prev_HN=self.prev_HN,
                          counters=self.counters, duals=self.duals)

    def load_state_dict(self, state: ShardState) -> None:
        """Restores a ``state_dict`` exactly, at its epoch boundary (``next`` = ``prev``, nothing written).

        Also marks a memory restarted by Ray as restored.
        """
        if (state.lo, state.hi, list(state.ks)) != (self.lo, self.hi, self.ks):
            raise ValueError(
                f"state is for ids [{state.lo}, {state.hi}) with ks={list(state.ks)}, this memory "
                f"holds [{self.lo}, {self.hi}) with ks={self.ks}; use the same num_samples, num_shards, ks"
            )
        self.counters = per_head(state.counters, self.ks, "counters")
        self.duals = per_head(state.duals, self.ks, "duals")
        self.epoch = state.epoch
        self._drop_arrays()
        self._set_prev(np.asarray(state.prev_HN).astype(self.dtype, copy=True))
        self._begin_next()
        self.restored = True

    def reset(self) -> None:
        """Back to the empty state of a fresh run (a restart that has no checkpoint yet)."""
        self._clear()
        self.restored = True

