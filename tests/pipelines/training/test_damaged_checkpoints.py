"""Damaged checkpoints (issue 17): a file cut short or changed after it was written is found by its recorded
size or SHA-256, named, and skipped for the checkpoint before it; Ray's stale snapshot is set aside; an
error a retry would meet again stops a Ray Train run (the classification, without Ray)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from pipelines.dataset.bad_input import BadInputError
from pipelines.storage import Storage, join
from pipelines.training.checkpoint_integrity import (
    RAY_SNAPSHOT_FILE,
    CheckpointDamagedError,
    set_aside_stale_ray_snapshot,
)
from pipelines.training.checkpointing import (
    COORDINATOR_FILE,
    MODEL_FILE,
    find_latest_checkpoint,
    list_checkpoints,
    load_coordinator_state,
    load_training_state,
    newest_intact_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from pipelines.training.fail_fast import StopOnDeterministicErrors, deterministic_error
from tests.pipelines.training.test_checkpointing import write_old_checkpoint

RUN = "old-run"


def two_epochs(tmp_path: Path) -> tuple[Storage, list[Path]]:
    """A run with checkpoints of epochs 0 and 1 (new format: sizes and checksums recorded)."""
    write_old_checkpoint(tmp_path / "src")
    state, coord = load_training_state(tmp_path / "src"), load_coordinator_state(tmp_path / "src")
    storage = Storage(str(tmp_path / "root"))
    dirs = []
    for epoch in (0, 1):
        state.epoch, state.global_step = epoch, 10 * (epoch + 1)
        d = Path(storage.path("runs", RUN, "checkpoints", f"checkpoint_{epoch}"))
        save_checkpoint(d, state, coord)
        dirs.append(d)
    return storage, dirs


def cut(path: Path, keep: float = 0.4) -> None:
    body = path.read_bytes()
    path.write_bytes(body[: int(len(body) * keep)])


def flip(path: Path) -> None:
    """Same size, one byte changed in the middle (only the checksum can tell)."""
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF
    path.write_bytes(bytes(body))


def test_a_cut_model_file_is_skipped_with_a_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    storage, dirs = two_epochs(tmp_path)
    assert [c.epoch for c in list_checkpoints(storage, RUN)] == [0, 1]
    cut(dirs[1] / MODEL_FILE)
    with caplog.at_level(logging.WARNING):
        found = list_checkpoints(storage, RUN)
    assert [c.epoch for c in found] == [0]
    assert "checkpoint_1" in caplog.text and "model.pt has" in caplog.text and "bytes" in caplog.text
    assert find_latest_checkpoint(storage, RUN).epoch == 0
    with pytest.raises(CheckpointDamagedError, match="model.pt has .* bytes where its checkpoint recorded"):
        load_training_state(dirs[1])


def test_a_changed_byte_is_caught_by_the_checksum_and_the_one_before_is_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage, dirs = two_epochs(tmp_path)
    flip(dirs[1] / MODEL_FILE)
    assert [c.epoch for c in list_checkpoints(storage, RUN)] == [0, 1]  # sizes agree: listed
    with pytest.raises(CheckpointDamagedError, match="model.pt does not match the SHA-256"):
        verify_checkpoint(list_checkpoints(storage, RUN)[-1])
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(storage, RUN).epoch == 0
    assert "checkpoint_1" in caplog.text and "using the checkpoint before it" in caplog.text
    with pytest.raises(CheckpointDamagedError, match="does not match the SHA-256 its checkpoint recorded"):
        load_training_state(dirs[1])


def test_resume_takes_the_newest_checkpoint_whose_coordinator_state_is_intact(tmp_path: Path) -> None:
    storage, dirs = two_epochs(tmp_path)
    found = newest_intact_checkpoint(storage, RUN)
    assert found is not None and found[0].epoch == 1 and found[1].epoch == 1
    flip(dirs[1] / COORDINATOR_FILE)  # the model is fine, the coordinator state is not
    assert find_latest_checkpoint(storage, RUN).epoch == 1  # inference needs only the model
    found = newest_intact_checkpoint(storage, RUN)
    assert found is not None and found[0].epoch == 0 and found[1].global_step == 10
    flip(dirs[0] / MODEL_FILE)
    with pytest.raises(CheckpointDamagedError, match="every checkpoint of run old-run is damaged"):
        newest_intact_checkpoint(storage, RUN)
    with pytest.raises(CheckpointDamagedError, match="every checkpoint of run old-run is damaged"):
        find_latest_checkpoint(storage, RUN, verify=(MODEL_FILE, COORDINATOR_FILE))
    assert newest_intact_checkpoint(storage, "no-such-run") is None


def test_an_unparsable_file_of_an_old_checkpoint_is_a_damaged_checkpoint(tmp_path: Path) -> None:
    write_old_checkpoint(tmp_path / "ckpt")  # old format: no sizes or checksums recorded
    cut(tmp_path / "ckpt" / MODEL_FILE)
    with pytest.raises(CheckpointDamagedError, match="model.pt cannot be read .*the file is damaged"):
        load_training_state(tmp_path / "ckpt")


def write_snapshot(storage: Storage, names: list[str]) -> str:
    rel = join("runs", RUN, "checkpoints", RAY_SNAPSHOT_FILE)
    body = {"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}
    storage.write_bytes_atomic(rel, json.dumps(body).encode())
    return rel


def test_a_ray_snapshot_naming_a_deleted_checkpoint_is_set_aside(tmp_path: Path) -> None:
    storage, _ = two_epochs(tmp_path)
    rel = write_snapshot(storage, ["checkpoint_0", "checkpoint_1"])
    assert set_aside_stale_ray_snapshot(storage, RUN) is None and storage.exists(rel)  # all there: kept
    write_snapshot(storage, ["checkpoint_0", "checkpoint_9"])
    moved = set_aside_stale_ray_snapshot(storage, RUN)
    assert moved == rel + ".stale-0" and storage.exists(moved) and not storage.exists(rel)
    assert json.loads(storage.read_bytes(moved))["checkpoint_results"][1]["checkpoint_dir_name"] == "checkpoint_9"
    assert set_aside_stale_ray_snapshot(storage, RUN) is None  # no snapshot: nothing to do
    assert [c.epoch for c in list_checkpoints(storage, RUN)] == [0, 1]  # the checkpoints are untouched


def test_errors_a_retry_meets_again_are_told_from_those_it_may_fix() -> None:
    bad = BadInputError("too much bad input: 1 of 53 samples")
    assert deterministic_error(bad) is bad
    disk = OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/checkpoints")
    assert deterministic_error(disk) is disk
    damaged = CheckpointDamagedError("model.pt does not match")
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = damaged
    assert deterministic_error(wrapped) is damaged

    class RayTaskErrorLike(Exception):  # what a failed Ray Data task looks like in a train worker
        traceback_str = "Traceback ...\npipelines.dataset.bad_input.BadInputError: too much bad input: 2 of 10\n"
    found = deterministic_error(RayTaskErrorLike("task failed"))
    assert isinstance(found, BadInputError) and str(found) == "too much bad input: 2 of 10"
    for retryable in (ConnectionError("reset"), OSError(errno.ECONNRESET, "reset"), RuntimeError("actor died"),
                      ValueError("x")):
        assert deterministic_error(retryable) is None
    callback = StopOnDeterministicErrors()
    callback.after_exception(None, {0: RuntimeError("actor died")})  # retryable: returns, Ray may retry
    with pytest.raises(BadInputError, match="1 of 53"):
        callback.after_exception(None, {0: RuntimeError("actor died"), 1: bad})
