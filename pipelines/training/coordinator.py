"""The ClusterCoordinator: owner of SeCu's global clustering state across epochs, on Ray.

One Ray actor per shard (``ClusterCoordinator``, ``pipelines.training.coordinator_actor``, a thin wrapper
over one Ray-free ``pipelines.training.memory.AssignmentMemory``) owns the assignment memory of a contiguous id range;
``CoordinatorClient`` is the handle of the driver and the workers: publish/lookup, batched asynchronous
writes, epoch end (per-shard ``ShardStats`` merged by ``combine_stats``), and the checkpointed state
across shards as a typed ``CoordinatorState`` (``pipelines.training.coordinator_state``).

Fault model: shard actors are created with ``max_restarts=-1``; a restarted actor re-runs
``__init__`` with empty state and refuses every state-touching call with
``CoordinatorNotRestoredError`` until ``load_state_dict`` (state of the last training checkpoint) or
``reset`` (no checkpoint yet) is called. Restoring always returns to an epoch boundary.

Legend: H = number of heads, N = ids in a range, B = rows of one write, K = clusters of a head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from pipelines.training.coordinator_actor import ClusterCoordinatorActor
from pipelines.training.coordinator_state import CoordinatorState, per_head, validate_ks
from pipelines.training.id_ranges import as_ids, check_in_range, resolve_label_fetch, route, shard_ranges
from pipelines.training.label_pages import DEFAULT_MAX_PAGES, DEFAULT_PAGE_IDS, LabelPages
from pipelines.training.memory import ShardStats, StaleEpochError, as_labels, combine_stats

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 4096
"""Rows a ``CoordinatorClient`` buffers before sending them to the shard actors."""

MAX_PENDING_WRITES = 16
"""Unfinished write calls a client allows before it waits (bounds its object-store use)."""



_INLINE_ARG_BYTES = 64 * 1024
"""Constructor arguments up to this size are sent inline (Ray inlines task arguments below 100 KiB)."""


class CoordinatorClient:
    """Handle on the coordinator shards for the driver and the training workers (picklable).

    Driver: ``create`` before ``trainer.fit()`` and pass the client in ``train_loop_config``.
    Worker, per epoch e: ``begin_epoch(e)`` once, then per step ``labels_for(ids)`` (a local lookup; with
    ``label_fetch`` ``pages`` an actor call only when the ids enter a page not cached yet) and
    ``write_async(ids, labels, e)``; ``flush()`` at the epoch end. One rank, after
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
        *,
        label_fetch: str = "auto",
        page_ids: int = DEFAULT_PAGE_IDS,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        """Wraps existing shard actors (one per id range); most callers use ``create``."""
        if len(handles) != len(ranges):
            raise ValueError(f"{len(handles)} actor handles for {len(ranges)} id ranges")
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every} must be >= 1")
        self._handles = list(handles)
        self._ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        self._ks = validate_ks(ks)
        self._flush_every = int(flush_every)
        self._fetch = resolve_label_fetch(label_fetch, self._ranges[-1][1], self._ks)
        self._pages = LabelPages(page_ids, max_pages)
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
        self._pages.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"handles": self._handles, "ranges": self._ranges, "ks": self._ks, "flush": self._flush_every,
                "fetch": self._fetch, "page_ids": self._pages.page_ids, "max_pages": self._pages.max_pages}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._handles = state["handles"]
        self._ranges = state["ranges"]
        self._ks = state["ks"]
        self._flush_every = state["flush"]
        self._fetch = state["fetch"]
        self._pages = LabelPages(state["page_ids"], state["max_pages"])
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
        label_fetch: str = "auto",
        page_ids: int = DEFAULT_PAGE_IDS,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> CoordinatorClient:
        """Creates the shard actors ``secu-coord-<run_id>-<i>`` (driver side; Ray must be initialised).

        Args:
            run_id: the run's stable id (actor names must be unique within the Ray namespace).
            num_samples: N; ids are [0, N).
            ks: clusters of each head.
            num_shards: shard actors, each owning a contiguous id range.
            true_labels: optional class of every id (< 0 unknown) for ACC/NMI/ARI in the epoch stats.
            flush_every: rows a client buffers before sending a write.
            label_fetch: ``auto``, ``all`` or ``pages`` (``LABEL_FETCH_MODES``).
            page_ids: ids per page of a paged lookup.
            max_pages: pages each client caches.

        Raises:
            ValueError: bad arguments, or actors of this run id exist already in the Ray namespace
                (deliberately no ``get_if_exists``: a leftover coordinator holds another attempt's state).
        """
        ks = validate_ks(ks)
        resolve_label_fetch(label_fetch, num_samples, ks)  # refuse a bad mode before creating actors
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
            ClusterCoordinatorActor.options(
                name=f"secu-coord-{run_id}-{i}", max_restarts=-1, max_task_retries=-1, num_cpus=0
            ).remote(lo, hi, ks, args[i])
            for i, (lo, hi) in enumerate(ranges)
        ]
        client = cls(handles, ranges, ks, flush_every, label_fetch=label_fetch, page_ids=page_ids,
                     max_pages=max_pages)
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
    def label_fetch(self) -> str:
        """``all`` or ``pages``: how this client reads the previous epoch's labels (``auto`` resolved)."""
        return self._fetch

    @property
    def cached_label_bytes(self) -> int:
        """Bytes of labels this client holds: its cached pages, or every shard's labels (``all``)."""
        return self._pages.nbytes + sum(a.nbytes for a in self._published)

    @property
    def page_fetches(self) -> int:
        """Pages this client fetched since it was made or unpickled (``label_fetch`` ``pages``)."""
        return self._pages.fetches

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
        """Makes the previous epoch's labels readable by ``labels_for``.

        ``label_fetch`` ``all``: fetches every shard's labels once (zero-copy on a node, read-only);
        ``pages``: checks the shards' epoch and empties the page cache (pages are fetched on first use).
        Waits up to ``timeout_s`` for shards still at an earlier epoch: a rank may get here before the
        rank that calls ``end_epoch`` has closed the previous epoch.

        Raises:
            StaleEpochError: a shard is past ``epoch``, or still behind it after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self._fetch == "all":
                published = self._publish()
                epochs = sorted({e for e, _ in published})
            else:
                epochs = sorted(set(ray.get([h.current_epoch.remote() for h in self._handles])))
            if epochs == [epoch]:
                break
            if epochs[-1] > epoch or time.monotonic() > deadline:
                raise StaleEpochError(
                    f"begin_epoch({epoch}) but the coordinator is at epoch(s) {epochs} "
                    f"(waited {timeout_s} s for end_epoch of the previous epoch)"
                )
            time.sleep(0.05)
        self._pages.clear()
        self._published = list(ray.get([ref for _, ref in published])) if self._fetch == "all" else []
        self._published_epoch = epoch

    def labels_for(self, sample_index_B: np.ndarray) -> np.ndarray:
        """Previous-epoch labels int64 [H, B] of the given ids (-1: none yet), looked up locally."""
        if self._published_epoch is None:
            raise ValueError("labels_for before begin_epoch: call begin_epoch(epoch) at every epoch start")
        ids_B = as_ids(sample_index_B)
        if self._fetch == "pages":
            return self._pages.lookup(ids_B, self._handles, self._ranges, self._published_epoch, len(self._ks))
        out_HB = np.empty((len(self._ks), ids_B.size), dtype=np.int64)
        for (lo, _), prev_HN, pos in zip(self._ranges, self._published, route(ids_B, self._ranges), strict=True):
            out_HB[:, pos] = prev_HN[:, ids_B[pos] - lo]
        return out_HB

    def write_async(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> None:
        """Buffers new labels; sends them without waiting once ``flush_every`` rows are buffered."""
        ids_B = as_ids(sample_index_B)
        labels_HB = as_labels(labels_HB, len(self._ks), ids_B.size)
        check_in_range(ids_B, self._ranges[0][0], self._ranges[-1][1])  # fail here, not at the next flush
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
        counters = per_head(counters, self._ks, "counters")
        duals = per_head(duals, self._ks, "duals")
        parts: list[ShardStats] = ray.get([h.sufficient_stats.remote(epoch) for h in self._handles])
        stats = combine_stats(parts, self._ks, counters)
        ray.get([h.commit_epoch.remote(epoch, counters, duals) for h in self._handles])
        return stats

    def recount(self, head: int) -> np.ndarray:
        """Global cluster sizes (int64 [K]) of the previous epoch's labels for one head."""
        return np.sum(ray.get([h.recount.remote(head) for h in self._handles]), axis=0).astype(np.int64)

    def state_dict(self) -> CoordinatorState:
        """Every shard's state, for the training checkpoint."""
        shards = ray.get([h.state_dict.remote() for h in self._handles])
        return CoordinatorState(ranges=tuple(self._ranges), ks=tuple(self._ks), shards=tuple(shards))

    def load_state_dict(self, state: CoordinatorState) -> None:
        """Restores every shard to the checkpointed epoch boundary (also after a shard restart)."""
        if list(state.ranges) != self._ranges or list(state.ks) != self._ks:
            raise ValueError(
                f"checkpointed coordinator has ranges {list(state.ranges)} and ks={list(state.ks)}; this one has "
                f"{self._ranges} and ks={self._ks}: create it with the same num_samples, num_shards and ks"
            )
        ray.get([h.load_state_dict.remote(s) for h, s in zip(self._handles, state.shards, strict=True)])
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
