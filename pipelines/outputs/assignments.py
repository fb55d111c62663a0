"""Where the assignment Parquet files of an output live, and how readers read a published one.

Layout of one output (``name`` is ``assignments`` for the run's own dataset, ``assignments-<dataset>``
for another one), relative to the storage root::

    runs/<run>/<name>                          the published prefix (what readers open or glob)
    runs/<run>/_versions/<name>/<version>/     one published version: part-00000-<v>.parquet ... and _SUCCESS;
                                               never modified once complete
    runs/<run>/_staging/<name>/<attempt>/      an inference in progress (or a killed one); never read
    runs/<run>/_infer-<name>.lock              held by the inference that writes the output

On a local (or shared POSIX) filesystem the published prefix is a symbolic link to the current version
folder, so ``runs/<run>/<name>/*.parquet`` and ``pd.read_parquet("runs/<run>/<name>")`` see exactly the
files of one version. On S3 it holds one object, ``_SUCCESS``, a copy of the current version's marker;
the files stay in the version folder (S3 cannot switch many objects at once: see
``pipelines.outputs.publish`` for the protocol and what holds where).

``_SUCCESS`` (JSON) names the version (``version``), its folder (``location``), every file with its row
count, the rows, the dataset, checkpoint, heads and options. Readers here (``read_marker``,
``published_files``, ``read_assignments``) start from it and refuse an output without one. Outputs written
before versions existed (marker version 1: files next to ``_SUCCESS`` in the prefix itself, no
``source`` column) still read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.outputs.schema import SOURCE_COLUMN, SOURCE_SINCE_VERSION, assignment_schema, conform, infer_layout
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
DEFAULT_NAME = "assignments"
MARKER_VERSION = 2
"""Layout of ``_SUCCESS``: 1 = files listed relative to the published prefix; 2 = ``version`` and
``location`` (the version folder the listed files live in)."""
VERSIONS_DIR = "_versions"
STAGING_DIR = "_staging"

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
    """The output's published prefix relative to the storage root (``runs/<run>/<name>``)."""
    return join("runs", run_id, validate_output_name(name))


def split_output_dir(out_rel: str) -> tuple[str, str]:
    """``(runs/<run>, name)`` of a published prefix."""
    parent, _, name = out_rel.rstrip("/").rpartition("/")
    return parent, validate_output_name(name)


def versions_dir(out_rel: str) -> str:
    """The folder holding the output's version folders (``runs/<run>/_versions/<name>``)."""
    parent, name = split_output_dir(out_rel)
    return join(parent, VERSIONS_DIR, name)


def staging_root(out_rel: str) -> str:
    """The folder holding the output's in-progress attempts (``runs/<run>/_staging/<name>``)."""
    parent, name = split_output_dir(out_rel)
    return join(parent, STAGING_DIR, name)


def default_output_name(dataset: str, train_dataset: str | None) -> str:
    """``assignments`` for the run's training dataset, ``assignments-<dataset>`` for any other."""
    if train_dataset is None or dataset == train_dataset:
        return DEFAULT_NAME
    return f"{DEFAULT_NAME}-{dataset}"


def files_location(marker: dict[str, Any], out_rel: str) -> str:
    """The folder (relative to the root) that holds the files a ``_SUCCESS`` lists."""
    return str(marker.get("location") or out_rel)


def read_marker(storage: Storage, run_id: str, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The ``_SUCCESS`` content of a published output.

    Raises:
        FileNotFoundError: If the output is not published (absent, in progress, or killed mid-way).
        ValueError: If a newer secu-ray wrote it.
    """
    out_rel = output_dir(run_id, name)
    rel = join(out_rel, SUCCESS_FILE)
    if not storage.exists(rel):
        started = storage.list(out_rel, recursive=True) or storage.list(staging_root(out_rel), recursive=True)
        state = "in progress or interrupted" if started else "absent"
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
    """Locations (``s3://...`` or absolute paths) of the files of the published version, as ``_SUCCESS`` lists
    them: hand these to DuckDB, Spark or ``pyarrow.dataset`` (on S3 this is the way to read the files: the
    published prefix holds only ``_SUCCESS`` there). They lie in the version folder, which stays unchanged
    until the version after the next one is published.

    Raises:
        FileNotFoundError: If the output is not published.
    """
    marker = read_marker(storage, run_id, name)
    location = files_location(marker, output_dir(run_id, name))
    return [storage.uri(location, item["path"]) for item in marker["files"]]


def marker_schema(marker: dict[str, Any]) -> pa.Schema:
    """The declared schema of the files a ``_SUCCESS`` describes (its heads, embedding and schema version)."""
    return assignment_schema(int(marker["num_heads"]), marker.get("embedding_dim"),
                             version=int(marker.get("schema_version", 1)))


def read_assignments(storage: Storage, run_id: str, name: str = DEFAULT_NAME,
                     columns: list[str] | None = None) -> pa.Table:
    """The published assignments of a run as one table (its declared schema, or the chosen ``columns``).

    Reads exactly the files listed in ``_SUCCESS`` and checks their row count against it. An output
    written before the ``source`` column existed reads in its own (version 1) schema; asking for
    ``source`` there looks every row's source up in the dataset's manifest.

    Raises:
        FileNotFoundError: If the output is not published or a listed file is gone.
        ValueError: If the files disagree with ``_SUCCESS`` or with the declared schema, or a column is unknown.
    """
    marker = read_marker(storage, run_id, name)
    out_rel = output_dir(run_id, name)
    location = files_location(marker, out_rel)
    declared = marker_schema(marker)
    fill_source = columns is not None and SOURCE_COLUMN in columns and SOURCE_COLUMN not in declared.names
    if columns is not None:
        unknown = [c for c in columns if c not in declared.names and not (c == SOURCE_COLUMN and fill_source)]
        if unknown:
            raise ValueError(f"{storage.uri(out_rel)} has no columns {unknown}; it has {declared.names}")
    wanted = None if columns is None else [c for c in columns if c in declared.names]
    if fill_source and wanted is not None and "sample_index" not in wanted:
        wanted.append("sample_index")
    tables = []
    for rel in _listed_files(storage, marker, location):
        with storage.filesystem.open_input_file(storage.path(rel)) as handle:
            tables.append(pq.read_table(handle, columns=wanted))
    schema = declared if wanted is None else pa.schema([declared.field(c) for c in wanted])
    table = pa.concat_tables([conform(t, schema) for t in tables]) if tables else schema.empty_table()
    if table.num_rows != int(marker["rows"]):
        raise ValueError(
            f"{storage.uri(out_rel)}: the files hold {table.num_rows} rows but {SUCCESS_FILE} says "
            f"{marker['rows']}; re-run the inference"
        )
    if fill_source:
        table = _with_source_from_manifest(storage, table, marker)
    if columns is None:
        infer_layout(table.schema)  # a sanity check that this is an assignment table
        return table
    return table.select(columns)


def _listed_files(storage: Storage, marker: dict[str, Any], location: str) -> Iterator[str]:
    """The storage paths of the files ``_SUCCESS`` lists, in its order; FileNotFoundError for one that is gone."""
    for item in marker["files"]:
        rel = join(location, item["path"])
        if not storage.exists(rel):
            raise FileNotFoundError(
                f"{storage.uri(rel)} is listed in {SUCCESS_FILE} but missing: two newer versions were published "
                "while this read ran, or the output was modified by hand; read again (or re-run the inference)"
            )
        yield rel


def read_assignment_rows(storage: Storage, run_id: str, name: str, column: str, rows: np.ndarray) -> pa.Array:
    """``column`` at row positions ``rows`` (of ``read_assignments``' order, in the order given), reading only
    the Parquet row groups that hold them: the report's map takes a few thousand embeddings of an output that
    may hold a billion rows (512 bytes each at D = 128), where reading the whole column would not fit.

    Raises:
        FileNotFoundError: If the output is not published or a listed file is gone.
        ValueError: If ``column`` is unknown, a row is out of range, or the files disagree with ``_SUCCESS``.
    """
    marker = read_marker(storage, run_id, name)
    out_rel = output_dir(run_id, name)
    location = files_location(marker, out_rel)
    declared = marker_schema(marker)
    if column not in declared.names:
        raise ValueError(f"{storage.uri(out_rel)} has no column {column!r}; it has {declared.names}")
    rows = np.asarray(rows, dtype=np.int64)
    total = int(marker["rows"])
    if rows.size and (rows.min() < 0 or rows.max() >= total):
        raise ValueError(f"rows {rows.min()}..{rows.max()} are outside the {total} rows of {storage.uri(out_rel)}")
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    pieces, offset = [], 0
    for rel in _listed_files(storage, marker, location):
        with storage.filesystem.open_input_file(storage.path(rel)) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(wanted, [offset, offset + n])
                if hi > lo:
                    part = parquet.read_row_group(group, columns=[column]).column(column)
                    pieces.append(part.take(pa.array(wanted[lo:hi] - offset)))
                offset += n
    if offset != total:
        raise ValueError(f"{storage.uri(out_rel)}: the files hold {offset} rows but {SUCCESS_FILE} says {total}; "
                         "re-run the inference")
    taken = pa.chunked_array(pieces, type=declared.field(column).type).combine_chunks()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return taken.take(pa.array(inverse))


def _with_source_from_manifest(storage: Storage, table: pa.Table, marker: dict[str, Any]) -> pa.Table:
    """``table`` with a ``source`` column looked up in the manifest of the output's dataset."""
    from pipelines.outputs.image_sources import load_source_lookup

    dataset = str(marker["dataset"])
    logger.info("this output was written with schema version %s (before version %d added %r): looking the "
                "sources up in dataset %s's manifest", marker.get("schema_version", 1), SOURCE_SINCE_VERSION,
                SOURCE_COLUMN, dataset)
    sources = load_source_lookup(storage, dataset).take(table["sample_index"].to_numpy())
    return table.append_column(pa.field(SOURCE_COLUMN, pa.string(), nullable=False), sources)
