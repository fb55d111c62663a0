"""What goes into a training checkpoint, and how it is read back.

A checkpoint directory holds:

- ``model.pt``: network (encoder + centers, unwrapped from DDP), optimizer, cluster state
  (counters, duals), the completed epoch, the global step and the job config;
- ``coordinator.pt``: the coordinator's state at the same epoch boundary (assignment memory of the
  previous epoch, authoritative counters/duals, statistics history);
- ``secu_checkpoint.json``: small metadata (epoch, run id, format version) that tools read without
  loading tensors.

Ray Train stores these directories under ``<root>/runs/<run_id>/checkpoints/checkpoint_*``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.training.job_config import TrainJobConfig
from secu.network import SeCuNetwork, build_network
from secu.state import ClusterState

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
COORDINATOR_FILE = "coordinator.pt"
META_FILE = "secu_checkpoint.json"


@dataclass
class TrainingState:
    """Everything needed to continue training after ``epoch`` (the last completed epoch)."""

    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    cluster_state: ClusterState
    epoch: int
    global_step: int
    job: dict[str, Any]


def save_checkpoint(directory: str | os.PathLike[str], state: TrainingState,
                    coordinator_state: dict[str, Any]) -> None:
    """Write a checkpoint directory (model, coordinator state, metadata)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "network": state.network,
            "optimizer": state.optimizer,
            "cluster_state": state.cluster_state.state_dict(),
            "epoch": state.epoch,
            "global_step": state.global_step,
            "job": state.job,
            "format_version": FORMAT_VERSION,
        },
        path / MODEL_FILE,
    )
    torch.save(coordinator_state, path / COORDINATOR_FILE)
    meta = {"epoch": state.epoch, "global_step": state.global_step, "run_id": state.job.get("run_id"),
            "format_version": FORMAT_VERSION}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))


def load_training_state(directory: str | os.PathLike[str]) -> TrainingState:
    """Read ``model.pt`` of a checkpoint directory."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this is not a SeCu training checkpoint")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {data.get('format_version')} is not {FORMAT_VERSION}")
    return TrainingState(
        network=data["network"],
        optimizer=data["optimizer"],
        cluster_state=ClusterState.from_state_dict(data["cluster_state"]),
        epoch=int(data["epoch"]),
        global_step=int(data["global_step"]),
        job=data["job"],
    )


def load_coordinator_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``coordinator.pt`` of a checkpoint directory."""
    path = Path(directory) / COORDINATOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no coordinator state")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def load_network(directory: str | os.PathLike[str]) -> tuple[SeCuNetwork, TrainJobConfig, int]:
    """The trained network of a checkpoint (eval mode), its job config and its epoch."""
    state = load_training_state(directory)
    job = TrainJobConfig.from_dict(state.job)
    net = build_network(job.experiment)
    net.load_state_dict(state.network)
    net.eval()
    return net, job, state.epoch
