"""Bad input policy: what happens to samples that cannot be used, counted across Ray tasks.

Kinds of bad input and what happens to each (reason names as counted):

- ``undecodable``: image bytes PIL cannot decode (corrupt, truncated file, wrong extension);
- ``empty``: an image member of zero bytes;
- ``non_image_member``: a sample without an image member (only ``.json``, ``.txt``, ...);
- ``too_large``: more pixels than ``BadInputPolicy.max_pixels`` (checked from the header, before
  decoding, so a decompression bomb costs nothing);
- ``bad_metadata``: no usable ``sample_index`` (json unreadable and a key that does not name it);
- ``truncated_shard`` / ``damaged_shard``: the samples of a shard after the point where it is cut
  short (the file is smaller than ingest wrote it) or damaged (same size, a broken tar header or
  member). The whole samples before the damage are read and used
  (``pipelines.dataset.shard_reader``); the rest, the shard's count in ``dataset.json`` minus those
  read, are counted once per shard (``cut_shard``);
- ``missing_shard`` / ``changed_shard``: a shard that is gone, or larger than ingest wrote it (replaced
  by other content). Found before reading starts (one listing); the whole shard is left out and its
  samples (from the manifest counts) are counted bad;
- ``lost``: samples that never arrived although their shard was read, e.g. a shard whose read task
  failed on a storage error. Ray Data tolerates up to ``max_errored_blocks`` failed read tasks (one
  task per shard, so a failure loses at most the rest of that shard) and the loss is counted at the
  end of the epoch by ``verify_epoch`` comparing the rows the consumers received with the manifest.

Default (``BadInputPolicy()``): skip and count; log the first ``log_first`` with shard, key and
reason; fail with ``BadInputError`` as soon as more than ``max_bad_fraction`` of the dataset's
samples are bad. Bad samples are identified by (shard, key) and counted once, however many epochs see
them. Counting across tasks uses one small actor, ``BadInputCounter``, a thin wrapper over the plain
``BadInputTally`` (``new_bad_input_counter`` starts one); every decode batch reports to it and
learns whether the limit is crossed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import ray

logger = logging.getLogger(__name__)

REASONS = ("undecodable", "empty", "non_image_member", "too_large", "bad_metadata", "truncated_shard",
           "damaged_shard", "missing_shard", "changed_shard", "lost")


class BadInputError(ValueError):
    """More input is bad than the policy allows."""


@dataclass(frozen=True)
class BadInputPolicy:
    """How much bad input a dataset may contain before reading fails."""

    max_bad_fraction: float = 0.01
    """Fail when more than this fraction of the dataset's samples is bad (0 = fail on the first)."""
    max_pixels: int = 50_000_000
    """Images with more pixels (from their header) are bad (``too_large``), never decoded."""
    log_first: int = 5
    """Log this many bad samples (shard, key, reason) in full; the rest are only counted."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels} must be positive")
        if self.log_first < 0:
            raise ValueError(f"log_first={self.log_first} must be >= 0")

    def budget(self, num_samples: int) -> int:
        """The largest number of bad samples allowed in a dataset of ``num_samples``: the fraction, rounded down,
        but at least one when the fraction is above 0 (so that one bad file does not stop a collection of a
        few dozen images under the default 1 %); 0 when the fraction is 0."""
        if self.max_bad_fraction <= 0:
            return 0
        return max(1, math.floor(self.max_bad_fraction * num_samples + 1e-9))


@dataclass(frozen=True)
class BadSample:
    """One bad sample, as reported by a decode batch."""

    shard: str
    key: str
    reason: str
    detail: str = ""


@dataclass
class BadInputReport:
    """Counts so far (cumulative; bad samples counted once each)."""

    num_samples: int
    """Samples in the dataset (manifest)."""
    bad: int
    """Distinct bad samples, excluded shards and lost samples included."""
    by_reason: dict[str, int]
    excluded_shards: list[str]
    budget: int
    """Bad samples the policy allows."""
    decoded: int = 0
    """Good samples decoded so far, all epochs together."""
    examples: list[str] = field(default_factory=list)
    cut_shards: dict[str, int] = field(default_factory=dict)
    """Shards read up to a damaged spot: the samples each is missing."""

    @property
    def over_limit(self) -> bool:
        return self.bad > self.budget

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items())) or "none"
        return (f"{self.bad} of {self.num_samples} samples bad ({reasons}); the policy allows "
                f"{self.budget} (max_bad_fraction)")


class BadInputTally:
    """The counting logic, without Ray (``BadInputCounter`` wraps it in an actor)."""

    def __init__(self, num_samples: int, policy: BadInputPolicy) -> None:
        self.num_samples = num_samples
        self.policy = policy
        self._seen: set[tuple[str, str]] = set()
        self._by_reason: Counter[str] = Counter()
        self._excluded: dict[str, tuple[str, int]] = {}
        self._cut: dict[str, int] = {}
        self._lost = 0
        self._decoded = 0
        self._examples: list[str] = []

    def exclude_shard(self, shard: str, reason: str, count: int) -> None:
        """A shard left out before reading (counted once however often it is registered)."""
        if shard not in self._excluded:
            self._excluded[shard] = (reason, count)
            self._by_reason[reason] += count
            self._note(f"shard {shard}: {reason}, its {count} samples are left out")

    def cut_shard(self, shard: str, reason: str, missing: int, detail: str = "") -> None:
        """A shard read up to a damaged spot: the ``missing`` samples after it (counted once per shard, the
        largest loss any read of it saw)."""
        if missing > self._cut.get(shard, 0):
            self._by_reason[reason] += missing - self._cut.get(shard, 0)
            if shard not in self._cut:
                self._note(f"shard {shard}: {reason} ({detail}), {missing} samples after the damage are left out")
            self._cut[shard] = missing

    def record(self, decoded: int, bad: list[BadSample]) -> bool:
        """Count a decode batch: ``decoded`` good samples and the bad ones. Returns over-limit."""
        self._decoded += decoded
        for sample in bad:
            ident = (sample.shard, sample.key)
            if ident in self._seen:
                continue
            self._seen.add(ident)
            self._by_reason[sample.reason] += 1
            detail = f": {sample.detail}" if sample.detail else ""
            self._note(f"shard {sample.shard} key {sample.key}: {sample.reason}{detail}")
        return self.report().over_limit

    def record_lost(self, lost: int) -> None:
        """Samples that did not arrive in an epoch (kept as the largest loss seen in any epoch)."""
        if lost > self._lost:
            self._by_reason["lost"] += lost - self._lost
            self._lost = lost

    def _note(self, text: str) -> None:
        if len(self._examples) < self.policy.log_first:
            self._examples.append(text)
            logger.warning("bad input: %s", text)

    def report(self) -> BadInputReport:
        return BadInputReport(
            num_samples=self.num_samples, bad=sum(self._by_reason.values()), by_reason=dict(self._by_reason),
            excluded_shards=sorted(self._excluded), budget=self.policy.budget(self.num_samples),
            decoded=self._decoded, examples=list(self._examples), cut_shards=dict(self._cut),
        )


class BadInputCounter:
    """Actor over one ``BadInputTally``, shared by all decode tasks of a dataset.

    Create it with ``new_bad_input_counter``; every method is called through ``.remote``.
    """

    def __init__(self, num_samples: int, policy: BadInputPolicy) -> None:
        # No logging.basicConfig here: an actor must not configure the root logger (Ray forwards the
        # worker's output to the driver). The tally's warnings go through this module's logger, which
        # passes WARNING whatever the root level, and reach stderr through logging's last-resort handler
        # when nothing else is configured.
        logger.setLevel(logging.WARNING)
        self.tally = BadInputTally(num_samples, policy)

    def exclude_shard(self, shard: str, reason: str, count: int) -> None:
        self.tally.exclude_shard(shard, reason, count)

    def cut_shard(self, shard: str, reason: str, missing: int, detail: str = "") -> None:
        self.tally.cut_shard(shard, reason, missing, detail)

    def record(self, decoded: int, bad: list[BadSample]) -> bool:
        return self.tally.record(decoded, bad)

    def record_lost(self, lost: int) -> None:
        self.tally.record_lost(lost)

    def report(self) -> BadInputReport:
        return self.tally.report()


_BadInputCounterActor = ray.remote(num_cpus=0, max_restarts=0)(BadInputCounter)


def new_bad_input_counter(num_samples: int, policy: BadInputPolicy) -> ray.actor.ActorHandle:
    """Start a ``BadInputCounter`` actor for a dataset of ``num_samples`` (owned by this process)."""
    return cast(ray.actor.ActorHandle, _BadInputCounterActor.remote(num_samples, policy))


def _report(counter: ray.actor.ActorHandle) -> BadInputReport:
    report: Any = ray.get(counter.report.remote())
    assert isinstance(report, BadInputReport)
    return report


def verify_epoch(counter: ray.actor.ActorHandle, rows_seen: int, *,
                 expected: int | None = None) -> BadInputReport:
    """Compare the rows all consumers received in one full epoch with the manifest; fail over budget.

    Args:
        counter: The dataset's ``BadInputCounter``.
        rows_seen: Rows received by all consumers together in the epoch.
        expected: Rows the epoch should have delivered; default the manifest count minus bad samples.
            Pass it when a split drops rows on purpose (``streaming_split(equal=True)``).

    Returns:
        The report (``by_reason['lost']`` holds the missing rows).

    Raises:
        BadInputError: When bad and lost samples together exceed the policy's budget.
    """
    report = _report(counter)
    known_bad = report.bad - report.by_reason.get("lost", 0)
    want = report.num_samples - known_bad if expected is None else expected
    lost = max(0, want - rows_seen)
    if lost:
        logger.warning("bad input: %d samples did not arrive this epoch (a damaged shard or a failed read "
                       "task); %d expected, %d received", lost, want, rows_seen)
        ray.get(counter.record_lost.remote(lost))
        report = _report(counter)
    if report.over_limit:
        raise BadInputError(f"too much bad input: {report.summary()}. Fix or re-ingest the listed "
                            f"shards, or raise max_bad_fraction. First: {report.examples}")
    return report
