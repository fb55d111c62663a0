"""Integrity of checkpoint files: the size and SHA-256 recorded for each file, their checks, and Ray Train's
record of the checkpoints.

``pipelines.training.checkpointing`` (the owner of the checkpoint format) records ``file_record`` of
``model.pt`` and ``coordinator.pt`` under ``files`` in the metadata, checks each file it reads with
``verify_local`` and reads it with ``torch_load``; any mismatch or unparsable file raises
``CheckpointDamagedError`` naming the file. ``set_aside_stale_ray_snapshot`` moves Ray's record aside when it
names a checkpoint folder that is gone (Ray would refuse to start the run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)

META_FILE = "secu_checkpoint.json"
"""The checkpoint's metadata file (``checkpointing.META_FILE``)."""
CHECKPOINTS_DIR = "checkpoints"
_HASH_CHUNK = 8 << 20


class CheckpointDamagedError(ValueError):
    """A checkpoint file does not match the size or checksum its metadata records."""


def file_record(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        digest = sha256(handle)
    return {"bytes": path.stat().st_size, "sha256": digest}


def sha256(handle: Any) -> str:
    h = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def recorded_files(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``files`` record of a checkpoint's metadata ({} for checkpoints written before it existed)."""
    files = meta.get("files")
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def verify_local(directory: Path, name: str) -> None:
    """Check ``directory/name`` against the size and SHA-256 recorded beside it (nothing to check when the
    metadata is absent or older than the record)."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return
    record = recorded_files(meta if isinstance(meta, dict) else {}).get(name)
    if record is None:
        return
    path = directory / name
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise CheckpointDamagedError(
            f"{path} has {size:,} bytes where its checkpoint recorded {record.get('bytes'):,}: the file is damaged "
            "(a copy or a disk that filled cut it short)")
    with open(path, "rb") as handle:
        digest = sha256(handle)
    if digest != record.get("sha256"):
        raise CheckpointDamagedError(
            f"{path} does not match the SHA-256 its checkpoint recorded ({digest[:12]}... against "
            f"{str(record.get('sha256'))[:12]}...): the file was changed or damaged after it was written")


def torch_load(path: Path) -> Any:
    """``torch.load`` on the CPU; a file torch cannot parse (cut short, overwritten) is a damaged checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # torch: OSError EINVAL on a cut zip
        raise CheckpointDamagedError(f"{path} cannot be read ({' '.join(str(err).split())[:200]}): the file is "
                                     "damaged") from None


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the reported checkpoints, beside them (Ray >= 2.51)."""


def set_aside_stale_ray_snapshot(storage: Storage, run_id: str) -> str | None:
    """Move Ray Train's checkpoint snapshot aside when it names a checkpoint folder that is gone.

    Ray refuses to start a run whose snapshot references a deleted checkpoint ("The run snapshot contains
    a reference to a checkpoint that does not exist anymore"); the training loop resumes from the newest
    intact checkpoint on storage instead of Ray's record, so the record can go. Returns the new name of
    the snapshot (``checkpoint_manager_snapshot.json.stale-<n>``), or None when it was fine or absent.
    """
    base = join("runs", run_id, CHECKPOINTS_DIR)
    rel = join(base, RAY_SNAPSHOT_FILE)
    try:
        data = json.loads(storage.read_bytes(rel).decode("utf-8"))
        names = [str(r["checkpoint_dir_name"]) for r in data.get("checkpoint_results", [])]
        missing = [n for n in names if not storage.list(join(base, n))]
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        missing = ["(the snapshot is unreadable)"]
    if not missing:
        return None
    n = 0
    while storage.exists(f"{rel}.stale-{n}"):
        n += 1
    target = f"{rel}.stale-{n}"
    storage.filesystem.move(storage.path(rel), storage.path(target))
    logger.warning("Ray Train's checkpoint snapshot of run %s names checkpoint folders that are gone (%s); moved "
                   "it to %s so the run can start; it resumes from the newest intact checkpoint on storage",
                   run_id, ", ".join(missing), storage.uri(target))
    return target


