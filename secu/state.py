"""Clustering state that is not learned by gradient (spec 2).

``ClusterState`` holds, per head, the cluster-size counters n_h and the dual variables rho_h. It is
small (K floats per head), identical on every rank, and updated by the pure rules of
``secu.constraints`` inside the training step.

``LocalMemory`` is the per-instance assignment memory y_h[i] kept in one process: the reference
used by tests and single-process runs. Distributed runs keep the memory in the coordinator actor
(``pipelines.training.coordinator``) instead, never replicated into every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClusterState:
    """Per-head counters n_h and duals rho_h (float64)."""

    counters: list[torch.Tensor]
    duals: list[torch.Tensor]

    @classmethod
    def create(cls, ks: tuple[int, ...] | list[int]) -> ClusterState:
        """Zero counters and zero duals for every head."""
        return cls(
            counters=[torch.zeros(k, dtype=torch.float64) for k in ks],
            duals=[torch.zeros(k, dtype=torch.float64) for k in ks],
        )

    def at_epoch_end(self, constraint: str) -> ClusterState:
        """State carried into the next epoch: under the size constraint the counters (logging only)
        are reset; duals and entropy counters persist."""
        if constraint == "size":
            return ClusterState([torch.zeros_like(c) for c in self.counters], [d.clone() for d in self.duals])
        return ClusterState([c.clone() for c in self.counters], [d.clone() for d in self.duals])

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Tensors to save in a checkpoint."""
        return {"counters": [c.clone() for c in self.counters], "duals": [d.clone() for d in self.duals]}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[torch.Tensor]]) -> ClusterState:
        """Inverse of ``state_dict``."""
        return cls(
            counters=[torch.as_tensor(c, dtype=torch.float64).clone() for c in state["counters"]],
            duals=[torch.as_tensor(d, dtype=torch.float64).clone() for d in state["duals"]],
        )


class LocalMemory:
    """Assignment memory y_h[i] for N instances and H heads in one process; -1 = no label yet.

    It is a ``secu.method.LabelStore``: writes land at once, so the labels read in an epoch are the
    latest ones (the coordinator of a Ray run serves the previous epoch's; SeCu reads each image once
    per epoch, so the two agree for it)."""

    def __init__(self, num_samples: int, num_heads: int):
        self.labels_HN = torch.full((num_heads, num_samples), -1, dtype=torch.int32)

    def read(self, sample_index_B: torch.Tensor) -> torch.Tensor:
        """Stored labels (H x B) of the given instances."""
        return self.labels_HN[:, sample_index_B.long().cpu()].clone()

    def write(self, sample_index_B: torch.Tensor, labels_HB: torch.Tensor) -> None:
        """Store new labels (H x B)."""
        self.labels_HN[:, sample_index_B.long().cpu()] = labels_HB.to(torch.int32).cpu()

    def labels_for(self, sample_index_B: np.ndarray) -> np.ndarray:
        """``LabelStore``: stored labels int64 [H, B] of the given ids."""
        ids_B = torch.from_numpy(np.asarray(sample_index_B, dtype=np.int64))
        return self.labels_HN[:, ids_B].numpy().astype(np.int64)

    def write_async(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> None:
        """``LabelStore``: store new labels [H, B] (at once; ``epoch`` is not checked in one process)."""
        ids_B = torch.from_numpy(np.asarray(sample_index_B, dtype=np.int64))
        self.write(ids_B, torch.from_numpy(np.asarray(labels_HB)))

    def flush(self) -> int:
        """``LabelStore``: nothing is pending in one process."""
        return 0
