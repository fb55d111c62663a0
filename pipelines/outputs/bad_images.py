"""The error of an inference that met more unusable images than ``max_bad_fraction`` allows.

``pipelines.dataset.bad_input`` counts bad samples by shard and key; a person looking for the damaged files
wants their ``sample_index`` and their source (the original path or URI), the count against the budget, and
the setting that would skip them. ``too_much_bad_input`` builds that one message.
"""

from __future__ import annotations

import math
import re

import numpy as np

from pipelines.dataset.bad_input import BadInputError, BadInputReport
from pipelines.dataset.info import DatasetInfo, parse_key
from pipelines.outputs.image_sources import SourceLookup

_SAMPLE_RE = re.compile(r"^shard (?P<shard>\S+) key (?P<key>\S+): (?P<why>.*)$")
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")


def fraction_allowing(bad: int, num_samples: int) -> float:
    """The smallest ``max_bad_fraction`` (three decimals, rounded up) whose budget admits ``bad`` of ``num_samples``."""
    if num_samples <= 0:
        return 1.0
    return min(1.0, math.ceil(1000 * bad / num_samples) / 1000)


def describe_example(example: str, sources: SourceLookup, info: DatasetInfo) -> str:
    """``shard S key K: reason`` as ``sample_index I (source SRC, shard S key K): reason``; other text as is."""
    match = _SAMPLE_RE.match(example)
    parsed = parse_key(match["key"]) if match else None
    first = {s.name: s.first_index for s in info.shards}
    if match is None or parsed is None or match["shard"] not in first:
        return example
    index = first[match["shard"]] + parsed[1]
    why = _OBJECT_REPR.sub("", match["why"])
    if not 0 <= index < sources.num_samples:
        return f"shard {match['shard']} key {match['key']}: {why}"
    source = sources.take(np.asarray([index]))[0].as_py()
    return f"sample_index {index} (source {source}, shard {match['shard']} key {match['key']}): {why}"


def too_much_bad_input(report: BadInputReport, sources: SourceLookup, info: DatasetInfo, run_id: str,
                       max_bad_fraction: float) -> BadInputError:
    """The ``BadInputError`` that ends an inference over its bad-input budget (the caller raises it)."""
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.by_reason.items()))
    listed = "; ".join(describe_example(e, sources, info) for e in report.examples)
    more = f" (the first {len(report.examples)} listed)" if len(report.examples) < report.bad else ""
    return BadInputError(
        f"inference of run {run_id} on dataset {info.name!r}: {report.bad} of {report.num_samples} images cannot "
        f"be used ({reasons}), more than max_bad_fraction={max_bad_fraction} allows ({report.budget}). Bad{more}: "
        f"{listed}. Nothing was published. Replace or remove these images and re-ingest, or skip them with "
        f"--set max_bad_fraction={fraction_allowing(report.bad, report.num_samples)}"
    )
