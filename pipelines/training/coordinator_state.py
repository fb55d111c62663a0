"""The coordinator's checkpointed state as typed values, and their dict form on disk (format 1).

``ShardState`` is one shard's state at an epoch boundary: the previous epoch's labels y_h[i] of the ids
[lo, hi) and the authoritative counters n_h and duals rho_h (SeCu, ICCV 2023, Sec. 3.2-3.3).
``CoordinatorState`` holds every shard's, in id order. It is what ``CoordinatorClient.state_dict``
returns and ``load_state_dict`` takes, what ``coordinator.pt`` of a checkpoint holds (``to_dict``, written
and read by ``pipelines.training.checkpointing`` only), and what the warm start and the reclustering
alignment build or transform (``dataclasses.replace``). Values are validated when built, so a bad state
fails where it is made, with a message naming the problem.

The dict form (``to_dict`` / ``from_dict``), unchanged since format 1::

    {"format": 1, "ranges": [(lo, hi), ...], "ks": [K_0, ...],
     "shards": [{"format": 1, "lo": lo, "hi": hi, "ks": [...], "epoch": e, "prev_HN": int16|int32 [H, hi - lo],
                 "counters": [float64 [K_h], ...] | None, "duals": [...] | None, "history": []}, ...]}

``history`` (per-epoch statistics that nothing read) is no longer kept: it is written empty, so that
the code of before its removal still reads new files, and it is ignored when read.

Legend: H = number of heads, K = clusters of a head, N = ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

FORMAT = 1
"""Version of the dict form (bumped on incompatible changes; older versions keep being read)."""

_INT16_MAX_K = int(np.iinfo(np.int16).max)
_SHARD_KEYS = ("lo", "hi", "ks", "epoch", "prev_HN", "counters", "duals")
_STATE_KEYS = ("ranges", "ks", "shards")


def label_dtype(ks: Sequence[int]) -> np.dtype[Any]:
    """Smallest signed dtype holding every label of heads with ``ks`` clusters and the -1 sentinel."""
    return np.dtype(np.int16) if max(ks) <= _INT16_MAX_K else np.dtype(np.int32)


def validate_ks(ks: Sequence[int]) -> list[int]:
    """The number of clusters of every head as ints; ValueError when empty or out of [1, 2**31 - 1]."""
    out = [int(k) for k in ks]
    if not out:
        raise ValueError("ks is empty: give the number of clusters of every head, e.g. ks=[10, 20]")
    if any(k < 1 or k > np.iinfo(np.int32).max for k in out):
        raise ValueError(f"ks={out}: every head needs 1 <= K <= 2**31 - 1 clusters")
    return out


def per_head(values: Sequence[Any] | None, ks: Sequence[int], what: str) -> list[np.ndarray] | None:
    """Validates per-head vectors (counters or duals, one [K_h] per head) and returns float64 copies."""
    if values is None:
        return None
    if len(values) != len(ks):
        raise ValueError(f"{what}: expected one array per head ({len(ks)}), got {len(values)}")
    out = []
    for h, (v, k) in enumerate(zip(values, ks, strict=True)):
        arr = np.array(v, dtype=np.float64, copy=True).reshape(-1)
        if arr.shape != (k,):
            raise ValueError(f"{what}[{h}]: expected shape ({k},), got {np.shape(v)}")
        out.append(arr)
    return out


def _check_dict(data: Any, keys: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a dict (coordinator state format {FORMAT}), got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: coordinator state format {data.get('format')!r} is not {FORMAT} "
                         "(written by an unknown version, or not a coordinator state)")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{where}: keys {missing} are missing from the coordinator state")
    return data


@dataclass(frozen=True, eq=False)
class ShardState:
    """One shard's state at an epoch boundary: ids [lo, hi), what ``AssignmentMemory.state_dict`` returns.

    Built values are checked and normalised: ``ks`` a tuple of ints, ``prev_HN`` integer labels of shape
    [H, hi - lo] (kept as given, not copied), ``counters``/``duals`` float64 copies of one [K_h] vector per
    head, or None when the run has none.
    """

    lo: int
    hi: int
    ks: tuple[int, ...]
    epoch: int
    """The epoch the shard writes next (1 + the last completed epoch; 0 for a fresh or warm-started run)."""
    prev_HN: np.ndarray
    """The previous epoch's labels, -1 for none: int16 when every K <= 32767, else int32."""
    counters: list[np.ndarray] | None = None
    duals: list[np.ndarray] | None = None

    FORMAT: ClassVar[int] = FORMAT

    def __post_init__(self) -> None:
        ks = tuple(validate_ks(self.ks))
        lo, hi, epoch = int(self.lo), int(self.hi), int(self.epoch)
        where = f"shard [{lo}, {hi})"
        if not 0 <= lo < hi:
            raise ValueError(f"{where}: the id range is empty or negative (need 0 <= lo < hi)")
        if epoch < 0:
            raise ValueError(f"{where}: epoch {epoch} is negative")
        prev_HN = np.asarray(self.prev_HN)
        if prev_HN.shape != (len(ks), hi - lo) or not np.issubdtype(prev_HN.dtype, np.integer):
            raise ValueError(f"{where}: prev_HN must be integer labels of shape (heads, ids) = {(len(ks), hi - lo)}, "
                             f"got {prev_HN.dtype} {prev_HN.shape}")
        values = {"lo": lo, "hi": hi, "ks": ks, "epoch": epoch, "prev_HN": prev_HN,
                  "counters": per_head(self.counters, ks, f"{where} counters"),
                  "duals": per_head(self.duals, ks, f"{where} duals")}
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def num_samples(self) -> int:
        """Size of the id range."""
        return self.hi - self.lo

    def to_dict(self) -> dict[str, Any]:
        """The dict form saved in ``coordinator.pt`` (module docstring); arrays are not copied."""
        return {"format": FORMAT, "lo": self.lo, "hi": self.hi, "ks": list(self.ks), "epoch": self.epoch,
                "prev_HN": self.prev_HN, "counters": None if self.counters is None else list(self.counters),
                "duals": None if self.duals is None else list(self.duals), "history": []}

    @classmethod
    def from_dict(cls, data: Any, where: str = "coordinator shard") -> ShardState:
        """Inverse of ``to_dict``; ValueError naming the problem (and ``where``) for anything else."""
        data = _check_dict(data, _SHARD_KEYS, where)
        try:
            return cls(lo=data["lo"], hi=data["hi"], ks=tuple(data["ks"]), epoch=data["epoch"],
                       prev_HN=np.asarray(data["prev_HN"]), counters=data["counters"], duals=data["duals"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True, eq=False)
class CoordinatorState:
    """Every shard's state at one epoch boundary, shards in id order covering [0, N) without gaps."""

    ranges: tuple[tuple[int, int], ...]
    ks: tuple[int, ...]
    shards: tuple[ShardState, ...]

    FORMAT: ClassVar[int] = FORMAT

    def __post_init__(self) -> None:
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.ranges)
        ks = tuple(validate_ks(self.ks))
        shards = tuple(self.shards)
        if not ranges or ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False)):
            raise ValueError(f"ranges {list(ranges)} must be contiguous id ranges from 0 (see shard_ranges)")
        if len(shards) != len(ranges):
            raise ValueError(f"{len(shards)} shard states for {len(ranges)} id ranges")
        for (lo, hi), shard in zip(ranges, shards, strict=True):
            if not isinstance(shard, ShardState):
                raise ValueError(f"shard [{lo}, {hi}): expected a ShardState, got {type(shard).__name__}")
            if (shard.lo, shard.hi, shard.ks) != (lo, hi, ks):
                raise ValueError(f"the shard state for ids [{shard.lo}, {shard.hi}) with ks={list(shard.ks)} is "
                                 f"where ids [{lo}, {hi}) with ks={list(ks)} belong")
        for name, value in (("ranges", ranges), ("ks", ks), ("shards", shards)):
            object.__setattr__(self, name, value)

    @property
    def num_samples(self) -> int:
        """N: the state covers ids [0, N)."""
        return self.ranges[-1][1]

    @property
    def epoch(self) -> int:
        """The epoch every shard writes next; ValueError when the shards disagree."""
        epochs = sorted({s.epoch for s in self.shards})
        if len(epochs) != 1:
            raise ValueError(f"the coordinator shards are at different epochs {epochs}")
        return epochs[0]

    def labels(self) -> np.ndarray:
        """The previous epoch's labels [H, N] of every id (a new array; -1: none)."""
        return np.concatenate([s.prev_HN for s in self.shards], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """The dict form saved in ``coordinator.pt`` (module docstring); arrays are not copied."""
        return {"format": FORMAT, "ranges": list(self.ranges), "ks": list(self.ks),
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "coordinator state") -> CoordinatorState:
        """Inverse of ``to_dict``; ValueError naming the problem (and ``where``) for anything else."""
        data = _check_dict(data, _STATE_KEYS, where)
        if not isinstance(data["shards"], list | tuple):
            raise ValueError(f"{where}: 'shards' must be a list, got {type(data['shards']).__name__}")
        shards = [ShardState.from_dict(s, f"{where}, shard {i}") for i, s in enumerate(data["shards"])]
        try:
            return cls(ranges=tuple(tuple(r) for r in data["ranges"]), ks=tuple(data["ks"]), shards=tuple(shards))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
