"""Where assignment Parquet files live, how a new version is published, and how readers read one.

Layout of one output (``name`` is ``assignments`` for the run's own dataset, ``assignments-<dataset>``
for another one)::

    <root>/runs/<run_id>/<name>/part-00000.parquet ...   the published files
    <root>/runs/<run_id>/<name>/_SUCCESS                  JSON, written LAST: files, rows, checkpoint, ...
    <root>/runs/<run_id>/<name>/_staging-<attempt>/       an inference in progress (or a killed one)

Publish protocol (``publish``): an inference writes everything into its own staging prefix. Only
when that write finished and was verified does it (1) delete ``_SUCCESS``, so that from here on
the output reads as unpublished, (2) delete the previously published ``part-*`` files, (3) move the
staged files into place as ``part-00000.parquet``, ... and (4) write ``_SUCCESS`` (atomically) listing
them, then drops the staging prefix. A process killed at any point leaves either the old output
published, or no published output; never a mix, never duplicated rows. Re-running the inference
completes it. ``read_assignments`` reads exactly the files ``_SUCCESS`` lists and refuses an output
without it. Names starting with ``_`` are ignored by pyarrow/Spark dataset discovery, so the staging
prefix and the marker do not leak into ``pd.read_parquet(dir)`` either.

One inference per output at a time: a new attempt removes staging prefixes left by earlier ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.outputs.schema import assignment_schema, conform, infer_layout
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
STAGING_PREFIX = "_staging-"
PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
DEFAULT_NAME = "assignments"
MARKER_VERSION = 1
TEST_PAUSE_ENV = "SECU_TEST_INFER_PAUSE"
"""Test-only: ``staged`` or ``unpublished`` makes the process stop (sleep) at that point of
``publish`` so that a test can kill it there. Never set in real runs."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_output_name(name: str) -> str:
    """Return ``name`` if it can name an output directory under a run, else raise ValueError."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(
            f"output name {name!r} is not allowed: use letters, digits, '_', '-', '.' and do not start "
            "with '_' or '.' (e.g. assignments-newlake)"
        )
    if name in ("checkpoints", "report") or name.startswith(("report-", "metrics")):
        raise ValueError(f"output name {name!r} collides with another part of the run; pick another")
    return name


def output_dir(run_id: str, name: str = DEFAULT_NAME) -> str:
    """The output's directory relative to the storage root."""
    return join("runs", run_id, validate_output_name(name))


def default_output_name(dataset: str, train_dataset: str | None) -> str:
    """``assignments`` for the run's training dataset, ``assignments-<dataset>`` for any other."""
    if train_dataset is None or dataset == train_dataset:
        return DEFAULT_NAME
    return f"{DEFAULT_NAME}-{dataset}"


def new_attempt() -> str:
    """A fresh attempt id: sortable by time, unique across processes."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def staging_dir(out_rel: str, attempt: str) -> str:
    """The staging prefix of one attempt, relative to the storage root."""
    return join(out_rel, STAGING_PREFIX + attempt)


def _subdirs(storage: Storage, rel: str) -> list[str]:
    selector = pafs.FileSelector(storage.path(rel), recursive=False, allow_not_found=True)
    try:
        infos = storage.filesystem.get_file_info(selector)
    except FileNotFoundError:
        return []
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def delete_dir(storage: Storage, rel: str) -> None:
    """Remove directory ``rel`` and everything under it, if it exists."""
    if not rel.strip("/"):
        raise ValueError("refusing to delete the storage root")
    info = storage.filesystem.get_file_info(storage.path(rel))
    if info.type == pafs.FileType.Directory:
        storage.filesystem.delete_dir(storage.path(rel))
    elif info.type == pafs.FileType.NotFound and storage.is_s3:
        # S3 has no directories: objects under the prefix may still exist without a marker object.
        for entry in storage.list(rel, recursive=True):
            storage.delete(join(rel, entry.path))


def remove_stale_staging(storage: Storage, out_rel: str, keep: str | None = None) -> list[str]:
    """Delete staging prefixes of earlier (killed or failed) attempts; returns their names."""
    removed = []
    for name in _subdirs(storage, out_rel):
        if name.startswith(STAGING_PREFIX) and name != keep:
            delete_dir(storage, join(out_rel, name))
            removed.append(name)
    for entry in storage.list(out_rel, recursive=True):  # S3 prefixes without directory markers
        top = entry.path.split("/", 1)[0]
        if "/" in entry.path and top.startswith(STAGING_PREFIX) and top != keep:
            storage.delete(join(out_rel, entry.path))
            if top not in removed:
                removed.append(top)
    if removed:
        logger.info("removed %d stale staging prefix(es) under %s: %s", len(removed), storage.uri(out_rel), removed)
    return removed


def parquet_rows(storage: Storage, rel: str) -> int:
    """Rows of one Parquet file, from its footer."""
    with storage.filesystem.open_input_file(storage.path(rel)) as handle:
        return int(pq.read_metadata(handle).num_rows)


def staged_files(storage: Storage, staging_rel: str) -> list[str]:
    """Parquet files of a staging prefix, relative to it, in a stable order."""
    return [e.path for e in storage.list(staging_rel, recursive=True) if e.path.endswith(".parquet")]


def _test_pause(stage: str) -> None:
    if os.environ.get(TEST_PAUSE_ENV) == stage:
        print(f"SECU-TEST-PAUSE {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)


def publish(storage: Storage, out_rel: str, staging_rel: str, marker: dict[str, Any]) -> dict[str, Any]:
    """Replace the published output at ``out_rel`` by the files staged under ``staging_rel``.

    Args:
        storage: The storage root.
        out_rel: The output directory (``output_dir``).
        staging_rel: The attempt's staging prefix; removed afterwards.
        marker: Fields to record in ``_SUCCESS`` (run, checkpoint, dataset, ...); ``files``, ``rows``,
            ``published`` and ``marker_version`` are added here.

    Returns:
        The ``_SUCCESS`` content that was written.
    """
    staged = staged_files(storage, staging_rel)
    counts = [parquet_rows(storage, join(staging_rel, f)) for f in staged]
    _test_pause("staged")
    storage.delete(join(out_rel, SUCCESS_FILE))  # from here on the output reads as unpublished
    for entry in storage.list(out_rel):
        if PART_RE.match(entry.path):
            storage.delete(join(out_rel, entry.path))
    files = []
    width = max(5, len(str(max(len(staged) - 1, 0))))
    for i, (name, rows) in enumerate(zip(staged, counts, strict=True)):
        if i == len(staged) // 2:
            _test_pause("unpublished")
        final = f"part-{i:0{width}d}.parquet"
        storage.filesystem.move(storage.path(join(staging_rel, name)), storage.path(join(out_rel, final)))
        files.append({"path": final, "rows": rows})
    content = dict(marker) | {
        "marker_version": MARKER_VERSION,
        "files": files,
        "rows": sum(counts),
        "published": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    storage.write_bytes_atomic(join(out_rel, SUCCESS_FILE), (json.dumps(content, indent=1) + "\n").encode())
    delete_dir(storage, staging_rel)
    logger.info("published %d rows in %d files at %s", content["rows"], len(files), storage.uri(out_rel))
    return content


def read_marker(storage: Storage, run_id: str, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The ``_SUCCESS`` content of a published output.

    Raises:
        FileNotFoundError: If the output is not published (absent, in progress, or killed mid-way).
    """
    out_rel = output_dir(run_id, name)
    rel = join(out_rel, SUCCESS_FILE)
    if not storage.exists(rel):
        state = "in progress or interrupted" if storage.list(out_rel, recursive=True) else "absent"
        raise FileNotFoundError(
            f"no published assignments at {storage.uri(out_rel)} ({state}: {SUCCESS_FILE} is missing). Run "
            f"`python -m jobs.infer --storage {storage.root} --run-id {run_id}"
            + (f" --output-name {name}" if name != DEFAULT_NAME else "") + "` (again) to publish them"
        )
    marker: dict[str, Any] = json.loads(storage.read_bytes(rel).decode("utf-8"))
    if int(marker.get("marker_version", 0)) > MARKER_VERSION:
        raise ValueError(f"{storage.uri(rel)} was written by a newer secu-ray; upgrade to read it")
    return marker


def published_files(storage: Storage, run_id: str, name: str = DEFAULT_NAME) -> list[str]:
    """Locations (``s3://...`` or absolute paths) of the files of a published output, as ``_SUCCESS`` lists
    them: hand these to DuckDB, Spark or ``pyarrow.dataset`` when an output is too large for one table.

    Raises:
        FileNotFoundError: If the output is not published.
    """
    marker = read_marker(storage, run_id, name)
    return [storage.uri(output_dir(run_id, name), item["path"]) for item in marker["files"]]


def read_assignments(storage: Storage, run_id: str, name: str = DEFAULT_NAME,
                     columns: list[str] | None = None) -> pa.Table:
    """The published assignments of a run as one table (declared schema, or the chosen ``columns``).

    Reads exactly the files listed in ``_SUCCESS`` and checks their row count against it.

    Raises:
        FileNotFoundError: If the output is not published or a listed file is gone.
        ValueError: If the files disagree with ``_SUCCESS`` or with the declared schema.
    """
    marker = read_marker(storage, run_id, name)
    out_rel = output_dir(run_id, name)
    tables = []
    for item in marker["files"]:
        rel = join(out_rel, item["path"])
        if not storage.exists(rel):
            raise FileNotFoundError(
                f"{storage.uri(rel)} is listed in {SUCCESS_FILE} but missing: the output was modified by hand "
                "or a second inference is publishing; re-run the inference"
            )
        with storage.filesystem.open_input_file(storage.path(rel)) as handle:
            tables.append(pq.read_table(handle, columns=columns))
    schema = assignment_schema(int(marker["num_heads"]), marker.get("embedding_dim"))
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    table = pa.concat_tables([conform(t, schema) for t in tables]) if tables else schema.empty_table()
    if table.num_rows != int(marker["rows"]):
        raise ValueError(
            f"{storage.uri(out_rel)}: the files hold {table.num_rows} rows but {SUCCESS_FILE} says "
            f"{marker['rows']}; re-run the inference"
        )
    if columns is None:
        infer_layout(table.schema)  # a sanity check that this is an assignment table
    return table
