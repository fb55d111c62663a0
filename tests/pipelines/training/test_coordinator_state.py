"""The coordinator's typed state: validation when built, the dict form and its errors (no Ray)."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
import pytest

from pipelines.training.coordinator_state import CoordinatorState, ShardState
from pipelines.training.id_ranges import shard_ranges
from pipelines.training.memory import AssignmentMemory
from tests.pipelines.training.memory_builders import assert_same, close_epoch

KS = (3, 5)


def shard(lo: int, hi: int, epoch: int = 1, **changes: Any) -> ShardState:
    ids = np.arange(lo, hi)
    values: dict[str, Any] = {"lo": lo, "hi": hi, "ks": KS, "epoch": epoch,
                              "prev_HN": np.stack([ids % k for k in KS]).astype(np.int16),
                              "counters": [np.ones(k) for k in KS], "duals": None}
    return ShardState(**(values | changes))


def two_shards() -> CoordinatorState:
    return CoordinatorState(ranges=((0, 3), (3, 7)), ks=KS, shards=(shard(0, 3), shard(3, 7)))


def test_built_values_are_normalised() -> None:
    s = ShardState(lo=np.int64(2), hi=4, ks=[3, 5], epoch=0, prev_HN=np.zeros((2, 2), np.int32),  # type: ignore[arg-type]
                   counters=[np.array([1, 2, 3]), np.arange(5)])
    assert (s.lo, s.ks, type(s.lo)) == (2, (3, 5), int)
    assert s.counters is not None and all(c.dtype == np.float64 for c in s.counters)
    state = CoordinatorState(ranges=[[0, 3], [3, 7]], ks=[3, 5], shards=[shard(0, 3), shard(3, 7)])  # type: ignore[arg-type]
    assert state.ranges == ((0, 3), (3, 7)) and state.ks == KS and isinstance(state.shards, tuple)
    assert state.num_samples == 7 and state.epoch == 1
    np.testing.assert_array_equal(state.labels(), np.stack([np.arange(7) % k for k in KS]))


@pytest.mark.parametrize(("changes", "match"), [
    ({"lo": 3}, "empty or negative"),
    ({"epoch": -1}, "epoch -1 is negative"),
    ({"prev_HN": np.zeros((2, 2), np.int16)}, r"prev_HN must be integer labels of shape \(heads, ids\) = \(2, 3\)"),
    ({"prev_HN": np.zeros((2, 3))}, "prev_HN must be integer labels"),
    ({"counters": [np.ones(3)]}, r"shard \[0, 3\) counters: expected one array per head \(2\)"),
    ({"duals": [np.ones(3), np.ones(4)]}, r"shard \[0, 3\) duals\[1\]: expected shape \(5,\)"),
    ({"ks": ()}, "ks is empty"),
])
def test_a_bad_shard_state_is_refused_when_built(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shard(**({"lo": 0, "hi": 3} | changes))


def test_a_bad_coordinator_state_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="contiguous id ranges from 0"):
        CoordinatorState(ranges=((1, 3), (3, 7)), ks=KS, shards=(shard(1, 3), shard(3, 7)))
    with pytest.raises(ValueError, match="contiguous"):
        CoordinatorState(ranges=((0, 3), (4, 7)), ks=KS, shards=(shard(0, 3), shard(4, 7)))
    with pytest.raises(ValueError, match="1 shard states for 2 id ranges"):
        CoordinatorState(ranges=((0, 3), (3, 7)), ks=KS, shards=(shard(0, 3),))
    with pytest.raises(ValueError, match=r"ids \[3, 7\) .* where ids \[0, 3\)"):
        CoordinatorState(ranges=((0, 3), (3, 7)), ks=KS, shards=(shard(3, 7), shard(0, 3)))
    with pytest.raises(ValueError, match="ks=\\[3, 5\\] is where .* ks=\\[3, 6\\]"):
        CoordinatorState(ranges=((0, 3),), ks=(3, 6), shards=(shard(0, 3),))
    mixed = CoordinatorState(ranges=((0, 3), (3, 7)), ks=KS, shards=(shard(0, 3, epoch=1), shard(3, 7, epoch=2)))
    with pytest.raises(ValueError, match=r"different epochs \[1, 2\]"):
        _ = mixed.epoch


def test_dict_form_round_trips_exactly_and_keeps_format_1() -> None:
    state = two_shards()
    data = state.to_dict()
    assert data["format"] == CoordinatorState.FORMAT == ShardState.FORMAT == 1
    assert list(data) == ["format", "ranges", "ks", "shards"]
    assert list(data["shards"][0]) == ["format", "lo", "hi", "ks", "epoch", "prev_HN", "counters", "duals", "history"]
    assert data["shards"][0]["history"] == [] and data["shards"][0]["duals"] is None
    again = CoordinatorState.from_dict(pickle.loads(pickle.dumps(data)))
    assert_same(again, state)
    assert again.shards[0].prev_HN.dtype == np.int16


def test_memory_state_is_a_shard_state_that_replace_can_transform() -> None:
    memory = AssignmentMemory(0, 4, [3])
    memory.write(np.arange(4), np.array([[0, 1, 2, 0]]), epoch=0)
    close_epoch(memory, [np.array([2.0, 1.0, 1.0])], [np.zeros(3)])
    state = memory.state_dict()
    assert isinstance(state, ShardState) and state.epoch == 1
    moved = dataclasses.replace(state, prev_HN=(state.prev_HN + 1) % 3)
    assert moved.epoch == 1 and moved.prev_HN.tolist() == [[1, 2, 0, 1]]
    with pytest.raises(ValueError, match="prev_HN"):
        dataclasses.replace(state, prev_HN=state.prev_HN[:, :2])  # a replaced value is checked too
    memory.load_state_dict(moved)
    np.testing.assert_array_equal(memory.published(), moved.prev_HN)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.pop("format"), "shard 0: coordinator state format None is not 1"),
    (lambda d: d.update(format=2), "format 2 is not 1"),
    (lambda d: d.pop("prev_HN"), r"shard 0: keys \['prev_HN'\] are missing"),
    (lambda d: d.update(prev_HN=np.zeros((2, 9), np.int16)), r"shard 0: shard \[0, 3\): prev_HN must be"),
    (lambda d: d.update(counters=[np.ones(2), np.ones(5)]), r"counters\[0\]: expected shape \(3,\)"),
])
def test_from_dict_names_the_problem_in_a_shard(edit: Any, match: str) -> None:
    data = two_shards().to_dict()
    edit(data["shards"][0])
    with pytest.raises(ValueError, match=match):
        CoordinatorState.from_dict(data, where="ckpt/coordinator.pt")
    with pytest.raises(ValueError, match="^ckpt/coordinator.pt, shard 0: "):
        CoordinatorState.from_dict(data, where="ckpt/coordinator.pt")


def test_from_dict_names_the_problem_of_the_whole_state() -> None:
    with pytest.raises(ValueError, match="expected a dict .* got list"):
        CoordinatorState.from_dict([1, 2])
    with pytest.raises(ValueError, match="format None is not 1"):
        CoordinatorState.from_dict({"epoch": 3})  # e.g. a hand-made test checkpoint of before
    data = two_shards().to_dict()
    del data["ks"]
    with pytest.raises(ValueError, match=r"keys \['ks'\] are missing"):
        CoordinatorState.from_dict(data)
    data = two_shards().to_dict() | {"ranges": shard_ranges(7, 3)}
    with pytest.raises(ValueError, match="^coordinator state: 2 shard states for 3 id ranges"):
        CoordinatorState.from_dict(data)
    with pytest.raises(ValueError, match="'shards' must be a list"):
        CoordinatorState.from_dict(two_shards().to_dict() | {"shards": None})
