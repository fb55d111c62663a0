"""Moved to ``pipelines.training.checkpointing``, the checkpoint format's one owner; removed once importers move."""

from pipelines.training.checkpointing import (  # noqa: F401
    CHECKPOINTS_DIR,
    CheckpointRef,
    LoadedCheckpoint,
    checkpoint_at,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    local_checkpoint_dir,
)
