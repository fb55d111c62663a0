"""Whether the items of an array source that a dataset "already holds" are really the same images.

The ids of array sources name the split and the row only (``idx:train:12345``, ``cifar10:data_batch_1:7``), not
the folder: MNIST and Fashion-MNIST ship the same IDX file names, so after ``idx:/data/fashion-mnist`` an ingest
of ``idx:/data/mnist`` into the same dataset would find all 60,000 of its ids present and add nothing, without
an error. Ingest therefore compares a few of the present items' stored images (decoded from their shard) with
the source's pixels before it skips them; a difference stops the ingest with the fix. Folder and bucket
sources are not checked: their ids are absolute paths or ``s3://`` keys.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines.dataset.decode import IMAGE_FIELD
from pipelines.dataset.info import DatasetInfo, dataset_dir
from pipelines.dataset.shard_reader import ShardSamples
from pipelines.dataset.sources import ArraySource, SourceItem
from pipelines.storage import Storage, join

CHECKED_ITEMS = 3
"""Present items compared per ingest: the first ones, those of them in the first one's shard (one shard read)."""


def check_present_items_match(storage: Storage, info: DatasetInfo, manifest: pa.Table, source: ArraySource,
                              first_present: Iterable[SourceItem], present: int, source_spec: str = "") -> int:
    """Compare the first ``CHECKED_ITEMS`` of ``first_present`` (items of ``source`` whose ids the dataset
    holds, ``present`` in all) that share the first one's shard with their stored images; returns how many
    were compared (0: none could be, e.g. the shard is damaged where they are).

    Raises:
        ValueError: A stored image differs from the source's: another source of the same format and file
            names (ids that do not name their folder), whose images would otherwise be skipped unseen.
    """
    picks = list(itertools.islice(first_present, CHECKED_ITEMS))
    if not picks:
        return 0
    rows = manifest.filter(pc.is_in(manifest["source"], value_set=pa.array([it.source_id for it in picks])))
    where = {s: (shard, key) for s, shard, key in zip(rows["source"].to_pylist(), rows["shard"].to_pylist(),
                                                       rows["key"].to_pylist(), strict=True)}
    shard = where[picks[0].source_id][0]
    wanted = {where[it.source_id][1]: it for it in picks if where[it.source_id][0] == shard}
    rel = join(dataset_dir(info.name), "shards", shard)
    compared = 0
    with storage.filesystem.open_input_stream(storage.path(rel)) as handle:
        for sample in ShardSamples(handle, storage.uri(rel)):
            item = wanted.get(sample["__key__"])
            if item is None or IMAGE_FIELD not in sample:
                continue
            with Image.open(io.BytesIO(sample[IMAGE_FIELD])) as img:
                stored = np.asarray(img)
            compared += 1
            if not np.array_equal(stored, source.rows([int(item.ref)])[0]):
                raise ValueError(
                    f"dataset {info.name!r} already holds {item.source_id!r} (and {present - 1} more ids of "
                    f"this source), but its stored image differs from {source_spec or source.description}'s: "
                    f"{source.kind} ids name the split and row only, not the folder, so this is another "
                    f"collection with the same file names (MNIST and Fashion-MNIST share theirs) and its images "
                    f"would be skipped as already ingested. Ingest it into another dataset (--dataset NAME)")
    return compared
