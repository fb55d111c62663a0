"""No retry of an error that retrying cannot fix.

Ray Train restarts the worker group up to ``compute.max_failures`` times after any worker error, from the
last checkpoint. That is right for a lost node or a killed process, and wrong for an error that the next
attempt meets again at the same place: the bad-input budget exceeded (``BadInputError``), a damaged
checkpoint (``CheckpointDamagedError``), a full or read-only disk (``ENOSPC``, ``EDQUOT``, ``EROFS``). Each
such retry costs a worker-group start and a replay of the epoch, and the reason ends up buried in worker
lines (issue 17 measured 3 retries, 4.5 minutes, exit 1 for one corrupt image).

``StopOnDeterministicErrors`` is a ``ray.train.UserCallback``: the Train controller calls its
``after_exception`` with the workers' errors before it decides to retry; when one of them is
deterministic the callback raises it, which ends the run at once (the controller treats a callback's
error as its own, and does not retry it). ``trainer.fit()`` then raises Ray's ``ControllerError``
carrying that error, and the job maps it to exit 2 with its message (``jobs.common.classify_error``).
"""

from __future__ import annotations

import errno
import logging

from ray.train import UserCallback

from pipelines.dataset.bad_input import BadInputError
from pipelines.errors import all_errors, bad_input_in_text, disk_full
from pipelines.training.checkpoint_integrity import CheckpointDamagedError

logger = logging.getLogger(__name__)


def deterministic_error(err: BaseException) -> BaseException | None:
    """The error inside ``err`` that a retry meets again (bad-input budget, damaged checkpoint, full or
    read-only disk), or None when a retry may succeed (a lost worker, a killed actor, a network error)."""
    for e in all_errors(err):
        if isinstance(e, BadInputError | CheckpointDamagedError) or disk_full(e):
            return e
    message = bad_input_in_text(err)  # a Ray Data task's error reaches a train worker only as text
    return None if message is None else BadInputError(message)


def no_space(err: BaseException, what: str, where: str, nbytes: int) -> OSError:
    """The error to raise instead of ``err`` (a ``disk_full`` one): what could not be written, where, how much
    room it needs and what to do."""
    return OSError(errno.ENOSPC, (
        f"no space left to write {what} (at least {nbytes / 2**20:.1f} MiB) under {where}: free that much there "
        f"(or use storage with room) and resubmit the same run id; it resumes from its last complete checkpoint, "
        f"which is intact ({' '.join(str(err).split())[:200]})"))


class StopOnDeterministicErrors(UserCallback):
    """Ends a Ray Train run at the first worker error that retrying cannot fix (see the module docstring)."""

    def after_exception(self, run_context: object, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            found = deterministic_error(worker_exceptions[rank])
            if found is not None:
                logger.error("training worker %d failed with an error that a retry would meet again, so the run "
                             "stops without retrying: %s", rank, " ".join(str(found).split()))
                raise found
