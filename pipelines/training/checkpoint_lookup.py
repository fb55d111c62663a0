"""Find a run's checkpoints on storage (local or S3) and load one for inference.

Ray Train writes ``<root>/runs/<run_id>/checkpoints/checkpoint_<time>/`` directories (layout in
``pipelines.training.checkpointing``). A checkpoint counts as complete when its ``secu_checkpoint.json``
parses and ``model.pt`` is present and non-empty (an upload interrupted mid-way fails one of the
two); the latest is the complete one with the highest epoch (then global step, then name).
A remote checkpoint is downloaded into a temporary directory (``model.pt`` and the metadata only;
``coordinator.pt`` holds the assignment memory and is not needed for inference).
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
from typing import Any

from pipelines.storage import Storage, join
from pipelines.training.checkpointing import META_FILE, MODEL_FILE, build_network, load_training_state
from pipelines.training.job_config import TrainJobConfig
from secu.network import SeCuNetwork

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_JOB_KEYS = ("experiment", "compute", "dataset", "run_id", "recipe")


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


def _read_meta(location: Storage) -> dict[str, Any] | None:
    """The checkpoint's metadata when the checkpoint is complete, else None."""
    try:
        meta = json.loads(location.read_bytes(META_FILE).decode("utf-8"))
        epoch = int(meta["epoch"])
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    size = location.size(MODEL_FILE)
    if not size:
        return None
    meta["epoch"] = epoch
    meta["global_step"] = int(meta.get("global_step") or 0)
    return dict(meta)


def list_checkpoints(storage: Storage, run_id: str) -> list[CheckpointRef]:
    """Complete checkpoints of a run, oldest first (by epoch, global step, directory name)."""
    base = join("runs", run_id, CHECKPOINTS_DIR)
    found = []
    for entry in storage.list(base, recursive=True):
        if not entry.path.endswith("/" + META_FILE):
            continue
        rel = join(base, entry.path[: -len(META_FILE) - 1])
        location = storage.child(rel)
        meta = _read_meta(location)
        if meta is None:
            logger.warning("skipping incomplete checkpoint %s (metadata or %s missing/corrupt)",
                           storage.uri(rel), MODEL_FILE)
            continue
        found.append(CheckpointRef(location, rel, meta["epoch"], meta["global_step"], meta.get("run_id")))
    return sorted(found, key=lambda c: (c.epoch, c.global_step, c.label))


def find_latest_checkpoint(storage: Storage, run_id: str) -> CheckpointRef:
    """The complete checkpoint of ``run_id`` with the highest epoch.

    Raises:
        FileNotFoundError: If the run has no complete checkpoint.
    """
    found = list_checkpoints(storage, run_id)
    if not found:
        where = storage.uri("runs", run_id, CHECKPOINTS_DIR)
        raise FileNotFoundError(
            f"no complete checkpoint under {where}: train the run first (`python -m jobs.train --run-id "
            f"{run_id} --storage {storage.root}`), check --run-id, or pass --checkpoint PATH"
        )
    return found[-1]


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
    meta = _read_meta(location)
    if meta is None:
        raise FileNotFoundError(
            f"--checkpoint {location.uri()}: not a complete SeCu checkpoint ({META_FILE} and a non-empty "
            f"{MODEL_FILE} are required); pass a runs/<run_id>/checkpoints/checkpoint_* directory"
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


@dataclass
class LoadedCheckpoint:
    """A checkpoint's network (eval mode, CPU), its job config, epoch and training history."""

    network: SeCuNetwork
    job: TrainJobConfig
    epoch: int
    history: list[dict[str, Any]]


def load_checkpoint(ref: CheckpointRef) -> LoadedCheckpoint:
    """Load the network of a checkpoint (downloading it first when remote)."""
    with local_checkpoint_dir(ref) as directory:
        state = load_training_state(directory)
    # The training loop stores its metric history next to the config in ``job`` ("history");
    # TrainJobConfig.from_dict accepts only config keys, so split them here.
    job = TrainJobConfig.from_dict({k: v for k, v in state.job.items() if k in _JOB_KEYS})
    network = build_network(job.experiment)
    network.load_state_dict(state.network)
    network.eval()
    history = state.job.get("history", [])
    return LoadedCheckpoint(network, job, state.epoch, list(history) if isinstance(history, list) else [])
