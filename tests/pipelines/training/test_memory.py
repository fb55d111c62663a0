"""Tests of the Ray-free coordinator layer: AssignmentMemory, sharded statistics, sharding (no Ray)."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest

from pipelines.training.id_ranges import resolve_label_fetch, route, shard_ranges
from pipelines.training.memory import (
    AssignmentMemory,
    CoordinatorNotRestoredError,
    StaleEpochError,
    combine_stats,
    label_dtype,
)
from secu.metrics import evaluate_clustering, size_stats
from tests.pipelines.training.memory_builders import assert_same, close_epoch, counts, interleave, rank_batches


def test_label_dtype_is_the_smallest_that_fits() -> None:
    assert label_dtype([10, 32767]) == np.int16
    assert label_dtype([10, 32768]) == np.int32
    assert AssignmentMemory(0, 4, [40000]).prev_HN.dtype == np.int32
    memory = AssignmentMemory(10, 14, [3, 5])
    assert memory.prev_HN.dtype == np.int16 and memory.prev_HN.shape == (2, 4)
    assert (memory.published() == -1).all()


def test_write_goes_to_next_and_shows_after_the_swap() -> None:
    memory = AssignmentMemory(10, 15, [3, 4])
    assert memory.write(np.array([11, 13]), np.array([[2, 1], [3, 0]]), epoch=0) == 2
    assert (memory.published() == -1).all(), "prev must not change during the epoch"
    with pytest.raises(ValueError):
        memory.published()[0, 0] = 1  # read-only
    close_epoch(memory)
    assert memory.epoch == 1
    np.testing.assert_array_equal(memory.published(), [[-1, 2, -1, 1, -1], [-1, 3, -1, 0, -1]])
    # Rows not written in epoch 1 keep their label; written rows take the new one.
    memory.write(np.array([14, 11]), np.array([[0, 1], [1, 2]]), epoch=1)
    close_epoch(memory)
    np.testing.assert_array_equal(memory.published(), [[-1, 1, -1, 1, 0], [-1, 2, -1, 0, 1]])


def test_duplicate_ids_first_occurrence_wins_and_rewrites_are_ignored() -> None:
    memory = AssignmentMemory(0, 4, [5])
    written = memory.write(np.array([2, 1, 2, 2]), np.array([[4, 3, 0, 1]]), epoch=0)
    assert written == 2
    np.testing.assert_array_equal(memory.next_HN, [[-1, 3, 4, -1]])
    # Repeating the write (an at-least-once retry) and later writes of the same rows change nothing.
    assert memory.write(np.array([2, 1, 2, 2]), np.array([[4, 3, 0, 1]]), epoch=0) == 0
    assert memory.write(np.array([1, 3]), np.array([[0, 2]]), epoch=0) == 1
    np.testing.assert_array_equal(memory.next_HN, [[-1, 3, 4, 2]])


def test_bad_writes_are_rejected_and_write_nothing() -> None:
    memory = AssignmentMemory(100, 110, [3, 6])
    good_ids, good_labels = np.array([100, 109]), np.array([[0, 2], [5, 0]])
    with pytest.raises(StaleEpochError, match="epoch 1"):
        memory.write(good_ids, good_labels, epoch=1)
    assert issubclass(StaleEpochError, ValueError)
    with pytest.raises(ValueError, match="ids out of range"):
        memory.write(np.array([100, 110]), good_labels, epoch=0)
    with pytest.raises(ValueError, match="ids out of range"):
        memory.write(np.array([99, 101]), good_labels, epoch=0)
    with pytest.raises(ValueError, match="labels out of range"):
        memory.write(good_ids, np.array([[0, 3], [5, 0]]), epoch=0)  # 3 >= K_0
    with pytest.raises(ValueError, match="labels out of range"):
        memory.write(good_ids, np.array([[0, 1], [-1, 0]]), epoch=0)
    with pytest.raises(ValueError, match="shape"):
        memory.write(good_ids, good_labels[:1], epoch=0)  # one head of two
    with pytest.raises(ValueError, match="integer"):
        memory.write(good_ids.astype(float), good_labels, epoch=0)
    assert (memory.next_HN == -1).all() and not memory.written_N.any()
    assert memory.write(np.array([], dtype=np.int64), np.zeros((2, 0), dtype=np.int64), epoch=0) == 0
    close_epoch(memory)
    with pytest.raises(StaleEpochError):
        memory.write(good_ids, good_labels, epoch=0)  # a worker still in the previous epoch


def test_stats_by_hand() -> None:
    memory = AssignmentMemory(0, 6, [3, 2])
    memory.write(np.arange(5), np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]]), epoch=0)
    truth = np.array([0, 0, 1, 1, -1, 1])
    stats = close_epoch(memory, [np.array([2.0, 3.0, 0.0]), np.array([3.0, 2.0])], None, truth)
    h0_entropy = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    expected = {
        "clusters/epoch": 0.0,
        "clusters/written_frac": 5 / 6,
        "clusters/h0/min_size_frac": 0.0,
        "clusters/h0/max_size_frac": 0.6,
        "clusters/h0/empty": 1.0,
        "clusters/h0/entropy": h0_entropy,
        "clusters/h0/entropy_norm": h0_entropy / math.log(3),
        "clusters/h0/changed_frac": 0.0,  # nothing had a label before
        "clusters/h0/labelled_frac": 5 / 6,
        "clusters/h0/counter_gap_frac": 0.0,
        "clusters/h0/acc": 1.0,  # known rows 0..3: clusters 0,0,1,1 == classes 0,0,1,1
        "clusters/h0/nmi": 1.0,
        "clusters/h0/ari": 1.0,
        "clusters/h1/min_size_frac": 0.4,
        "clusters/h1/max_size_frac": 0.6,
        "clusters/h1/empty": 0.0,
        "clusters/h1/entropy": h0_entropy,
        "clusters/h1/entropy_norm": h0_entropy / math.log(2),
        "clusters/h1/changed_frac": 0.0,
        "clusters/h1/labelled_frac": 5 / 6,
        "clusters/h1/counter_gap_frac": 0.0,
        "clusters/h1/acc": 0.5,  # clusters 0,1,0,1 vs classes 0,0,1,1
        "clusters/h1/nmi": 0.0,
        "clusters/h1/ari": -0.5,
    }
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key

    # Epoch 1: rows 1 and 4 change on head 0 (0->1, 1->2), row 5 gets its first label (not a change).
    memory.write(np.arange(6), np.array([[0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]]), epoch=1)
    stats = close_epoch(memory, [np.array([1.0, 3.0, 3.0]), np.array([3.0, 3.0])], None, truth)
    assert stats["clusters/epoch"] == 1.0
    assert stats["clusters/written_frac"] == 1.0
    assert stats["clusters/h0/changed_frac"] == pytest.approx(2 / 5)
    assert stats["clusters/h1/changed_frac"] == 0.0
    assert stats["clusters/h0/min_size_frac"] == pytest.approx(1 / 6)
    assert stats["clusters/h0/max_size_frac"] == pytest.approx(3 / 6)
    assert stats["clusters/h0/empty"] == 0.0
    assert stats["clusters/h0/labelled_frac"] == 1.0
    assert stats["clusters/h0/counter_gap_frac"] == pytest.approx(1 / 6)  # counters [1,3,3] vs sizes [1,3,2]
    head0 = evaluate_clustering(truth, memory.prev_HN[0].astype(np.int64))
    for name in ("acc", "nmi", "ari"):
        assert stats[f"clusters/h0/{name}"] == pytest.approx(head0[name])


def test_size_stats_agree_with_secu_metrics() -> None:
    rng = np.random.default_rng(0)
    ks = [7, 50]
    memory = AssignmentMemory(0, 300, ks)
    ids = rng.choice(300, 250, replace=False)  # some rows stay unlabelled
    memory.write(ids, np.stack([rng.integers(0, k, 250) for k in ks]), epoch=0)
    stats = close_epoch(memory)
    for h, k in enumerate(ks):
        reference = size_stats(memory.prev_HN[h].astype(np.int64), k)
        for name in ("min_size_frac", "max_size_frac", "empty", "entropy", "entropy_norm"):
            assert stats[f"clusters/h{h}/{name}"] == pytest.approx(reference[name]), (h, name)
        assert stats[f"clusters/h{h}/labelled_frac"] == pytest.approx(reference["labelled"] / 300)


def test_counters_and_duals_are_stored() -> None:
    memory = AssignmentMemory(0, 3, [2])
    memory.write(np.arange(3), np.array([[0, 1, 1]]), epoch=0)
    with pytest.raises(ValueError, match="counters"):
        memory.commit_epoch([np.zeros(3)], None)  # K = 2
    with pytest.raises(ValueError, match="duals"):
        memory.commit_epoch(None, [np.zeros(2), np.zeros(2)])  # one head
    assert memory.epoch == 0, "a rejected commit must not swap"
    duals = [np.array([0.25, -0.5])]
    close_epoch(memory, [np.array([1, 2])], duals)
    duals[0][0] = 9.0  # the memory keeps its own copy
    assert memory.counters is not None and memory.counters[0].dtype == np.float64
    np.testing.assert_array_equal(memory.counters[0], [1.0, 2.0])
    np.testing.assert_array_equal(memory.recount(0), [1, 2])
    assert memory.duals is not None
    np.testing.assert_array_equal(memory.duals[0], [0.25, -0.5])


def test_state_round_trip_is_exact_and_drops_the_unfinished_epoch() -> None:
    rng = np.random.default_rng(1)
    ks = [4, 9]
    memory = AssignmentMemory(50, 150, ks)
    for epoch in range(2):
        for _, (ids, labels) in interleave(rank_batches(rng, 100, ks, world=2, batch=16)):
            memory.write(ids + 50, labels, epoch)
        close_epoch(memory, counts(memory), [rng.normal(size=k) for k in ks])
    state = memory.state_dict()
    assert "next_HN" not in state.to_dict() and state.epoch == 2
    snapshot = pickle.loads(pickle.dumps(state))  # what a checkpoint holds
    memory.write(np.arange(50, 100), np.zeros((2, 50), dtype=np.int64), epoch=2)  # half an epoch, then a crash

    restored = AssignmentMemory(50, 150, ks, restored=False)
    restored.load_state_dict(snapshot)
    assert restored.restored
    assert_same(restored.state_dict(), state)
    np.testing.assert_array_equal(restored.next_HN, restored.prev_HN)
    assert not restored.written_N.any()
    for h in range(2):
        assert state.counters is not None
        np.testing.assert_array_equal(state.counters[h], restored.recount(h))
    # The live memory can be rewound too: its half-epoch writes disappear.
    memory.load_state_dict(snapshot)
    assert_same(memory.state_dict(), state)
    assert memory.write(np.arange(50, 100), np.zeros((2, 50), dtype=np.int64), epoch=2) == 50

    with pytest.raises(ValueError, match="ids"):
        AssignmentMemory(0, 100, ks).load_state_dict(snapshot)
    with pytest.raises(ValueError, match="ks"):
        AssignmentMemory(50, 150, [4, 10]).load_state_dict(snapshot)


def test_a_restarted_memory_refuses_until_restored() -> None:
    memory = AssignmentMemory(0, 4, [3], restored=False)
    for call in (
        lambda: memory.write(np.array([0]), np.array([[1]]), 0),
        memory.published,
        memory.state_dict,
        memory.sufficient_stats,
        lambda: memory.commit_epoch(None, None),
        lambda: memory.recount(0),
    ):
        with pytest.raises(CoordinatorNotRestoredError, match="load_state_dict"):
            call()
    memory.reset()
    assert memory.restored and memory.write(np.array([0]), np.array([[1]]), 0) == 1


def test_reset_returns_to_a_fresh_run() -> None:
    memory = AssignmentMemory(0, 4, [3])
    memory.write(np.arange(4), np.array([[0, 1, 2, 0]]), 0)
    close_epoch(memory, [np.ones(3)])
    memory.reset()
    assert_same(memory.state_dict(), AssignmentMemory(0, 4, [3]).state_dict())


def test_shard_ranges_cover_the_ids_evenly() -> None:
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(5, 1) == [(0, 5)]
    ranges = shard_ranges(1_281_167, 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1_281_167
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1
    for bad in [(3, 4), (10, 0)]:
        with pytest.raises(ValueError):
            shard_ranges(*bad)


def test_route_splits_a_batch_by_owner() -> None:
    ranges = shard_ranges(10, 3)
    ids = np.array([9, 0, 3, 5, 6, 2, 3])
    parts = route(ids, ranges)
    assert [p.tolist() for p in parts] == [[1, 5], [2, 3, 6], [0, 4]]
    with pytest.raises(ValueError, match="out of range"):
        route(np.array([10]), ranges)


@pytest.mark.parametrize("ks", [[7, 13], [40000]])
def test_sharded_stats_equal_unsharded(ks: list[int]) -> None:
    rng = np.random.default_rng(2)
    n = 1000
    truth = rng.integers(-1, 7, n)  # about 1/8 unknown
    whole = AssignmentMemory(0, n, ks)
    ranges = shard_ranges(n, 3)
    shards = [AssignmentMemory(lo, hi, ks) for lo, hi in ranges]
    for epoch in range(3):
        per_rank = rank_batches(rng, n, ks, world=2, batch=64)
        if epoch == 2:  # an incomplete epoch: some rows keep their previous label
            per_rank = [batches[:-2] for batches in per_rank]
        written = 0
        for _, (ids, labels) in interleave(per_rank):
            rows = whole.write(ids, labels, epoch)
            written += rows
            assert rows == sum(
                shard.write(ids[pos], labels[:, pos], epoch)
                for shard, pos in zip(shards, route(ids, ranges), strict=True)
                if pos.size
            )
        counters = counts(whole)
        expected = close_epoch(whole, counters, None, truth)
        parts = [shard.sufficient_stats(truth[shard.lo : shard.hi]) for shard in shards]
        got = combine_stats(parts, ks, counters)
        for shard in shards:
            shard.commit_epoch(counters, None)
        assert got == expected
        assert (written < n) == (epoch == 2)
        assert "clusters/h0/acc" in got and got["clusters/written_frac"] == written / n
    np.testing.assert_array_equal(np.concatenate([s.prev_HN for s in shards], axis=1), whole.prev_HN)
    for h in range(len(ks)):
        np.testing.assert_array_equal(sum(s.recount(h) for s in shards), whole.recount(h))
    with pytest.raises(StaleEpochError):
        combine_stats([parts[0], AssignmentMemory(0, 5, ks).sufficient_stats()], ks)


def test_auto_label_fetch_takes_pages_only_above_256_mib_of_labels() -> None:
    assert resolve_label_fetch("auto", 60_000, [10]) == "all"  # Fashion-MNIST, 120 kB
    assert resolve_label_fetch("auto", 1_281_167, [1000] * 10) == "all"  # ImageNet, 10 heads: 26 MB
    assert resolve_label_fetch("auto", 134_217_728, [10]) == "all"  # exactly 256 MiB of int16
    assert resolve_label_fetch("auto", 134_217_729, [10]) == "pages"
    assert resolve_label_fetch("auto", 67_108_865, [40_000]) == "pages"  # int32 labels: half the ids
    assert resolve_label_fetch("all", 10**9, [10]) == "all" and resolve_label_fetch("pages", 10, [2]) == "pages"
    with pytest.raises(ValueError, match="label_fetch='page'.*auto, all, pages"):
        resolve_label_fetch("page", 10, [2])


def test_a_page_is_a_copy_of_the_previous_labels_of_its_ids() -> None:
    memory = AssignmentMemory(100, 200, [3, 5])
    memory.write(np.arange(100, 200), np.stack([np.arange(100) % 3, np.arange(100) % 5]), 0)
    memory.commit_epoch(None, None, epoch=0)
    page = memory.published_range(150, 160, epoch=1)
    np.testing.assert_array_equal(page, [np.arange(50, 60) % 3, np.arange(50, 60) % 5])
    assert page.flags.c_contiguous and not np.shares_memory(page, memory.prev_HN)
    with pytest.raises(StaleEpochError):
        memory.published_range(150, 160, epoch=0)
    for lo, hi in [(90, 110), (150, 150), (190, 201)]:
        with pytest.raises(ValueError, match="not a non-empty part"):
            memory.published_range(lo, hi)


def test_statistics_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.training.memory as memory_module

    rng = np.random.default_rng(11)
    n, ks = 1000, [4, 9]
    truth = rng.integers(-1, 6, n)
    memory = AssignmentMemory(0, n, ks)
    for epoch in range(2):  # epoch 1 compares with real previous labels; some rows stay unwritten
        ids = rng.permutation(n)[:900]
        memory.write(ids, np.stack([rng.integers(0, k, ids.size) for k in ks]), epoch)
        one_pass = memory.sufficient_stats(truth, epoch=epoch)
        recounts = [memory.recount(h) for h in range(len(ks))]
        monkeypatch.setattr(memory_module, "STATS_CHUNK_IDS", 7)
        chunked = memory.sufficient_stats(truth, epoch=epoch)
        assert [memory.recount(h).tolist() for h in range(len(ks))] == [r.tolist() for r in recounts]
        monkeypatch.setattr(memory_module, "STATS_CHUNK_IDS", 1 << 22)
        assert_same(dataclasses.asdict(chunked), dataclasses.asdict(one_pass))
        assert one_pass.contingency is not None and sum(t.sum() for t in one_pass.contingency) > 0
        memory.commit_epoch(None, None, epoch=epoch)
