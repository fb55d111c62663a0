"""The model stage that batch inference runs inside the read tasks on CPUs (``assign_rows``): one model per
worker process, kept while the checkpoint stays the same, the same rows as an Assigner; and the options that
choose between it and the actor pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipelines.dataset.synthetic import pattern_images
from pipelines.outputs import assigner as assigner_module
from pipelines.outputs.assigner import Assigner, assign_rows
from pipelines.outputs.inference import InferenceOptions, room_for_reads
from pipelines.storage import Storage
from pipelines.training.checkpointing import CheckpointRef, find_latest_checkpoint, load_checkpoint
from secu.augment import EvalTransform
from tests.pipelines.run_builders import add_checkpoint


def _batch(ref: CheckpointRef, n: int) -> dict[str, np.ndarray]:
    """``n`` pattern images as the evaluation stream hands them to the model stage."""
    images, _ = pattern_images(n, 3)
    transform = EvalTransform(load_checkpoint(ref).job.experiment.augment)
    return {
        "image": np.stack([transform(image).numpy() for image in images]),
        "sample_index": np.arange(n, dtype=np.int64),
        "key": np.asarray([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.asarray(["s0.tar"] * n, dtype=object),
        "source": np.asarray([f"src/{i}.png" for i in range(n)], dtype=object),
    }


@pytest.fixture
def clean_cache() -> Iterator[None]:
    assigner_module._PROCESS_ASSIGNER.clear()
    yield
    assigner_module._PROCESS_ASSIGNER.clear()


def test_assign_rows_loads_the_model_once_per_checkpoint_and_matches_an_assigner(
        tmp_path: Path, clean_cache: None) -> None:
    storage = Storage(str(tmp_path))
    add_checkpoint(storage, "r", "tiny", 2)
    ref = find_latest_checkpoint(storage, "r")
    batch = _batch(ref, 20)

    first = assign_rows(batch, checkpoint=ref, fingerprint="a", run_id="r")
    cached = assigner_module._PROCESS_ASSIGNER["a|r|False"]
    second = assign_rows(batch, checkpoint=ref, fingerprint="a", run_id="r")
    assert assigner_module._PROCESS_ASSIGNER["a|r|False"] is cached  # not loaded again
    assert first.equals(second)
    assert first.equals(Assigner(ref, "r")(batch))  # the actor path's rows, byte for byte
    assert first.column("source").to_pylist() == [f"src/{i}.png" for i in range(20)]

    assign_rows(batch, checkpoint=ref, fingerprint="b", run_id="r")  # another checkpoint: the old model is dropped
    assert list(assigner_module._PROCESS_ASSIGNER) == ["b|r|False"]
    assert assigner_module._PROCESS_ASSIGNER["b|r|False"] is not cached


def test_a_slice_whose_images_were_all_bad_gives_an_empty_table_of_the_schema(
        tmp_path: Path, clean_cache: None) -> None:
    storage = Storage(str(tmp_path))
    add_checkpoint(storage, "r", "tiny", 2)
    ref = find_latest_checkpoint(storage, "r")
    empty = {name: column[:0] for name, column in _batch(ref, 2).items()}

    table = assign_rows(empty, checkpoint=ref, fingerprint="a", run_id="r")

    assert table.num_rows == 0
    assert table.schema.equals(assigner_module._PROCESS_ASSIGNER["a|r|False"].schema)


@pytest.mark.parametrize(("options", "message"), [
    ({"model_in": "gpu"}, "model_in='gpu': choose one of"),
    ({"model_in": "tasks", "use_gpu": "yes"}, "with use_gpu=yes set model_in=actors"),
    ({"model_in": "tasks", "concurrency": 2}, "concurrency=2 sets the number of Assigner actors"),
])
def test_model_placement_options_that_cannot_work_fail_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InferenceOptions(**options)


@pytest.mark.parametrize(("node_cpus", "actors", "cpus_per_actor", "room"), [
    ([1, 1, 1], 3, 0.5, False),  # one half-CPU actor per 1-CPU node: no node keeps a whole CPU
    ([1, 1, 1], 2, 0.5, True),  # the third node stays free
    ([2], 2, 0.5, True),
    ([2], 2, 0.6, False),  # 0.8 CPU left
    ([4, 1], 2, 1.0, True),  # spread one per node: the 4-CPU node keeps 3
    ([1, 1, 1], 2, 1.0, True),
    ([1], 3, 0.5, False),  # more actors than fit: the ones placed already take the node
])
def test_room_for_reads_follows_the_spread_of_the_actor_pool(
        node_cpus: list[float], actors: int, cpus_per_actor: float, room: bool) -> None:
    assert room_for_reads(node_cpus, actors, cpus_per_actor) is room
