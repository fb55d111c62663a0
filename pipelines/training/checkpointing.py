"""The training checkpoint format, its only owner: writing, reading and finding checkpoints.

A checkpoint directory holds:

- ``model.pt``: ``TrainingState.to_dict()``: the method's network state (``ClusteringMethod.state_dict``:
  for SeCu encoder + centers, unwrapped from DDP), optimizer, cluster state (SeCu's counters and duals;
  None for the other methods), the completed epoch, the global step, the job config (with the metric
  history under ``"history"``) and ``format_version``;
- ``coordinator.pt``: ``CoordinatorState.to_dict()``, the coordinator's state at the same epoch boundary
  (assignment memory of the previous epoch, authoritative counters/duals;
  ``pipelines.training.coordinator_state``);
- ``secu_checkpoint.json``: small metadata (epoch, global step, run id, format version, and under ``files``
  the size and SHA-256 of ``model.pt`` and ``coordinator.pt``) that tools read without loading tensors.

Ray Train stores these directories under ``<root>/runs/<run_id>/checkpoints/checkpoint_<time>/``.
A checkpoint counts as complete when its ``secu_checkpoint.json`` parses and its files have the sizes it
records (a copy interrupted mid-way, or a disk that filled while the checkpoint was written, fails
that); checkpoints written before sizes were recorded need a non-empty ``model.pt``. The latest is the
complete one with the highest epoch (then global step, then name). Every read of ``model.pt`` or
``coordinator.pt`` checks the recorded SHA-256 and raises ``CheckpointDamagedError`` naming the file on
a mismatch (``pipelines.training.checkpoint_integrity``); ``find_latest_checkpoint`` and
``newest_intact_checkpoint`` then fall back to the previous checkpoint with a warning. A remote
checkpoint is read from a temporary local copy (``model.pt`` and the metadata; ``coordinator.pt`` only
when asked for: inference does not need it). ``publish_checkpoint`` writes a checkpoint directory onto
storage directly (the reclustering's aligned copy), metadata last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.storage import Storage, join
from pipelines.training.checkpoint_integrity import (
    CHECKPOINTS_DIR,
    META_FILE,
    CheckpointDamagedError,
    file_record,
    recorded_files,
    sha256,
    torch_load,
    verify_local,
)
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.job_config import TrainJobConfig
from secu.method import ClusteringMethod
from secu.methods import build_method
from secu.state import ClusterState

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of ``model.pt`` and of the metadata (bumped on incompatible changes; older ones keep being read)."""
MODEL_FILE = "model.pt"
COORDINATOR_FILE = "coordinator.pt"
JOB_CONFIG_KEYS = ("experiment", "compute", "dataset", "run_id", "recipe", "tracking")
"""The keys of ``TrainingState.job`` that are the job config (the others, e.g. ``history``, ride along)."""

_MODEL_KEYS = ("network", "optimizer", "cluster_state", "epoch", "global_step", "job")


@dataclass
class TrainingState:
    """Everything needed to continue training after ``epoch`` (the last completed epoch)."""

    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    cluster_state: ClusterState | None
    """SeCu's counters and duals; None for a method without them."""
    epoch: int
    global_step: int
    job: dict[str, Any]

    def job_config(self) -> TrainJobConfig:
        """The job config the checkpoint was trained with (without the metric history beside it)."""
        return TrainJobConfig.from_dict({k: v for k, v in self.job.items() if k in JOB_CONFIG_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The content of ``model.pt`` (tensors are not copied)."""
        cluster = None if self.cluster_state is None else self.cluster_state.state_dict()
        return {"network": self.network, "optimizer": self.optimizer, "cluster_state": cluster,
                "epoch": self.epoch, "global_step": self.global_step, "job": self.job,
                "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: Any, where: str = MODEL_FILE) -> TrainingState:
        """Inverse of ``to_dict``; ValueError naming the problem (and ``where``) for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a dict (training checkpoint), got {type(data).__name__}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: checkpoint format {data.get('format_version')} is not {FORMAT_VERSION}")
        missing = [k for k in _MODEL_KEYS if k not in data]
        if missing:
            raise ValueError(f"{where}: keys {missing} are missing from the training checkpoint")
        try:
            return cls(network=data["network"], optimizer=data["optimizer"],
                       cluster_state=None if data["cluster_state"] is None
                       else ClusterState.from_state_dict(data["cluster_state"]),
                       epoch=int(data["epoch"]), global_step=int(data["global_step"]), job=data["job"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: unreadable training checkpoint ({err!r})") from None


def save_checkpoint(directory: str | os.PathLike[str], state: TrainingState,
                    coordinator_state: CoordinatorState) -> None:
    """Write a checkpoint directory (model, coordinator state, metadata)."""
    _write_files(Path(directory), state, coordinator_state, {})


def _write_files(path: Path, state: TrainingState, coordinator_state: CoordinatorState,
                 extra_meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state.to_dict(), path / MODEL_FILE)
    torch.save(coordinator_state.to_dict(), path / COORDINATOR_FILE)
    files = {name: file_record(path / name) for name in (MODEL_FILE, COORDINATOR_FILE)}
    meta = {"epoch": state.epoch, "global_step": state.global_step, "run_id": state.job.get("run_id"),
            "format_version": FORMAT_VERSION, "files": files} | extra_meta
    (path / META_FILE).write_text(json.dumps(meta, indent=2))


def load_training_state(directory: str | os.PathLike[str]) -> TrainingState:
    """Read ``model.pt`` of a checkpoint directory (checked against its recorded size and SHA-256)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this is not a SeCu training checkpoint")
    verify_local(Path(directory), MODEL_FILE)
    return TrainingState.from_dict(torch_load(path), where=str(path))


def load_coordinator_state(directory: str | os.PathLike[str]) -> CoordinatorState:
    """Read ``coordinator.pt`` of a checkpoint directory (checked against its recorded size and SHA-256)."""
    path = Path(directory) / COORDINATOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no coordinator state")
    verify_local(Path(directory), COORDINATOR_FILE)
    return CoordinatorState.from_dict(torch_load(path), where=str(path))


# --------------------------------------------------------------------------------------------------
# Finding checkpoints on storage (local or S3) and reading them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint directory."""

    location: Storage
    """The checkpoint directory itself as a storage root (picklable; local path or s3:// prefix)."""
    label: str
    """How outputs name it: the path relative to the run's storage root, or the path given by the user."""
    epoch: int
    """Last completed training epoch."""
    global_step: int
    run_id: str | None
    """The run id recorded in the checkpoint's metadata."""


def _inspect(location: Storage) -> tuple[dict[str, Any] | None, str]:
    """(metadata, "") for a complete checkpoint, else (None, what is wrong)."""
    try:
        meta = json.loads(location.read_bytes(META_FILE).decode("utf-8"))
        epoch = int(meta["epoch"])
    except FileNotFoundError:
        return None, f"{META_FILE} is missing"
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, f"{META_FILE} is unreadable"
    recorded = recorded_files(meta)
    for name, record in recorded.items():
        size = location.size(name)
        if size != record.get("bytes"):
            have = "is missing" if size is None else f"has {size:,} of {record.get('bytes'):,} bytes"
            return None, f"{name} {have}"
    if not recorded and not location.size(MODEL_FILE):
        return None, f"{MODEL_FILE} is missing or empty"
    meta["epoch"] = epoch
    meta["global_step"] = int(meta.get("global_step") or 0)
    return dict(meta), ""


def list_checkpoints(storage: Storage, run_id: str) -> list[CheckpointRef]:
    """Complete checkpoints of a run, oldest first (by epoch, global step, directory name); an incomplete or
    damaged one is skipped with a warning that says what is wrong with it."""
    base = join("runs", run_id, CHECKPOINTS_DIR)
    found = []
    for entry in storage.list(base, recursive=True):
        if not entry.path.endswith("/" + META_FILE):
            continue
        rel = join(base, entry.path[: -len(META_FILE) - 1])
        location = storage.child(rel)
        meta, problem = _inspect(location)
        if meta is None:
            logger.warning("skipping checkpoint %s: %s (it is incomplete or damaged; an earlier one is used)",
                           storage.uri(rel), problem)
            continue
        found.append(CheckpointRef(location, rel, meta["epoch"], meta["global_step"], meta.get("run_id")))
    return sorted(found, key=lambda c: (c.epoch, c.global_step, c.label))


def verify_checkpoint(ref: CheckpointRef, names: Sequence[str] = (MODEL_FILE,)) -> None:
    """Check the files ``names`` of a checkpoint against the SHA-256 its metadata records (streamed, nothing
    is loaded; nothing to check for checkpoints written before the record).

    Raises:
        CheckpointDamagedError: Naming the checkpoint and the file that does not match.
    """
    meta, problem = _inspect(ref.location)
    if meta is None:
        raise CheckpointDamagedError(f"checkpoint {ref.label}: {problem}")
    recorded = recorded_files(meta)
    for name in names:
        record = recorded.get(name)
        if record is None:
            continue
        with ref.location.filesystem.open_input_stream(ref.location.path(name)) as handle:
            digest = sha256(handle)
        if digest != record.get("sha256"):
            raise CheckpointDamagedError(
                f"checkpoint {ref.label}: {name} does not match the SHA-256 its metadata records: the file was "
                "changed or damaged after it was written")


def find_latest_checkpoint(storage: Storage, run_id: str, verify: Sequence[str] = (MODEL_FILE,)) -> CheckpointRef:
    """The complete checkpoint of ``run_id`` with the highest epoch whose files ``verify`` match their
    checksums (a damaged one is skipped with a warning: the one before it is used).

    Raises:
        FileNotFoundError: If the run has no complete checkpoint.
        CheckpointDamagedError: If every complete checkpoint is damaged.
    """
    found = list_checkpoints(storage, run_id)
    if not found:
        where = storage.uri("runs", run_id, CHECKPOINTS_DIR)
        raise FileNotFoundError(
            f"no complete checkpoint under {where}: train the run first (`python -m jobs.train --run-id "
            f"{run_id} --storage {storage.root}`), check --run-id, or pass --checkpoint PATH"
        )
    damaged = []
    for ref in reversed(found):
        try:
            verify_checkpoint(ref, verify)
        except CheckpointDamagedError as err:
            logger.warning("%s; using the checkpoint before it", err)
            damaged.append(str(err))
            continue
        return ref
    raise CheckpointDamagedError(f"every checkpoint of run {run_id} is damaged: {'; '.join(damaged)}; retrain the "
                                 "run (a new --run-id) or pass --checkpoint PATH")


def newest_intact_checkpoint(storage: Storage, run_id: str
                             ) -> tuple[CheckpointRef, TrainingState, CoordinatorState] | None:
    """The newest checkpoint of ``run_id`` that reads whole (model and coordinator state, checksums checked),
    read; a damaged one is skipped with a warning. None when the run has no checkpoint.

    Raises:
        CheckpointDamagedError: If the run has checkpoints and every one of them is damaged.
    """
    found = list_checkpoints(storage, run_id)
    damaged = []
    for ref in reversed(found):
        try:
            state, coordinator = read_checkpoint(ref)
        except CheckpointDamagedError as err:
            logger.warning("checkpoint %s is damaged (%s); trying the one before it", ref.label, err)
            damaged.append(f"{ref.label}: {err}")
            continue
        return ref, state, coordinator
    if damaged:
        raise CheckpointDamagedError(f"every checkpoint of run {run_id} is damaged ({'; '.join(damaged)}); start "
                                     "a new --run-id")
    return None


def checkpoint_at(path: str, storage: Storage) -> CheckpointRef:
    """The checkpoint at an explicit ``path``: a local directory or ``s3://...`` (with ``storage``'s endpoint).

    Raises:
        FileNotFoundError: If ``path`` holds no complete SeCu checkpoint.
    """
    if path.startswith("s3://"):
        location = Storage(path, storage.s3_endpoint, storage.s3_region)
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--checkpoint {path}: no such directory; pass a checkpoint_* directory")
        location = Storage(path)
    meta, problem = _inspect(location)
    if meta is None:
        raise FileNotFoundError(
            f"--checkpoint {location.uri()}: not a complete SeCu checkpoint ({problem}; {META_FILE} and the files "
            f"it records are required); pass a runs/<run_id>/checkpoints/checkpoint_* directory"
        )
    return CheckpointRef(location, location.uri(), meta["epoch"], meta["global_step"], meta.get("run_id"))


@contextlib.contextmanager
def local_checkpoint_dir(ref: CheckpointRef, extra_files: Sequence[str] = ()) -> Iterator[str]:
    """A local directory holding the checkpoint's model and metadata, plus ``extra_files`` (e.g. the
    coordinator state), downloaded when remote."""
    if not ref.location.is_s3:
        yield ref.location.root
        return
    tmp = tempfile.mkdtemp(prefix="secu-ckpt-")
    try:
        for name in (MODEL_FILE, META_FILE, *extra_files):
            with ref.location.filesystem.open_input_stream(ref.location.path(name)) as src, \
                    open(os.path.join(tmp, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint(ref: CheckpointRef) -> tuple[TrainingState, CoordinatorState]:
    """The training state and the coordinator state of a checkpoint (local or S3)."""
    with local_checkpoint_dir(ref, extra_files=(COORDINATOR_FILE,)) as directory:
        return load_training_state(directory), load_coordinator_state(directory)


def publish_checkpoint(storage: Storage, rel: str, state: TrainingState, coordinator_state: CoordinatorState,
                       extra_meta: dict[str, Any] | None = None) -> str:
    """Write a checkpoint directory at ``rel`` on ``storage``; returns its URI.

    The metadata (with ``extra_meta`` added) is removed first and written last, so that a reader never
    takes a half-written directory for a complete checkpoint (``_inspect`` needs the metadata).
    """
    storage.delete(join(rel, META_FILE))
    with tempfile.TemporaryDirectory(prefix="secu-ckpt-") as tmp:
        _write_files(Path(tmp), state, coordinator_state, extra_meta or {})
        for name in (MODEL_FILE, COORDINATOR_FILE):
            storage.upload_file_atomic(join(rel, name), os.path.join(tmp, name))
        storage.write_bytes_atomic(join(rel, META_FILE), Path(tmp, META_FILE).read_bytes())
    return storage.uri(rel)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's method (its networks in eval mode), its job config, epoch and training history."""

    method: ClusteringMethod
    job: TrainJobConfig
    epoch: int
    history: list[dict[str, Any]]


def method_from_state(state: TrainingState, device: torch.device | None = None) -> ClusteringMethod:
    """The method of a checkpoint's job with the checkpoint's networks and state (eval mode, on ``device``:
    CPU when None)."""
    method = build_method(state.job_config().experiment, iters_per_epoch=1, device=device)
    method.load_state_dict({"network": state.network, "cluster_state": state.cluster_state,
                            "global_step": state.global_step})
    return method.eval()


def load_checkpoint(ref: CheckpointRef, device: torch.device | None = None) -> LoadedCheckpoint:
    """Load the method of a checkpoint onto ``device`` (CPU when None), downloading it first when remote."""
    with local_checkpoint_dir(ref) as directory:
        state = load_training_state(directory)
    history = state.job.get("history", [])
    return LoadedCheckpoint(method_from_state(state, device), state.job_config(), state.epoch,
                            list(history) if isinstance(history, list) else [])
