"""The on-storage layout of one ingested dataset, and its commit protocol.

```
<root>/datasets/<name>/shards/shard-000000.tar   WebDataset tars, members sorted, keys unique
<root>/datasets/<name>/manifest.parquet          one row per sample (MANIFEST_SCHEMA)
<root>/datasets/<name>/dataset.json              DatasetInfo: the commit point
```

``dataset.json`` is the commit point. A commit writes the manifest first and ``dataset.json`` last,
each atomically (``Storage.write_bytes_atomic``), so a reader that starts from ``dataset.json`` sees
either the old or the new dataset: manifest rows and shards that ``dataset.json`` does not list (a
crash between the two writes, or a failed ingest) are ignored and are overwritten by the next ingest.

Sample ids: ``sample_index`` is dense (0..num_samples-1), assigned once at ingest and never reused;
shard ``n`` holds the contiguous range ``[first_index, first_index + count)``. The key of the sample
at position ``p`` of shard ``n`` is ``s{n:06d}_{p:07d}`` (unique across the dataset, dot-free).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import Storage, join

FORMAT_VERSION = 1
"""Version of the dataset.json layout written by this code."""

MAX_SHARD_SIZE = 9_999_999
"""Keys give a sample's position in its shard seven digits."""

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ]
)
"""Columns of ``manifest.parquet``; ``label`` is null where unknown, ``source`` is the item's identity."""

_KEY_RE = re.compile(r"^s(\d{6})_(\d{7})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it is usable as a directory name, else raise."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(
            f"dataset name {name!r} is not allowed: use letters, digits, '_', '-', '.' (e.g. fmnist)"
        )
    return name


def dataset_dir(name: str) -> str:
    """The dataset's directory relative to the storage root."""
    return join("datasets", validate_dataset_name(name))


def shard_name(number: int) -> str:
    """File name of shard ``number``."""
    return f"shard-{number:06d}.tar"


def sample_key(shard_number: int, position: int) -> str:
    """The WebDataset key of the sample at ``position`` in shard ``shard_number``."""
    if not 0 <= position <= MAX_SHARD_SIZE or not 0 <= shard_number <= 999_999:
        raise ValueError(f"shard {shard_number} / position {position} out of the key range")
    return f"s{shard_number:06d}_{position:07d}"


def parse_key(key: str) -> tuple[int, int] | None:
    """``(shard_number, position)`` of a key written by ``sample_key``, or None for foreign keys."""
    match = _KEY_RE.match(key)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def now_iso() -> str:
    """UTC time stamp for dataset.json."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ShardInfo:
    """One committed shard."""

    name: str
    """File name under ``shards/``, e.g. ``shard-000003.tar``."""
    first_index: int
    """sample_index of its first sample; the shard holds ``[first_index, first_index + count)``."""
    count: int
    """Number of samples."""
    bytes: int
    """Size of the tar in bytes (a truncated or replaced shard is detected by comparing sizes)."""


@dataclass
class DatasetInfo:
    """The content of ``dataset.json``."""

    name: str
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    image_formats: list[str] = field(default_factory=list)
    """Sorted image encodings present (member extensions: png, jpg, ...)."""
    channels: int | None = None
    """1 when every image is single-channel, 3 otherwise; None before the first ingest."""
    label_names: list[str] | None = None
    """Name of each integer label where the source had names (class folders, CIFAR meta), else None."""
    version: int = 0
    """Incremented by every commit."""
    format_version: int = FORMAT_VERSION
    created: str = ""
    updated: str = ""
    ingests: list[dict[str, Any]] = field(default_factory=list)
    """One record per committed ingest: source, split, samples added, shards added, time."""

    @property
    def image_format(self) -> str:
        """The single image encoding, or ``mixed``."""
        if len(self.image_formats) == 1:
            return self.image_formats[0]
        return "mixed" if self.image_formats else "none"

    @property
    def next_shard_number(self) -> int:
        """Number of the next shard an ingest will write."""
        if not self.shards:
            return 0
        return max(int(s.name[len("shard-"):-len(".tar")]) for s in self.shards) + 1

    def to_json(self) -> str:
        """Serialise (with the derived ``image_format`` for readers of the file)."""
        data = asdict(self)
        data["image_format"] = self.image_format
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        """Parse dataset.json; raise ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"dataset.json is not valid JSON ({err}): re-run the ingest") from err
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"dataset.json has format_version {data['format_version']}, newer than this code "
                f"({FORMAT_VERSION}): upgrade secu-ray"
            )
        data.pop("image_format", None)
        shards = [ShardInfo(**s) for s in data.pop("shards", [])]
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"dataset.json has unknown fields {extra}: upgrade secu-ray")
        info = cls(shards=shards, **data)
        expected = 0
        for shard in info.shards:
            if shard.first_index != expected:
                raise ValueError(
                    f"dataset.json: shard {shard.name} starts at {shard.first_index}, expected {expected}; "
                    "the file was edited by hand or is corrupt"
                )
            expected += shard.count
        if expected != info.num_samples:
            raise ValueError(
                f"dataset.json: shards hold {expected} samples but num_samples={info.num_samples}; "
                "the file was edited by hand or is corrupt"
            )
        return info


def find_dataset_info(storage: Storage, name: str) -> DatasetInfo | None:
    """Read ``datasets/<name>/dataset.json``; None when the dataset does not exist yet."""
    rel = join(dataset_dir(name), "dataset.json")
    if not storage.exists(rel):
        return None
    return DatasetInfo.from_json(storage.read_bytes(rel).decode("utf-8"))


def load_dataset_info(storage: Storage, name: str) -> DatasetInfo:
    """Read ``datasets/<name>/dataset.json``; FileNotFoundError names the ingest command to run."""
    info = find_dataset_info(storage, name)
    if info is None:
        raise FileNotFoundError(
            f"no dataset {name!r} under {storage.uri('datasets')}: run `python -m jobs.ingest "
            f"--source SRC --dataset {name} --storage {storage.root}` first"
        )
    return info


def empty_manifest() -> pa.Table:
    """A manifest with no rows."""
    return MANIFEST_SCHEMA.empty_table()


def read_manifest(storage: Storage, info: DatasetInfo) -> pa.Table:
    """The committed manifest rows (rows beyond ``info.num_samples`` are uncommitted and dropped)."""
    rel = join(dataset_dir(info.name), "manifest.parquet")
    if info.num_samples == 0 and not storage.exists(rel):
        return empty_manifest()
    table = pq.read_table(io.BytesIO(storage.read_bytes(rel))).cast(MANIFEST_SCHEMA)
    table = table.filter(pc.less(table["sample_index"], info.num_samples))
    if table.num_rows != info.num_samples:
        raise ValueError(
            f"{storage.uri(rel)} has {table.num_rows} committed rows but dataset.json says "
            f"{info.num_samples}: the dataset is corrupt; re-ingest it into a new name"
        )
    return table.sort_by("sample_index")


def commit(storage: Storage, info: DatasetInfo, manifest: pa.Table) -> None:
    """Publish a new version: manifest first, dataset.json last (the commit point)."""
    assert manifest.num_rows == info.num_samples, (manifest.num_rows, info.num_samples)
    buf = io.BytesIO()
    pq.write_table(manifest.cast(MANIFEST_SCHEMA), buf, compression="zstd")
    base = dataset_dir(info.name)
    storage.write_bytes_atomic(join(base, "manifest.parquet"), buf.getvalue())
    storage.write_bytes_atomic(join(base, "dataset.json"), info.to_json().encode("utf-8"))


def load_manifest_labels(storage: Storage, name: str, num_samples: int | None = None) -> np.ndarray:
    """Labels by sample_index as int64 (-1 where unknown), e.g. for evaluation against true classes.

    ``num_samples`` (if given) must equal the committed count, so that callers holding an older
    DatasetInfo notice a concurrent append.
    """
    info = load_dataset_info(storage, name)
    if num_samples is not None and num_samples != info.num_samples:
        raise ValueError(
            f"dataset {name!r} now has {info.num_samples} samples, not {num_samples}: it was appended to "
            "while this job ran; restart the job"
        )
    table = read_manifest(storage, info)
    labels = table["label"].fill_null(-1).to_numpy().astype(np.int64)
    return np.asarray(labels)
