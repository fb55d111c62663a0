"""Tests of the ClusterCoordinator: the plain AssignmentMemory, sharded statistics, and the Ray actor.

Ray tests simulate training ranks from the test process (pickled CoordinatorClient copies, and one
real Ray task) and compare the actor's results with the plain class fed the same writes.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import ray

from pipelines.training.coordinator import (
    AssignmentMemory,
    CoordinatorClient,
    CoordinatorNotRestoredError,
    StaleEpochError,
    combine_stats,
    label_dtype,
    route,
    shard_ranges,
)
from secu.metrics import evaluate_clustering, size_stats

Batch = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rank_batches(rng: np.random.Generator, n: int, ks: list[int], world: int, batch: int) -> list[list[Batch]]:
    """One epoch of writes: rank r gets ids perm[r::world] in batches; every rank's first batch also
    repeats its first id with another label, as a padding distributed sampler does."""
    perm = rng.permutation(n)
    out = []
    for r in range(world):
        ids = perm[r::world]
        batches = []
        for s in range(0, ids.size, batch):
            ids_B = ids[s : s + batch]
            labels_HB = np.stack([rng.integers(0, k, ids_B.size) for k in ks])
            if s == 0:
                pad_HB = (labels_HB[:, :1] + 1) % np.asarray(ks)[:, None]
                ids_B = np.concatenate([ids_B, ids_B[:1]])
                labels_HB = np.concatenate([labels_HB, pad_HB], axis=1)
            batches.append((ids_B, labels_HB))
        out.append(batches)
    return out


def interleave(per_rank: list[list[Batch]]) -> Iterator[tuple[int, Batch]]:
    """(rank, batch) in step order: step 0 of every rank, then step 1, ..."""
    for step in range(max(len(b) for b in per_rank)):
        for r, batches in enumerate(per_rank):
            if step < len(batches):
                yield r, batches[step]


def counts(memory: AssignmentMemory) -> list[np.ndarray]:
    """What the replicated counters hold at the end of an epoch in which every row was written."""
    return [np.bincount(memory.next_HN[h][memory.next_HN[h] >= 0], minlength=k) for h, k in enumerate(memory.ks)]


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact, recursive equality of states: arrays by dtype and values, floats exactly."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------------------
# AssignmentMemory (no Ray)
# --------------------------------------------------------------------------------------------------


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
    memory.end_epoch(None, None)
    assert memory.epoch == 1
    np.testing.assert_array_equal(memory.published(), [[-1, 2, -1, 1, -1], [-1, 3, -1, 0, -1]])
    # Rows not written in epoch 1 keep their label; written rows take the new one.
    memory.write(np.array([14, 11]), np.array([[0, 1], [1, 2]]), epoch=1)
    memory.end_epoch(None, None)
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
    memory.end_epoch(None, None)
    with pytest.raises(StaleEpochError):
        memory.write(good_ids, good_labels, epoch=0)  # a worker still in the previous epoch


def test_stats_by_hand() -> None:
    memory = AssignmentMemory(0, 6, [3, 2])
    memory.write(np.arange(5), np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]]), epoch=0)
    truth = np.array([0, 0, 1, 1, -1, 1])
    stats = memory.end_epoch([np.array([2.0, 3.0, 0.0]), np.array([3.0, 2.0])], None, truth)
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
    stats = memory.end_epoch([np.array([1.0, 3.0, 3.0]), np.array([3.0, 3.0])], None, truth)
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
    assert len(memory.history) == 2 and memory.history[1] == stats


def test_size_stats_agree_with_secu_metrics() -> None:
    rng = np.random.default_rng(0)
    ks = [7, 50]
    memory = AssignmentMemory(0, 300, ks)
    ids = rng.choice(300, 250, replace=False)  # some rows stay unlabelled
    memory.write(ids, np.stack([rng.integers(0, k, 250) for k in ks]), epoch=0)
    stats = memory.end_epoch(None, None)
    for h, k in enumerate(ks):
        reference = size_stats(memory.prev_HN[h].astype(np.int64), k)
        for name in ("min_size_frac", "max_size_frac", "empty", "entropy", "entropy_norm"):
            assert stats[f"clusters/h{h}/{name}"] == pytest.approx(reference[name]), (h, name)
        assert stats[f"clusters/h{h}/labelled_frac"] == pytest.approx(reference["labelled"] / 300)


def test_counters_duals_and_history_are_stored() -> None:
    memory = AssignmentMemory(0, 3, [2])
    memory.write(np.arange(3), np.array([[0, 1, 1]]), epoch=0)
    with pytest.raises(ValueError, match="counters"):
        memory.end_epoch([np.zeros(3)], None)  # K = 2
    assert memory.epoch == 0, "a rejected end_epoch must not swap"
    duals = [np.array([0.25, -0.5])]
    memory.end_epoch([np.array([1, 2])], duals)
    duals[0][0] = 9.0  # the memory keeps its own copy
    assert memory.counters is not None and memory.counters[0].dtype == np.float64
    np.testing.assert_array_equal(memory.counters[0], [1.0, 2.0])
    np.testing.assert_array_equal(memory.recount(0), [1, 2])
    assert memory.duals is not None
    np.testing.assert_array_equal(memory.duals[0], [0.25, -0.5])
    assert [s["clusters/epoch"] for s in memory.history] == [0.0]


def test_state_round_trip_is_exact_and_drops_the_unfinished_epoch() -> None:
    rng = np.random.default_rng(1)
    ks = [4, 9]
    memory = AssignmentMemory(50, 150, ks)
    for epoch in range(2):
        for _, (ids, labels) in interleave(rank_batches(rng, 100, ks, world=2, batch=16)):
            memory.write(ids + 50, labels, epoch)
        memory.end_epoch(counts(memory), [rng.normal(size=k) for k in ks])
    state = memory.state_dict()
    assert "next_HN" not in state and state["epoch"] == 2
    snapshot = pickle.loads(pickle.dumps(state))  # what a checkpoint holds
    memory.write(np.arange(50, 100), np.zeros((2, 50), dtype=np.int64), epoch=2)  # half an epoch, then a crash

    restored = AssignmentMemory(50, 150, ks, restored=False)
    restored.load_state_dict(snapshot)
    assert restored.restored
    assert_same(restored.state_dict(), state)
    np.testing.assert_array_equal(restored.next_HN, restored.prev_HN)
    assert not restored.written_N.any()
    for h in range(2):
        assert state["counters"] is not None
        np.testing.assert_array_equal(state["counters"][h], restored.recount(h))
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
        lambda: memory.end_epoch(None, None),
        lambda: memory.recount(0),
    ):
        with pytest.raises(CoordinatorNotRestoredError, match="load_state_dict"):
            call()
    memory.reset()
    assert memory.restored and memory.write(np.array([0]), np.array([[1]]), 0) == 1


def test_reset_returns_to_a_fresh_run() -> None:
    memory = AssignmentMemory(0, 4, [3])
    memory.write(np.arange(4), np.array([[0, 1, 2, 0]]), 0)
    memory.end_epoch([np.ones(3)], None)
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
        expected = whole.end_epoch(counters, None, truth)
        parts = [shard.sufficient_stats(truth[shard.lo : shard.hi]) for shard in shards]
        got = combine_stats(parts, ks, counters)
        for shard in shards:
            shard.commit_epoch(counters, None, got)
        assert got == expected
        assert (written < n) == (epoch == 2)
        assert "clusters/h0/acc" in got and got["clusters/written_frac"] == written / n
    np.testing.assert_array_equal(np.concatenate([s.prev_HN for s in shards], axis=1), whole.prev_HN)
    for h in range(len(ks)):
        np.testing.assert_array_equal(sum(s.recount(h) for s in shards), whole.recount(h))
    with pytest.raises(StaleEpochError):
        combine_stats([parts[0], AssignmentMemory(0, 5, ks).sufficient_stats()], ks)


# --------------------------------------------------------------------------------------------------
# Ray actor and client
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def make_client(ray_cluster: None, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Creates coordinators with names unique to the test; kills them afterwards."""
    created: list[CoordinatorClient] = []

    def make(num_samples: int, ks: list[int], **kwargs: Any) -> CoordinatorClient:
        run_id = f"{request.node.name}-{len(created)}"
        client = CoordinatorClient.create(run_id, num_samples, ks, **kwargs)
        created.append(client)
        return client

    yield make
    for client in created:
        client.shutdown()


def run_epoch_plain(memory: AssignmentMemory, per_rank: list[list[Batch]], epoch: int) -> None:
    for _, (ids, labels) in interleave(per_rank):
        memory.write(ids, labels, epoch)


@pytest.mark.ray
def test_two_ranks_through_the_actor_equal_the_plain_class(make_client: Any) -> None:
    rng = np.random.default_rng(3)
    n, ks = 500, [5, 9]
    truth = rng.integers(0, 5, n)
    driver = make_client(n, ks, true_labels=truth, flush_every=100)
    ranks = [pickle.loads(pickle.dumps(driver)) for _ in range(2)]  # as sent in train_loop_config
    plain = AssignmentMemory(0, n, ks)
    for epoch in range(3):
        per_rank = rank_batches(rng, n, ks, world=2, batch=32)
        for rank in ranks:
            rank.begin_epoch(epoch)
        for r, (ids, labels) in interleave(per_rank):
            # What training reads (Sec. 3.3) is the previous epoch's label, locally.
            np.testing.assert_array_equal(ranks[r].labels_for(ids), plain.published()[:, ids])
            ranks[r].write_async(ids, labels, epoch)
        run_epoch_plain(plain, per_rank, epoch)
        assert sum(rank.flush() for rank in ranks) == n
        counters = counts(plain)
        duals = [rng.normal(size=k) for k in ks]
        stats = driver.end_epoch(counters, duals, epoch=epoch)
        assert stats == plain.end_epoch(counters, duals, truth)
        assert stats["clusters/written_frac"] == 1.0 and stats["clusters/h0/counter_gap_frac"] == 0.0
    assert_same(driver.state_dict()["shards"][0], plain.state_dict())
    np.testing.assert_array_equal(driver.recount(1), plain.recount(1))


@ray.remote
def _remote_rank(client: CoordinatorClient, epoch: int, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    client.begin_epoch(epoch)
    seen = client.labels_for(ids)
    client.write_async(ids, labels, epoch)
    client.flush()
    return seen


@pytest.mark.ray
def test_a_rank_in_another_process_reads_and_writes(make_client: Any) -> None:
    client = make_client(20, [3], num_shards=2, flush_every=4)
    ids, labels = np.arange(20)[::-1].copy(), (np.arange(20) % 3)[None, :]
    seen = ray.get(_remote_rank.remote(client, 0, ids, labels))
    assert (seen == -1).all()
    client.end_epoch(epoch=0)
    client.begin_epoch(1)
    np.testing.assert_array_equal(client.labels_for(ids), labels)
    seen = ray.get(_remote_rank.remote(client, 1, ids[:5], (labels[:, :5] + 1) % 3))
    np.testing.assert_array_equal(seen, labels[:, :5])


@pytest.mark.ray
def test_publish_once_per_epoch_and_the_swap(make_client: Any) -> None:
    client = make_client(8, [4], flush_every=3)
    first = client.publish()
    assert first == client.publish(), "one ray.put per epoch, not per call"
    client.begin_epoch(0)
    client.write_async(np.array([1, 2]), np.array([[3, 2]]), 0)
    assert client.flush() == 2
    client.begin_epoch(0)
    assert (client.labels_for(np.arange(8)) == -1).all(), "new labels stay invisible until the swap"
    with pytest.raises(StaleEpochError, match="waited"):
        client.begin_epoch(1, timeout_s=0.2)
    # A rank that reaches epoch 1 before the epoch-0 end_epoch waits for it.
    early_rank = pickle.loads(pickle.dumps(client))
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(lambda: (early_rank.begin_epoch(1, timeout_s=30), early_rank.labels_for(np.array([2])))[1])
        time.sleep(0.3)
        assert not early.done()
        client.end_epoch(epoch=0)
        np.testing.assert_array_equal(early.result(timeout=30), [[2]])
    assert client.publish() != first
    client.begin_epoch(1)
    np.testing.assert_array_equal(client.labels_for(np.array([2, 0, 1])), [[2, -1, 3]])
    with pytest.raises(ValueError, match="out of range"):
        client.write_async(np.array([8]), np.array([[1]]), 1)
    client.write_async(np.array([0]), np.array([[1]]), 0)  # a worker still in epoch 0
    with pytest.raises(StaleEpochError):
        client.flush()
    with pytest.raises(StaleEpochError):
        client.end_epoch(epoch=0)
    with pytest.raises(StaleEpochError):
        client.begin_epoch(0)  # the coordinator is past it: no waiting


@pytest.mark.ray
def test_two_shards_equal_one_shard(make_client: Any) -> None:
    rng = np.random.default_rng(4)
    n, ks = 301, [6, 11]
    truth = rng.integers(-1, 6, n)
    one = make_client(n, ks, true_labels=truth, flush_every=50)
    two = make_client(n, ks, num_shards=2, true_labels=truth, flush_every=50)
    for epoch in range(2):
        per_rank = rank_batches(rng, n, ks, world=2, batch=20)
        for client in (one, two):
            for _, (ids, labels) in interleave(per_rank):
                client.write_async(ids, labels, epoch)
            client.flush()
        stats_one = one.end_epoch([np.ones(k) for k in ks], epoch=epoch)
        assert stats_one == two.end_epoch([np.ones(k) for k in ks], epoch=epoch)
    state_one, state_two = one.state_dict(), two.state_dict()
    assert [s["epoch"] for s in state_two["shards"]] == [2, 2]
    np.testing.assert_array_equal(
        state_one["shards"][0]["prev_HN"], np.concatenate([s["prev_HN"] for s in state_two["shards"]], axis=1)
    )
    for client in (one, two):
        client.begin_epoch(2)
    np.testing.assert_array_equal(one.labels_for(np.arange(n)[::-1]), two.labels_for(np.arange(n)[::-1]))
    np.testing.assert_array_equal(one.recount(0), two.recount(0))


@pytest.mark.ray
def test_a_killed_shard_comes_back_only_through_the_checkpoint(make_client: Any) -> None:
    rng = np.random.default_rng(5)
    n, ks = 200, [4, 6]
    client = make_client(n, ks, num_shards=2, flush_every=40)
    plain = AssignmentMemory(0, n, ks)  # the same run without the failure
    epochs = [rank_batches(rng, n, ks, world=2, batch=16) for _ in range(3)]
    for epoch in range(2):
        for _, (ids, labels) in interleave(epochs[epoch]):
            client.write_async(ids, labels, epoch)
        client.flush()
        run_epoch_plain(plain, epochs[epoch], epoch)
        client.end_epoch(counts(plain), [np.full(k, 0.1 * epoch) for k in ks], epoch=epoch)
        plain.end_epoch(counts(plain), [np.full(k, 0.1 * epoch) for k in ks])
    checkpoint = pickle.loads(pickle.dumps(client.state_dict()))

    # Half of epoch 2 reaches both shards, then shard 0 dies.
    steps = list(interleave(epochs[2]))
    for _, (ids, labels) in steps[: len(steps) // 2]:
        client.write_async(ids, labels, 2)
    client.flush()
    client.kill_shard(0)
    deadline = time.monotonic() + 30
    while ray.get(client.handles[0].is_restored.remote()):  # the kill is asynchronous
        assert time.monotonic() < deadline, "the shard actor was not restarted"
        time.sleep(0.05)
    assert not client.is_restored()
    client.write_async(*steps[0][1], 2)
    with pytest.raises(CoordinatorNotRestoredError):
        client.flush()
    with pytest.raises(CoordinatorNotRestoredError):
        client.begin_epoch(2)
    with pytest.raises(CoordinatorNotRestoredError):
        client.state_dict()  # an empty state must never reach a checkpoint

    client.load_state_dict(checkpoint)
    assert client.is_restored()
    assert_same(client.state_dict(), checkpoint)  # both shards: the surviving one's half epoch is gone
    for h in range(len(ks)):  # the saved counters match the restored memory
        np.testing.assert_array_equal(checkpoint["shards"][0]["counters"][h], client.recount(h))
    # Replaying epoch 2 from the checkpoint gives exactly the uninterrupted run: nothing counted twice.
    client.begin_epoch(2)
    for _, (ids, labels) in steps:
        np.testing.assert_array_equal(client.labels_for(ids), plain.published()[:, ids])
        client.write_async(ids, labels, 2)
    assert client.flush() == n
    run_epoch_plain(plain, epochs[2], 2)
    assert client.end_epoch(counts(plain), epoch=2) == plain.end_epoch(counts(plain), None)
    for shard_state, (lo, hi) in zip(client.state_dict()["shards"], client.ranges, strict=True):
        np.testing.assert_array_equal(shard_state["prev_HN"], plain.prev_HN[:, lo:hi])
        assert shard_state["history"] == plain.history


@pytest.mark.ray
def test_reset_serves_a_restart_without_checkpoint(make_client: Any, request: pytest.FixtureRequest) -> None:
    client = make_client(40, [3], flush_every=1)
    with pytest.raises(ValueError, match="already"):  # a second coordinator of the same run
        CoordinatorClient.create(f"{request.node.name}-0", 40, [3])
    client.write_async(np.arange(5), np.zeros((1, 5), dtype=np.int64), 0)
    client.flush()
    client.reset()
    for i in range(40):  # one call per row: many writes in flight
        client.write_async(np.array([i]), np.ones((1, 1), dtype=np.int64), 0)
    assert client.flush() == 40, "writes from before the reset must not block the replayed epoch"
    assert client.end_epoch()["clusters/h0/max_size_frac"] == 1.0
    np.testing.assert_array_equal(client.recount(0), [0, 40, 0])


@pytest.mark.ray
@pytest.mark.parametrize("num_shards", [1, 3])  # 150 kB of classes in the object store; 50 kB inline each
def test_a_restarted_shard_still_has_the_true_labels(make_client: Any, num_shards: int) -> None:
    n, ks = 150_000, [10]
    truth = np.arange(n) % 10
    truth[::7] = -5  # unknown
    client = make_client(n, ks, num_shards=num_shards, true_labels=truth, flush_every=n)
    client.kill_shard(0)
    deadline = time.monotonic() + 30
    while ray.get(client.handles[0].is_restored.remote()):
        assert time.monotonic() < deadline, "the shard actor was not restarted"
        time.sleep(0.05)
    client.reset()  # a restart before the first checkpoint
    # Clusters equal to the classes, except that classes 0 and 1 are merged into cluster 0.
    labels = np.where(truth < 0, 3, np.where(truth == 1, 0, truth))[None, :]
    client.write_async(np.arange(n), labels, 0)
    assert client.flush() == n
    stats = client.end_epoch(epoch=0)
    known = truth >= 0
    expected_acc = float(np.mean(truth[known] != 1))  # every known image but class 1 is matched
    assert stats["clusters/h0/acc"] == pytest.approx(expected_acc)
