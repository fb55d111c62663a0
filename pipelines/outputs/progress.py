"""Progress of a batch inference a person can read: done/total, images/s and the time left, every few seconds.

The Assigner actors add the rows of each batch they cluster to a small ``ProgressCounter`` actor (a
fire-and-forget call per batch, no waiting); while the driver waits for the write to finish, a thread
of it asks the counter every ``every_s`` seconds and logs one line::

    inference of run fm1: 4,096 of 10,000 images (41%), 1,234 images/s, about 5 s left
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray

logger = logging.getLogger(__name__)

EVERY_S = 10.0
"""Seconds between progress lines."""


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Rows done so far, added to by every Assigner actor."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, rows: int) -> None:
        self.done += int(rows)

    def value(self) -> int:
        return self.done


def progress_message(what: str, done: int, total: int, seconds: float) -> str:
    """``what: done of total images (p%), r images/s, about t left`` (the rate and time once any are done)."""
    share = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"{what}: {done:,} of {total:,} images{share}"
    if done and seconds > 0:
        rate = done / seconds
        left = max(0.0, (total - done) / rate)
        line += f", {rate:,.0f} images/s, about {_duration(left)} left"
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def inference_progress(what: str, total: int, every_s: float | None = None) -> Iterator[Any]:
    """A ``ProgressCounter`` for the Assigners, logged every ``every_s`` (default ``EVERY_S``) seconds while the
    block runs."""
    every_s = EVERY_S if every_s is None else every_s
    counter = ProgressCounter.remote()  # type: ignore[attr-defined]
    stop = threading.Event()
    start = time.monotonic()

    def report() -> None:
        while not stop.wait(every_s):
            try:
                done = int(ray.get(counter.value.remote(), timeout=every_s))
            except Exception:  # noqa: BLE001 - progress is best effort: never fail the inference over it
                continue
            logger.info("%s", progress_message(what, done, total, time.monotonic() - start))

    thread = threading.Thread(target=report, name="inference-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join(timeout=every_s + 1)
        ray.kill(counter)
