"""Writing an output: the inference lock, staging outside the published prefix, and the one-step publish.

Paths are those of ``pipelines.outputs.assignments`` (``runs/<run>/<name>`` published, version folders
under ``runs/<run>/_versions/<name>/``, attempts under ``runs/<run>/_staging/<name>/``).

Protocol, for an inference holding the output's lock (``output_lock``; a second inference of the same
output is refused with ``LockHeldError`` naming the holder, a lock whose process is gone is taken over):

1. ``remove_stale_staging``: attempts left by killed inferences are deleted;
2. the inference writes its files into ``_staging/<name>/<attempt>/`` and verifies them; nothing under the
   published prefix changes, so a reader of it sees the previous version (or nothing) the whole time;
3. ``publish``: the files get names unique to the version (``part-00000-<v>.parquet``), ``_SUCCESS`` is
   written next to them and the attempt becomes the version folder ``_versions/<name>/<attempt>/``;
4. the switch, one atomic step:

   - local or shared POSIX filesystem: the published prefix is a symbolic link; a new link to the new
     version folder is renamed over it (``rename(2)`` replaces the link atomically). At every instant the
     prefix is the old version or the new one, each whole. A reader that listed the old version and opens
     a file after the switch gets "file not found", never a file of the other version (the names differ).
     The first publish over an output written by older code (a real directory) moves that directory to
     ``_versions/<name>/legacy-<attempt>`` first: for that one moment the prefix is absent;
   - S3: a single PUT of ``runs/<run>/<name>/_SUCCESS``. An object is replaced whole (S3 is strongly
     consistent since 2020): a reader of ``_SUCCESS`` gets the old or the new marker, and each names a
     complete, unchanging version folder. S3 has no atomic switch of many objects, so the data files are
     never under the published prefix there: a glob of ``runs/<run>/<name>/*.parquet`` finds no files
     (DuckDB: "No files found"; ``pd.read_parquet`` of the prefix: an empty frame without columns), never
     a partial set. Readers on S3 go through ``_SUCCESS`` (``read_assignments``, ``published_files``, or
     its ``location``: a version folder that does not change);
5. version folders other than the new one and the one it replaced are deleted (the replaced one is kept
   until the next publish, so that a reader that started from the previous ``_SUCCESS`` can finish).

A process killed at any step leaves the old version published (steps 1-4) or the new one (after 4);
running the inference again completes it. Why not Delta Lake or another table format with atomic
commits: readers would need a Delta-aware reader, a plain Parquet glob of a Delta table also reads files
that commits removed (so it does not protect glob readers either), and its atomic commits on S3 need
conditional writes or a lock service; one writer at a time (the lock) and a one-object pointer give readers
of ``_SUCCESS`` the same guarantee with plain Parquet, and local readers a plain directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.outputs.assignments import (
    MARKER_VERSION,
    SUCCESS_FILE,
    split_output_dir,
    staging_root,
    versions_dir,
)
from pipelines.run_lock import StorageLock
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)

LOCK_TTL_S = 7 * 24 * 3600.0
"""The longest an inference may hold its lock. A holder renews it every 30 s (``pipelines.run_lock``): a lock
silent for 5 minutes, or one on this host whose process is gone (``holder_is_gone``), is taken over at once."""
LEGACY_STAGING_PREFIX = "_staging-"
"""Where older code staged attempts: inside the published prefix."""
TEST_PAUSE_ENV = "SECU_TEST_INFER_PAUSE"
"""Test-only: ``staged`` (attempt written, nothing published) or ``versioned`` (the version folder complete,
the switch not made) makes the process stop (sleep) there so that a test can kill it. Never set in real runs."""


def new_attempt() -> str:
    """A fresh attempt id: sortable by time, unique across processes."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def staging_dir(out_rel: str, attempt: str) -> str:
    """The staging folder of one attempt (``runs/<run>/_staging/<name>/<attempt>``), relative to the root."""
    return join(staging_root(out_rel), attempt)


def lock_path(out_rel: str) -> str:
    """The lock object of an output (``runs/<run>/_infer-<name>.lock``)."""
    parent, name = split_output_dir(out_rel)
    return join(parent, f"_infer-{name}.lock")


def output_lock(storage: Storage, out_rel: str, purpose: str) -> StorageLock:
    """The lock that one inference of ``out_rel`` holds from before staging until after publishing."""
    return StorageLock(storage, lock_path(out_rel), ttl_s=LOCK_TTL_S, purpose=purpose)


def _subdirs(storage: Storage, rel: str) -> list[str]:
    selector = pafs.FileSelector(storage.path(rel), recursive=False, allow_not_found=True)
    try:
        infos = storage.filesystem.get_file_info(selector)
    except FileNotFoundError:
        return []
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def _local_entries(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(entry.name for entry in entries)
    except FileNotFoundError:
        return []


def delete_dir(storage: Storage, rel: str) -> None:
    """Remove ``rel`` and everything under it, if it exists (a symbolic link: only the link, never its target)."""
    if not rel.strip("/"):
        raise ValueError("refusing to delete the storage root")
    path = storage.path(rel)
    if not storage.is_s3:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        return
    info = storage.filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        storage.filesystem.delete_dir(path)
    elif info.type == pafs.FileType.NotFound:
        # S3 has no directories: objects under the prefix may still exist without a marker object.
        for entry in storage.list(rel, recursive=True):
            storage.delete(join(rel, entry.path))


def remove_stale_staging(storage: Storage, out_rel: str) -> list[str]:
    """Delete attempts left by killed or failed inferences (call it holding ``output_lock``); returns them."""
    root = staging_root(out_rel)
    if storage.is_s3:
        removed = sorted({e.path.split("/", 1)[0] for e in storage.list(root, recursive=True)})
    else:  # os.scandir also finds a dangling link (a publish killed inside ``_swap_link``), pyarrow does not
        removed = _local_entries(storage.path(root))
    for name in removed:
        delete_dir(storage, join(root, name))
    if _is_legacy_dir(storage, out_rel):  # older code staged inside the published prefix
        legacy = {e.path.split("/", 1)[0] for e in storage.list(out_rel, recursive=True)
                  if e.path.startswith(LEGACY_STAGING_PREFIX)} | {
                  d for d in _subdirs(storage, out_rel) if d.startswith(LEGACY_STAGING_PREFIX)}
        for name in sorted(legacy):
            delete_dir(storage, join(out_rel, name))
        removed += sorted(legacy)
    if removed:
        logger.info("removed %d stale staging folder(s) of %s: %s", len(removed), storage.uri(out_rel), removed)
    return removed


def _is_legacy_dir(storage: Storage, out_rel: str) -> bool:
    """True when the published prefix is a real local directory or an S3 prefix with more than ``_SUCCESS``."""
    if storage.is_s3:
        return any(e.path != SUCCESS_FILE for e in storage.list(out_rel, recursive=True))
    path = storage.path(out_rel)
    return os.path.isdir(path) and not os.path.islink(path)


def parquet_rows(storage: Storage, rel: str) -> int:
    """Rows of one Parquet file, from its footer."""
    with storage.filesystem.open_input_file(storage.path(rel)) as handle:
        return int(pq.read_metadata(handle).num_rows)


def staged_files(storage: Storage, staging_rel: str) -> list[str]:
    """Parquet files of a staging folder, relative to it, in a stable order."""
    return [e.path for e in storage.list(staging_rel, recursive=True) if e.path.endswith(".parquet")]


def verify_staged(storage: Storage, staging_rel: str, num_samples: int) -> int:
    """Check the staged files: every sample_index in [0, num_samples) at most once. Returns the rows.

    Uses one byte per sample of memory (a bitmap over the dense ids), reading only that column.

    Raises:
        RuntimeError: On duplicate or out-of-range ids (a bug, or the dataset changed under the job).
    """
    seen = np.zeros(num_samples, dtype=bool)
    rows = 0
    for name in staged_files(storage, staging_rel):
        with storage.filesystem.open_input_file(storage.path(join(staging_rel, name))) as handle:
            ids = pq.read_table(handle, columns=["sample_index"])["sample_index"].to_numpy()
        rows += ids.size
        if ids.size and (ids.min() < 0 or ids.max() >= num_samples):
            raise RuntimeError(
                f"{name} holds sample_index outside [0, {num_samples}): the dataset changed while the "
                "inference ran; re-run it"
            )
        if seen[ids].any() or np.unique(ids).size != ids.size:
            raise RuntimeError(f"{name}: duplicate sample_index values in the staged output; re-run the inference")
        seen[ids] = True
    return rows


def _test_pause(stage: str) -> None:
    if os.environ.get(TEST_PAUSE_ENV) == stage:
        print(f"SECU-TEST-PAUSE {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)


# The storage steps of ``publish``, one function each, so that a test can stop the protocol at any of them.

def _rename(storage: Storage, src_rel: str, dst_rel: str) -> None:
    """Move a file (or, locally, a whole directory) within the storage root."""
    if storage.is_s3:
        storage.filesystem.move(storage.path(src_rel), storage.path(dst_rel))
        return
    os.makedirs(os.path.dirname(storage.path(dst_rel)), exist_ok=True)
    os.rename(storage.path(src_rel), storage.path(dst_rel))


def _swap_link(storage: Storage, link_rel: str, target_rel: str, tmp_rel: str) -> None:
    """Point the local symbolic link ``link_rel`` at ``target_rel`` in one ``rename(2)`` (``tmp_rel`` is the
    new link's name until then)."""
    link = storage.path(link_rel)
    target = os.path.relpath(storage.path(target_rel), os.path.dirname(link))
    tmp = storage.path(tmp_rel)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)


def current_version(storage: Storage, out_rel: str) -> str | None:
    """The version the published prefix shows now (None: nothing published, or published by older code)."""
    if not storage.is_s3:
        path = storage.path(out_rel)
        return os.path.basename(os.readlink(path)) if os.path.islink(path) else None
    try:
        marker = json.loads(storage.read_bytes(join(out_rel, SUCCESS_FILE)).decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return str(marker["version"]) if isinstance(marker, dict) and marker.get("version") else None


def publish(storage: Storage, out_rel: str, staging_rel: str, marker: dict[str, Any]) -> dict[str, Any]:
    """Make the files staged under ``staging_rel`` the published version of ``out_rel`` (protocol above).

    Args:
        storage: The storage root.
        out_rel: The published prefix (``output_dir``).
        staging_rel: The attempt's staging folder (``staging_dir``); it becomes the version folder.
        marker: Fields to record in ``_SUCCESS`` (run, checkpoint, dataset, ...); ``files``, ``rows``,
            ``version``, ``location``, ``previous_version``, ``published`` and ``marker_version`` are added here.

    Returns:
        The ``_SUCCESS`` content that was written.
    """
    staged = staged_files(storage, staging_rel)
    counts = [parquet_rows(storage, join(staging_rel, f)) for f in staged]
    version = staging_rel.rstrip("/").rpartition("/")[2]
    unique = version.rpartition("-")[2] or version
    width = max(5, len(str(max(len(staged) - 1, 0))))
    final = [f"part-{i:0{width}d}-{unique}.parquet" for i in range(len(staged))]
    previous = current_version(storage, out_rel)
    location = join(versions_dir(out_rel), version)
    content = dict(marker) | {
        "marker_version": MARKER_VERSION,
        "version": version,
        "location": location,
        "previous_version": previous,
        "files": [{"path": name, "rows": rows} for name, rows in zip(final, counts, strict=True)],
        "rows": sum(counts),
        "published": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    data = (json.dumps(content, indent=1) + "\n").encode()
    _test_pause("staged")
    if storage.is_s3:
        for name, target in zip(staged, final, strict=True):
            _rename(storage, join(staging_rel, name), join(location, target))
        storage.write_bytes_atomic(join(location, SUCCESS_FILE), data)
        _test_pause("versioned")
        storage.write_bytes_atomic(join(out_rel, SUCCESS_FILE), data)  # the switch
        if _is_legacy_dir(storage, out_rel):  # files of an output written by older code
            for entry in storage.list(out_rel, recursive=True):
                if entry.path != SUCCESS_FILE:
                    storage.delete(join(out_rel, entry.path))
        delete_dir(storage, staging_rel)
    else:
        for name, target in zip(staged, final, strict=True):
            _rename(storage, join(staging_rel, name), join(staging_rel, target))
        storage.write_bytes_atomic(join(staging_rel, SUCCESS_FILE), data)
        _rename(storage, staging_rel, location)
        _test_pause("versioned")
        if _is_legacy_dir(storage, out_rel):
            previous = f"legacy-{version}"
            _rename(storage, out_rel, join(versions_dir(out_rel), previous))
        _swap_link(storage, out_rel, location, join(staging_root(out_rel), f"link-{version}"))  # the switch
    for old in _subdirs(storage, versions_dir(out_rel)):
        if old not in (version, previous):
            delete_dir(storage, join(versions_dir(out_rel), old))
    logger.info("published %d rows in %d files at %s (version %s)", content["rows"], len(final),
                storage.uri(out_rel), version)
    return content
