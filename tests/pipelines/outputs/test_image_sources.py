"""The source of every row: the manifest lookup (no Ray) and the Assigner's two ways to get it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.outputs.assigner import Assigner
from pipelines.outputs.image_sources import SourceLookup, load_source_lookup
from pipelines.storage import Storage
from pipelines.training.checkpointing import find_latest_checkpoint
from secu.augment import EvalTransform
from tests.pipelines.run_builders import add_checkpoint, make_dataset, train_job


def test_lookup_takes_sources_by_sample_index_in_any_order() -> None:
    manifest = pa.table({"sample_index": pa.array([0, 1, 2, 3], pa.int64()),
                         "source": ["s3://lake/a.jpg", "", "/data/ü/ç.png", "idx:train:3"]})
    lookup = SourceLookup.from_manifest(manifest.slice(0, 4), "d")
    assert lookup.take(np.array([3, 0, 2, 1, 0])).to_pylist() == [
        "idx:train:3", "s3://lake/a.jpg", "/data/ü/ç.png", "", "s3://lake/a.jpg"]
    assert lookup.take(np.array([], dtype=np.int64)).to_pylist() == []
    with pytest.raises(ValueError, match="sample_index 4 is outside dataset 'd' .4 samples"):
        lookup.take(np.array([1, 4]))
    with pytest.raises(ValueError, match="does not hold sample_index 0..1 in order"):
        SourceLookup.from_manifest(manifest.take([1, 0]).slice(0, 2), "d")


def test_assigner_takes_the_stream_source_or_looks_it_up(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    images = make_dataset(storage, "tiny", 6, shard_size=6)
    add_checkpoint(storage, "r", "tiny", 1)
    ref = find_latest_checkpoint(storage, "r")
    transform = EvalTransform(train_job("r", "tiny").experiment.augment)
    batch = {"image": np.stack([transform(image).numpy() for image in images[[4, 1]]]),
             "sample_index": np.array([4, 1]), "key": np.array(["s000000_0000004", "s000000_0000001"], dtype=object),
             "shard": np.array(["shard-000000.tar"] * 2, dtype=object)}

    looked_up = Assigner(ref, "r", sources=load_source_lookup(storage, "tiny"))(batch)
    assert looked_up["source"].to_pylist() == ["synthetic:train:4", "synthetic:train:1"]
    carried = Assigner(ref, "r")(batch | {"source": np.array(["/a.png", "/b.png"], dtype=object)})
    assert carried["source"].to_pylist() == ["/a.png", "/b.png"]
    assert carried.schema.equals(looked_up.schema) and carried.schema.names[:4] == ["sample_index", "key", "shard",
                                                                                     "source"]
    with pytest.raises(ValueError, match="neither a source lookup nor batches with a 'source' column"):
        Assigner(ref, "r")(batch)
