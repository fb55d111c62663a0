"""Ingest: turn a source (folder, bucket prefix, IDX, CIFAR, STL-10) into WebDataset shards.

One call appends the source's new items to ``datasets/<name>/`` (layout and commit protocol in
``pipelines.dataset.info``):

1. read ``dataset.json`` and the manifest; drop source items whose ``source_id`` is already there
   (re-running an ingest adds nothing twice; ``--limit N`` takes the source's first N items before
   this step, so a re-run with the same limit is a no-op too);
2. file sources only: check every new file in parallel, a full decode by the training decoder
   (``pipelines.dataset.file_check``: the reasons a file is skipped and the cost), so that
   ``sample_index`` can be assigned densely before writing; skipped files are counted per reason
   with a few example paths (``IngestResult``, the ingest's record in ``dataset.json``);
3. assign ``sample_index = num_samples, num_samples + 1, ...`` and cut shards of ``shard_size``
   (file sources are shuffled first, seeded, so that a shard mixes the class folders; array
   sources keep their order, so a fresh IDX/CIFAR/STL ingest has sample_index = source row);
4. write the shards in parallel, one Ray task per shard (each shard published atomically), with
   progress in the log (images done of total, rate, ETA);
5. commit: manifest, then ``dataset.json``.

A failed or interrupted ingest commits nothing; its shards are not referenced and the next ingest
writes over them. One ingest at a time per dataset: the ingest holds ``datasets/<name>/_ingest.lock``,
a ``pipelines.run_lock.StorageLock`` (created atomically, on local disks and on S3, with its owner and
an expiry); a second ingest into the same dataset fails with ``LockHeldError`` naming the holder. The
lock of an ingest that crashed expires after ``IngestOptions.lock_ttl_hours`` and is then taken over.

Shard format and writing: ``pipelines.dataset.shards``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.dataset.file_check import probe_files
from pipelines.dataset.info import (
    MANIFEST_SCHEMA,
    MAX_SHARD_SIZE,
    DatasetInfo,
    ShardInfo,
    commit,
    dataset_dir,
    empty_manifest,
    find_dataset_info,
    now_iso,
    read_manifest,
    sample_key,
)
from pipelines.dataset.label_names import merge_label_names
from pipelines.dataset.same_source import check_present_items_match
from pipelines.dataset.shards import ShardPlan, ShardWritten, write_shard
from pipelines.dataset.sources import ArraySource, FileTreeSource, Source, SourceItem
from pipelines.run_lock import LockHeldError, StorageLock
from pipelines.storage import Storage, join
from pipelines.tracking.ray_metrics import export_ingest

logger = logging.getLogger(__name__)

_LOCK = "_ingest.lock"
EXAMPLES_PER_REASON = 3
"""Source ids kept per skip reason in the result and in dataset.json."""


@dataclass
class IngestOptions:
    """How to cut and check the shards."""

    shard_size: int = 10_000
    """Samples per shard (the last shard of an ingest may hold fewer)."""
    max_pixels: int = 50_000_000
    """File sources: images with more pixels are skipped and counted."""
    limit: int | None = None
    """Take only the source's first N items (before skipping those already ingested)."""
    use_ray: bool | None = None
    """Run probe and shard tasks on Ray; None = when Ray is initialised."""
    max_in_flight: int | None = None
    """Shard tasks submitted at once; None = twice the cluster's CPUs."""
    lock_ttl_hours: float = 48.0
    """The dataset's ingest lock counts as abandoned (a crashed ingest) after this long; far longer than an
    ingest takes, so that a live ingest is never taken over."""

    def __post_init__(self) -> None:
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise ValueError(f"shard_size={self.shard_size} must lie in [1, {MAX_SHARD_SIZE}]")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels} must be positive")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0")
        if self.lock_ttl_hours <= 0:
            raise ValueError(f"lock_ttl_hours={self.lock_ttl_hours} must be positive")


@dataclass
class IngestResult:
    """What one ingest did."""

    dataset: str
    added: int
    already_present: int
    skipped: dict[str, int]
    """Files or items not ingested, by reason (``pipelines.dataset.file_check.SKIP_REASONS``)."""
    shards_added: list[str]
    num_samples: int
    """Samples in the dataset after the ingest."""
    seconds: float
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to ``EXAMPLES_PER_REASON`` source ids per skip reason."""


class Progress:
    """Logs ``done/total``, rate and ETA at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, what: str, total: int, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        """Count ``n`` more images done; log when ``every_s`` passed since the last line, or at the end."""
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("%s: %d/%d images (%.1f%%), %.0f images/s, ETA %.0f s", self.what, self.done,
                        self.total, 100.0 * self.done / max(self.total, 1), rate, eta)


# ---------------------------------------------------------------------------------------------
# Work done in tasks
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _run_tasks(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], sizes: Sequence[int],
               progress: Progress, use_ray: bool, max_in_flight: int | None,
               put_first: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None) -> list[Any]:
    """Run ``fn(*args)`` for every arg set, on Ray (bounded in flight) or inline; results in order."""
    results: list[Any] = [None] * len(arg_sets)
    if not use_ray:
        for i, args in enumerate(arg_sets):
            results[i] = fn(*(put_first(args) if put_first else args))
            progress.update(sizes[i])
        return results
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, int] = {}

    def collect(block_for: int) -> None:
        ready, _ = ray.wait(list(pending), num_returns=block_for)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            progress.update(sizes[i])

    try:
        for i, args in enumerate(arg_sets):
            if len(pending) >= limit:
                collect(1)
            prepared = put_first(args) if put_first else args
            pending[remote.remote(*prepared)] = i
        while pending:
            collect(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    return results


class Skips:
    """Items not ingested: the count per reason and the first ``EXAMPLES_PER_REASON`` source ids of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, ids: Sequence[str]) -> None:
        """Count ``ids`` under ``reason``; log the first few of each reason."""
        kept = self.examples.setdefault(reason, [])
        for source_id in ids[: max(0, EXAMPLES_PER_REASON - len(kept))]:
            logger.warning("ingest: skipping %s (%s)", source_id, reason)
            kept.append(source_id)
        self.counts[reason] += len(ids)


@contextlib.contextmanager
def ingest_lock(storage: Storage, dataset: str, ttl_hours: float) -> Iterator[StorageLock]:
    """Hold ``datasets/<dataset>/_ingest.lock`` while the block runs (taking over one older than ``ttl_hours``).

    Raises:
        LockHeldError: Another ingest into ``dataset`` holds the lock (the message names the holder).
    """
    lock = StorageLock(storage, join(dataset_dir(dataset), _LOCK), ttl_s=ttl_hours * 3600.0,
                       purpose=f"ingest into dataset {dataset}")
    try:
        lock.acquire()
    except LockHeldError as err:
        raise LockHeldError(f"another ingest into this dataset is running (a crashed one's lock lapses a few "
                            f"minutes after its last heartbeat): {err}") from None
    try:
        yield lock
    finally:
        lock.release()


def ingest(storage: Storage, dataset: str, source: Source, options: IngestOptions | None = None,
           *, source_spec: str = "", split: str = "") -> IngestResult:
    """Append the new items of ``source`` to dataset ``dataset`` under ``storage``."""
    options = options or IngestOptions()
    start = time.monotonic()
    storage.check_reachable()
    dataset_dir(dataset)  # validates the name
    use_ray = options.use_ray
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    with ingest_lock(storage, dataset, options.lock_ttl_hours):
        info = find_dataset_info(storage, dataset) or DatasetInfo(name=dataset, created=now_iso())
        manifest = read_manifest(storage, info) if info.num_samples else empty_manifest()
        present = set(manifest["source"].to_pylist())
        candidates = source.items[: options.limit] if options.limit is not None else source.items
        new_items = [it for it in candidates if it.source_id not in present]
        already = len(candidates) - len(new_items)
        if isinstance(source, ArraySource) and already:  # ids without the folder: same images, or refuse
            first_present = (it for it in candidates if it.source_id in present)
            if not check_present_items_match(storage, info, manifest, source, first_present, already, source_spec):
                logger.warning("ingest %s: none of the %d items already present could be compared with its stored "
                               "image (its shard is damaged?), so they are skipped unchecked", dataset, already)
        logger.info("ingest %s <- %s: %d items, %d already in the dataset, %d new", dataset,
                    source_spec or type(source).__name__, len(candidates), already, len(new_items))
        label_names, label_map = merge_label_names(info, source.label_names,
                                                   {it.source_id: it.label for it in source.items}, manifest)
        if label_map is not None:
            new_items = [SourceItem(it.source_id, None if it.label is None else label_map[it.label], it.ref)
                         for it in new_items]

        if isinstance(source, FileTreeSource):
            # Folders are listed class by class; shuffle (seeded by name and version, so a re-run after a
            # crash cuts the same shards) so that every shard, and so every streamed block, mixes classes.
            random.Random(f"{dataset}:{info.version}").shuffle(new_items)
        skips = Skips()
        for reason, ids in (source.skipped.items() if isinstance(source, FileTreeSource) else ()):
            skips.add(reason, ids)
        new_items, exts, channels = _usable_items(source, new_items, options, use_ray, skips)
        skipped = dict(skips.counts)
        if not new_items:
            if info.num_samples == 0 and not info.shards:
                raise ValueError(
                    f"source {source_spec or ''} has no usable images ({skipped}): check --source")
            if label_names != info.label_names:  # names for a dataset ingested without them
                info.label_names, info.version, info.updated = label_names, info.version + 1, now_iso()
                info.ingests.append({"source": source_spec, "split": split, "added": 0, "skipped": skipped,
                                     "skipped_examples": skips.examples, "shards": [], "time": info.updated,
                                     "label_names": "set"})
                commit(storage, info, manifest)
            logger.info("ingest %s: nothing new to add (dataset has %d samples)", dataset, info.num_samples)
            return export_ingest(IngestResult(dataset, 0, already, skipped, [], info.num_samples,
                                              time.monotonic() - start, skips.examples))

        plans = _plan_shards(new_items, exts, info, options.shard_size)
        written = _write_shards(storage, dataset, source, plans, options, use_ray)
        added = _manifest_rows(plans)
        info.shards.extend(ShardInfo(w.name, p.first_index, w.count, w.bytes)
                           for p, w in zip(plans, written, strict=True))
        info.num_samples += added.num_rows
        info.image_formats = sorted(set(info.image_formats) | {f for w in written for f in w.formats})
        info.channels = max(info.channels or 1, channels)
        info.label_names = label_names
        info.version += 1
        info.updated = now_iso()
        info.ingests.append({"source": source_spec, "split": split, "added": added.num_rows,
                             "skipped": skipped, "skipped_examples": skips.examples,
                             "shards": [w.name for w in written],
                             "time": info.updated})
        commit(storage, info, pa.concat_tables([manifest, added]))
    seconds = time.monotonic() - start
    logger.info("ingest %s: added %d images in %d shards (%d skipped: %s) in %.1f s; dataset has %d samples",
                dataset, added.num_rows, len(written), sum(skipped.values()), skipped, seconds,
                info.num_samples)
    return export_ingest(IngestResult(dataset, added.num_rows, already, skipped, [w.name for w in written],
                                      info.num_samples, seconds, skips.examples))  # Ray metrics (pipelines.tracking)


def _usable_items(source: Source, items: list[SourceItem], options: IngestOptions, use_ray: bool,
                  skips: Skips) -> tuple[list[SourceItem], list[str], int]:
    """The items to write, their member extensions and the channels; the others counted in ``skips``."""
    if isinstance(source, FileTreeSource):
        return _probe(source, items, options, use_ray, skips)
    pixels = int(np.prod(source.parts[0].images.shape[1:3])) if source.parts else 0
    if pixels > options.max_pixels:
        skips.add("too_large", [it.source_id for it in items])
        items = []
    return items, ["png"] * len(items), source.channels


def _plan_shards(items: list[SourceItem], exts: list[str], info: DatasetInfo, shard_size: int) -> list[ShardPlan]:
    """Cut ``items`` into shards of ``shard_size``, numbered and indexed after the dataset's existing ones."""
    plans = []
    first, number = info.num_samples, info.next_shard_number
    for lo in range(0, len(items), shard_size):
        chunk = items[lo: lo + shard_size]
        plans.append(ShardPlan(number, first, chunk, exts[lo: lo + shard_size]))
        first, number = first + len(chunk), number + 1
    return plans


def _manifest_rows(plans: list[ShardPlan]) -> pa.Table:
    """The manifest rows of the planned shards (``MANIFEST_SCHEMA``)."""
    rows = {
        "sample_index": [plan.first_index + i for plan in plans for i in range(len(plan.items))],
        "key": [sample_key(plan.number, i) for plan in plans for i in range(len(plan.items))],
        "shard": [plan.name for plan in plans for _ in plan.items],
        "label": [it.label for plan in plans for it in plan.items],
        "source": [it.source_id for plan in plans for it in plan.items],
    }
    return pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA)


def _probe(source: FileTreeSource, items: list[SourceItem], options: IngestOptions, use_ray: bool,
           skips: Skips) -> tuple[list[SourceItem], list[str], int]:
    chunks = [items[lo: lo + options.shard_size] for lo in range(0, len(items), options.shard_size)]
    progress = Progress("ingest: file check", len(items))
    results = _run_tasks(
        probe_files, [(source.root, [str(it.ref) for it in chunk], options.max_pixels) for chunk in chunks],
        [len(c) for c in chunks], progress, use_ray, options.max_in_flight,
    )
    kept, exts, channels = [], [], 1
    for chunk, headers in zip(chunks, results, strict=True):
        for item, header in zip(chunk, headers, strict=True):
            if isinstance(header, str):
                skips.add(header, [item.source_id])
                continue
            kept.append(item)
            exts.append(header.ext)
            channels = max(channels, header.channels)
    return kept, exts, channels


def _write_shards(storage: Storage, dataset: str, source: Source, plans: list[ShardPlan],
                  options: IngestOptions, use_ray: bool) -> list[ShardWritten]:
    progress = Progress(f"ingest {dataset}: shards", sum(len(p.items) for p in plans))
    tree = source.root if isinstance(source, FileTreeSource) else None

    def with_pixels(args: tuple[Any, ...]) -> tuple[Any, ...]:
        # Array sources: the driver cuts this shard's images out of the (possibly memory-mapped) arrays
        # just before submitting, so at most max_in_flight shards of pixels are held at once.
        if not isinstance(source, ArraySource):
            return args
        plan: ShardPlan = args[2]
        images = np.stack(source.rows([int(it.ref) for it in plan.items]))
        if use_ray:
            import ray

            return (*args[:3], ray.put(images), args[4])
        return (*args[:3], images, args[4])

    return _run_tasks(write_shard, [(storage, dataset, plan, None, tree) for plan in plans],
                      [len(p.items) for p in plans], progress, use_ray, options.max_in_flight,
                      put_first=with_pixels)
