"""A disk that fills while a checkpoint is written (issue 17): the run stops at once (no Ray Train retry),
says what it could not write, where and how much room it needs, and the last complete checkpoint stays
intact and is the one found; the cut checkpoint is never taken for complete.

Needs a small tmpfs of its own (``mount -t tmpfs``: root or CAP_SYS_ADMIN); behind the ``slow`` marker."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.common import classify_error
from pipelines.storage import Storage
from pipelines.training.checkpointing import find_latest_checkpoint, list_checkpoints, read_checkpoint
from pipelines.training.trainer import run_training
from tests.pipelines.run_builders import make_dataset
from tests.pipelines.training.test_train import make_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave: int) -> None:
    """Write a filler file until only ``leave`` bytes are free on ``where``'s filesystem."""
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    with open(where / "filler", "wb") as out:
        out.write(b"\0" * max(0, free - leave))


def test_a_disk_that_fills_stops_the_run_naming_the_space_and_keeps_the_last_checkpoint(
        small_disk: Path, ray_cluster: None) -> None:
    storage = Storage(str(small_disk / "root"))
    make_dataset(storage, "patterns", 128, shard_size=64)
    first = run_training(make_job("full", "optim.epochs=3", "compute.stop_after_epoch=0"), storage)
    assert first.checkpoint_path is not None
    size = sum(f.stat().st_size for f in Path(first.checkpoint_path).iterdir())
    fill(small_disk, leave=size // 2)  # room for half a checkpoint
    with pytest.raises(Exception) as caught:  # noqa: B017 - Ray's ControllerError carrying ours
        run_training(make_job("full", "optim.epochs=3"), storage)
    failure = classify_error(caught.value)
    assert failure is not None and failure.exit_code == 2 and failure.kind == "storage", repr(caught.value)
    assert type(caught.value).__name__ == "ControllerError"  # stopped by our callback: no retry
    assert "no space left to write" in failure.message and str(small_disk) in failure.message, failure.message
    assert "MiB" in failure.message
    os.remove(small_disk / "filler")
    found = list_checkpoints(storage, "full")
    assert [c.epoch for c in found] == [0]  # the cut epoch-1 checkpoint (if any) is not complete
    ref = find_latest_checkpoint(storage, "full")
    state, _ = read_checkpoint(ref)  # intact: sizes and checksums match
    assert state.epoch == 0
