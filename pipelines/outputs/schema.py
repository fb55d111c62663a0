"""The Parquet schema of cluster assignments, declared once (architecture.md, "Assignment output").

One row per image. Columns, in this order:

| column | type | meaning |
|---|---|---|
| ``sample_index`` | int64 | the image's dense id, assigned at ingest (``manifest.parquet``) |
| ``key`` | string | its WebDataset key inside the shard |
| ``shard`` | string | the shard file it was read from (``shard-000003.tar``) |
| ``source`` | string | the image's original path or URI, as ingest recorded it in the manifest |
| | | (``s3://lake/cats/001.jpg``, ``/data/cats/001.jpg``, ``idx:train:12``); since schema version 2 |
| ``cluster_h{h}`` | int32 | per head h: argmax_k of z . C_h (spec section 7) |
| ``similarity_h{h}`` | float32 | per head: the cosine similarity z . C_h of the chosen cluster, in [-1, 1] |
| ``confidence_h{h}`` | float32 | per head: softmax(z . C_h / tw)[chosen], the probability of the chosen |
| | | cluster at the center temperature tw (``secu.tw``), in (0, 1] |
| ``embedding`` | fixed_size_list<float32>[D] | optional (``--with-embeddings``): the L2-normalised z |
| ``run_id`` | string | the training run |
| ``checkpoint`` | string | the checkpoint's location (``runs/<run>/checkpoints/checkpoint_...`` relative to |
| | | the storage root, or the path given with ``--checkpoint``) |
| ``checkpoint_epoch`` | int32 | the last completed training epoch of that checkpoint |

Why two scores: the cosine similarity is comparable across runs and heads (a geometric margin),
the softmax probability is what the center loss optimises and ranks images within one cluster by how
unambiguous they are; it depends on K and tw, so compare it within one head only.

Every column is non-nullable. Only standard Arrow types are used (no Ray tensor extension type), so
pyarrow, pandas, DuckDB and Spark read the files as they are.

Versions (``SCHEMA_VERSION``, recorded in every output's ``_SUCCESS`` as ``schema_version``): 1 had no
``source`` column; 2 added it after ``shard``. ``assignment_schema(..., version=1)`` gives the old layout so
that outputs written before the column existed still read (``pipelines.outputs.assignments``).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2
"""Incremented when columns are added or change meaning or type (2: ``source`` added)."""

SOURCE_COLUMN = "source"
SOURCE_SINCE_VERSION = 2
"""The first schema version with the ``source`` column."""
ID_COLUMNS = ("sample_index", "key", "shard", SOURCE_COLUMN)
PROVENANCE_COLUMNS = ("run_id", "checkpoint", "checkpoint_epoch")
EMBEDDING_COLUMN = "embedding"


def cluster_column(head: int) -> str:
    """Name of head ``head``'s cluster id column."""
    return f"cluster_h{head}"


def similarity_column(head: int) -> str:
    """Name of head ``head``'s cosine similarity column."""
    return f"similarity_h{head}"


def confidence_column(head: int) -> str:
    """Name of head ``head``'s softmax probability column."""
    return f"confidence_h{head}"


def assignment_schema(num_heads: int, embedding_dim: int | None = None, *,
                      version: int = SCHEMA_VERSION) -> pa.Schema:
    """The schema of assignment files for ``num_heads`` heads, with an embedding column if a dim is given.

    Args:
        num_heads: Heads of the model (one cluster, similarity and confidence column each).
        embedding_dim: Width of the ``embedding`` column; None for no such column.
        version: The schema version to describe (``SCHEMA_VERSION``, what inference writes now; 1 for
            outputs written before ``source`` existed).

    Raises:
        ValueError: If ``num_heads < 1``, ``embedding_dim < 1`` or ``version`` is not one this code knows.
    """
    if not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"assignment schema version {version} is unknown to this secu-ray (it knows 1 to "
                         f"{SCHEMA_VERSION}): upgrade to read this output")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    if embedding_dim is not None and embedding_dim < 1:
        raise ValueError(f"embedding_dim={embedding_dim} must be >= 1 (or None for no embedding column)")
    fields = [
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
    ]
    if version >= SOURCE_SINCE_VERSION:
        fields.append(pa.field(SOURCE_COLUMN, pa.string(), nullable=False))
    for h in range(num_heads):
        fields.append(pa.field(cluster_column(h), pa.int32(), nullable=False))
        fields.append(pa.field(similarity_column(h), pa.float32(), nullable=False))
        fields.append(pa.field(confidence_column(h), pa.float32(), nullable=False))
    if embedding_dim is not None:
        fields.append(pa.field(EMBEDDING_COLUMN, pa.list_(pa.field("item", pa.float32(), nullable=False),
                                                          embedding_dim), nullable=False))
    fields += [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("checkpoint_epoch", pa.int32(), nullable=False),
    ]
    return pa.schema(fields)


def infer_layout(schema: pa.Schema) -> tuple[int, int | None]:
    """``(num_heads, embedding_dim)`` of an assignment schema (the inverse of ``assignment_schema``).

    Raises:
        ValueError: If ``schema`` is not an assignment schema.
    """
    heads = 0
    while cluster_column(heads) in schema.names:
        heads += 1
    dim: int | None = None
    if EMBEDDING_COLUMN in schema.names:
        kind = schema.field(EMBEDDING_COLUMN).type
        if not pa.types.is_fixed_size_list(kind):
            raise ValueError(f"column {EMBEDDING_COLUMN!r} has type {kind}, expected fixed_size_list<float32>")
        dim = int(kind.list_size)
    if heads == 0:
        raise ValueError(f"not an assignment schema (no {cluster_column(0)!r} column): {schema.names}")
    return heads, dim


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, order and types.

    Raises:
        ValueError: If a column is missing or holds nulls where the schema forbids them.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"assignment table lacks columns {missing}; it has {table.column_names}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name!r} holds {column.null_count} nulls; it must be complete")
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)
