"""The ClusterCoordinator actor: one shard of SeCu's assignment memory (an id range), a thin Ray wrapper over the
Ray-free ``pipelines.training.memory.AssignmentMemory``; ``pipelines.training.coordinator.CoordinatorClient``
creates the shards and is their only caller.

Fault model: created with ``max_restarts=-1``, a restarted actor re-runs ``__init__`` with empty state and refuses
every state-touching call with ``CoordinatorNotRestoredError`` until ``load_state_dict`` or ``reset``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import ray

from pipelines.training.coordinator_state import ShardState
from pipelines.training.memory import AssignmentMemory, ShardStats

logger = logging.getLogger(__name__)


class ClusterCoordinator:
    """Ray actor owning one id range's ``AssignmentMemory`` (a thin wrapper; the logic is tested plain).

    Create it through ``CoordinatorClient.create``. With ``max_restarts=-1`` Ray re-runs ``__init__``
    after a crash; the actor then knows it was reconstructed and refuses to serve until restored.
    """

    def __init__(self, lo: int, hi: int, ks: list[int], true_labels: np.ndarray | None = None) -> None:
        """Creates the shard; ``true_labels`` (one per id in [lo, hi), < 0 unknown) enables ACC/NMI/ARI."""
        with warnings.catch_warnings():
            # Ray 2.60's own implementation of this property reads the deprecated ``actor_id``.
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._memory = AssignmentMemory(lo, hi, ks, restored=not reconstructed)
        self._true_labels = None if true_labels is None else np.asarray(true_labels)
        self._published: tuple[int, ray.ObjectRef] | None = None
        if reconstructed:
            logger.warning("coordinator shard [%d, %d) restarted with empty state; waits for a restore", lo, hi)

    def is_restored(self) -> bool:
        """False after a Ray restart until ``load_state_dict`` or ``reset``."""
        return self._memory.restored

    def current_epoch(self) -> int:
        """The epoch being written (``CoordinatorNotRestoredError`` while the state is lost)."""
        self._memory.check_restored()
        return self._memory.epoch

    def published_range(self, lo: int, hi: int, epoch: int | None) -> np.ndarray:
        """See ``AssignmentMemory.published_range``: one page of the previous epoch's labels."""
        return self._memory.published_range(lo, hi, epoch)

    def publish(self) -> tuple[int, ray.ObjectRef]:
        """(epoch, ref to the previous epoch's labels [H, N]); ``ray.put`` at most once per epoch."""
        if self._published is None or self._published[0] != self._memory.epoch:
            ref = ray.put(self._memory.published())
            # Serve prev from the object store's zero-copy view and drop the heap copy, so that the
            # published labels are held once on this node, not twice.
            self._memory.adopt_published(ray.get(ref))
            self._published = (self._memory.epoch, ref)
        return self._published

    def write(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> int:
        """See ``AssignmentMemory.write``."""
        return self._memory.write(sample_index_B, labels_HB, epoch)

    def sufficient_stats(self, epoch: int | None) -> ShardStats:
        """See ``AssignmentMemory.sufficient_stats`` (with the true labels given at creation)."""
        return self._memory.sufficient_stats(self._true_labels, epoch=epoch)

    def commit_epoch(
        self, epoch: int | None, counters: list[np.ndarray] | None, duals: list[np.ndarray] | None
    ) -> None:
        """See ``AssignmentMemory.commit_epoch``."""
        self._memory.commit_epoch(counters, duals, epoch=epoch)
        self._published = None

    def recount(self, head: int) -> np.ndarray:
        """See ``AssignmentMemory.recount``."""
        return self._memory.recount(head)

    def state_dict(self) -> ShardState:
        """See ``AssignmentMemory.state_dict``."""
        return self._memory.state_dict()

    def load_state_dict(self, state: ShardState) -> None:
        """See ``AssignmentMemory.load_state_dict``."""
        self._memory.load_state_dict(state)
        self._published = None

    def reset(self) -> None:
        """See ``AssignmentMemory.reset``."""
        self._memory.reset()
        self._published = None


ClusterCoordinatorActor = ray.remote(ClusterCoordinator)
"""The Ray actor class; ``CoordinatorClient.create`` makes its instances."""
