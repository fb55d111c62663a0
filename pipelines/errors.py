"""Reading errors that cross Ray's process boundaries (no Ray import): what a wrapper carries, whether an
error is a full, over-quota or read-only disk, and a bad-input error that survives only as traceback text.

Shared by the jobs' exit-code decision (``jobs.common.classify_error``) and the training's no-retry rule
(``pipelines.training.fail_fast``), so that both read an error the same way.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from typing import Any

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_DISK_TEXTS = ("no space left on device", "disk quota exceeded", "read-only file system")
"""pyarrow's and torch's wording for the same errors, whose errno they do not always set."""
_BAD_INPUT_LINE = re.compile(r"pipelines\.dataset\.bad_input\.BadInputError: (.+)")


def inner_errors(err: BaseException) -> Iterator[BaseException]:
    """What ``err`` wraps, one level: a Ray task's ``cause``, a Train controller's or workers' failures,
    ``__cause__``."""
    candidates: list[Any] = [getattr(err, "cause", None), getattr(err, "controller_failure", None)]
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict):
        candidates.extend(failures.values())
    candidates.append(err.__cause__)
    yield from (c for c in candidates if isinstance(c, BaseException) and c is not err)


def all_errors(err: BaseException) -> Iterator[BaseException]:
    """``err`` and everything it wraps, at any depth (each once)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) not in seen:
            seen.add(id(e))
            yield e
            stack.extend(inner_errors(e))


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a full, over-quota or read-only disk (by errno, or by the words when none is set)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return True
    text = str(err).lower()
    return isinstance(err, OSError | RuntimeError) and any(t in text for t in _DISK_TEXTS)


def bad_input_in_text(err: BaseException) -> str | None:
    """The message of a ``BadInputError`` that reached this process only as text in a remote traceback (a Ray
    Data task's), else None."""
    match = _BAD_INPUT_LINE.search(f"{err}\n{getattr(err, 'traceback_str', '')}")
    return match.group(1).strip() if match else None
