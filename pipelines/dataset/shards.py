"""Writing one shard: a WebDataset tar of samples with sorted members, published atomically.

Shard format: members sorted by name; per sample ``<key>.<ext>`` (the original bytes of a file
source, or a PNG for array sources) and ``<key>.json`` = ``{"sample_index", "source", "label"}``.
``write_shard`` runs in a task (``pipelines.dataset.ingest`` plans the shards and commits them).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from pipelines.dataset.image_header import encode_png, probe_image
from pipelines.dataset.info import dataset_dir, sample_key, shard_name
from pipelines.dataset.sources import SourceItem
from pipelines.storage import Storage, join


@dataclass
class ShardPlan:
    """What one shard task writes."""

    number: int
    first_index: int
    items: list[SourceItem]
    exts: list[str]
    """Member extension per item (from the header check; ``png`` for array sources)."""

    @property
    def name(self) -> str:
        """The shard's file name (``shard-NNNNNN.tar``)."""
        return shard_name(self.number)


@dataclass
class ShardWritten:
    """What a shard task reports."""

    name: str
    count: int
    bytes: int
    formats: list[str] = field(default_factory=list)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(handle: IO[bytes], samples: Sequence[tuple[str, str, bytes, dict[str, Any]]]) -> None:
    """Write ``(key, ext, image bytes, json dict)`` samples as a WebDataset tar with sorted members."""
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, meta in sorted(samples, key=lambda s: s[0]):
            members = {f"{key}.{ext}": data, f"{key}.json": json.dumps(meta, sort_keys=True).encode()}
            for name in sorted(members):
                _add_member(tar, name, members[name])


def write_shard(storage: Storage, dataset: str, plan: ShardPlan, images: np.ndarray | None,
                tree: Storage | None) -> ShardWritten:
    """Write one shard: PNG-encode ``images`` (array sources) or copy the files of ``tree``."""
    samples = []
    for pos, item in enumerate(plan.items):
        if images is not None:
            data = encode_png(images[pos])
        else:
            assert tree is not None and isinstance(item.ref, str)
            data = tree.read_bytes(item.ref)
            try:
                probe_image(data)
            except ValueError as err:
                raise RuntimeError(
                    f"{item.source_id} changed while it was being ingested ({err}); re-run the ingest"
                ) from err
        meta = {"sample_index": plan.first_index + pos, "source": item.source_id, "label": item.label}
        samples.append((sample_key(plan.number, pos), plan.exts[pos], data, meta))
    rel = join(dataset_dir(dataset), "shards", plan.name)
    with storage.atomic_writer(rel) as handle:
        write_tar(handle, samples)
        size = handle.tell()
    return ShardWritten(plan.name, len(samples), int(size), sorted(set(plan.exts)))
