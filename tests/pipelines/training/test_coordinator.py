"""Tests of the ClusterCoordinator's Ray layer: the shard actors and CoordinatorClient.

Ray tests simulate training ranks from the test process (pickled CoordinatorClient copies, and one
real Ray task) and compare the actor's results with the plain AssignmentMemory fed the same writes.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import ray

from pipelines.training.coordinator import CoordinatorClient
from pipelines.training.coordinator_state import CoordinatorState
from pipelines.training.memory import AssignmentMemory, CoordinatorNotRestoredError, StaleEpochError
from tests.pipelines.training.memory_builders import Batch, assert_same, close_epoch, counts, interleave, rank_batches


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


# Pages of 37 ids, 3 cached: a page straddles the two shards of a 2-shard run, and batches of random ids
# evict pages all the time.
FETCHES = [{"label_fetch": "all"}, {"label_fetch": "pages", "page_ids": 37, "max_pages": 3}]


@pytest.mark.ray
@pytest.mark.parametrize("fetch", FETCHES, ids=["all", "pages"])
def test_two_ranks_through_the_actor_equal_the_plain_class(make_client: Any, fetch: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    n, ks = 500, [5, 9]
    truth = rng.integers(0, 5, n)
    driver = make_client(n, ks, true_labels=truth, flush_every=100, **fetch)
    assert driver.label_fetch == fetch["label_fetch"]
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
        assert stats == close_epoch(plain, counters, duals, truth)
        assert stats["clusters/written_frac"] == 1.0 and stats["clusters/h0/counter_gap_frac"] == 0.0
    state = driver.state_dict()
    assert isinstance(state, CoordinatorState) and state.ranges == ((0, n),) and state.ks == (5, 9)
    assert_same(state.shards[0], plain.state_dict())
    np.testing.assert_array_equal(driver.recount(1), plain.recount(1))


@ray.remote
def _remote_rank(client: CoordinatorClient, epoch: int, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    client.begin_epoch(epoch)
    seen = client.labels_for(ids)
    client.write_async(ids, labels, epoch)
    client.flush()
    return seen


@pytest.mark.ray
@pytest.mark.parametrize("fetch", FETCHES, ids=["all", "pages"])
def test_a_rank_in_another_process_reads_and_writes(make_client: Any, fetch: dict[str, Any]) -> None:
    client = make_client(20, [3], num_shards=2, flush_every=4, **{**fetch, "page_ids": 3})
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
def test_pages_fetch_only_what_a_worker_reads_once_per_epoch_and_stay_bounded(make_client: Any) -> None:
    n, ks, page = 1000, [4, 7], 64
    client = make_client(n, ks, num_shards=3, flush_every=50, label_fetch="pages", page_ids=page, max_pages=4)
    labels = np.stack([np.arange(n) % k for k in ks])
    client.write_async(np.arange(n), labels, 0)
    client.flush()
    client.end_epoch(epoch=0)
    worker = pickle.loads(pickle.dumps(client))
    assert worker.label_fetch == "pages" and worker.page_fetches == 0
    worker.begin_epoch(1)
    # A worker that reads two shards' worth of ids, [100, 300) then [700, 800), in batches of 16 (the
    # order a shard is read in): each page it touches is fetched once, the others never.
    read = np.concatenate([np.arange(100, 300), np.arange(700, 800)])
    for start in range(0, read.size, 16):
        ids = read[start:start + 16]
        np.testing.assert_array_equal(worker.labels_for(ids), labels[:, ids])
    touched = np.unique(read // page)
    assert worker.page_fetches == touched.size == 7  # pages 1-4 and 10-12 of 16
    assert worker.cached_label_bytes == 4 * page * 2 * 2, "the cache keeps at most max_pages (int16, 2 heads)"
    # After the next epoch closes, the cache of the old epoch is not served: the new labels are read.
    new_labels = (labels + 1) % np.asarray(ks)[:, None]
    worker.write_async(np.arange(n), new_labels, 1)
    worker.flush()
    client.end_epoch(epoch=1)
    with pytest.raises(StaleEpochError):  # a page a stale reader of epoch 1 lacks: refused, not epoch 2's
        worker.labels_for(np.array([0]))
    worker.begin_epoch(2)
    np.testing.assert_array_equal(worker.labels_for(read[-16:]), new_labels[:, read[-16:]])
    with pytest.raises(ValueError, match="out of range"):
        worker.labels_for(np.array([n]))


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
    assert [s.epoch for s in state_two.shards] == [2, 2] and state_two.epoch == 2
    np.testing.assert_array_equal(state_one.shards[0].prev_HN, state_two.labels())
    with pytest.raises(ValueError, match="ranges"):
        one.load_state_dict(state_two)
    for client in (one, two):
        client.begin_epoch(2)
    np.testing.assert_array_equal(one.labels_for(np.arange(n)[::-1]), two.labels_for(np.arange(n)[::-1]))
    np.testing.assert_array_equal(one.recount(0), two.recount(0))


@pytest.mark.ray
@pytest.mark.parametrize("fetch", FETCHES, ids=["all", "pages"])
def test_a_killed_shard_comes_back_only_through_the_checkpoint(make_client: Any, fetch: dict[str, Any]) -> None:
    rng = np.random.default_rng(5)
    n, ks = 200, [4, 6]
    client = make_client(n, ks, num_shards=2, flush_every=40, **fetch)
    plain = AssignmentMemory(0, n, ks)  # the same run without the failure
    epochs = [rank_batches(rng, n, ks, world=2, batch=16) for _ in range(3)]
    for epoch in range(2):
        for _, (ids, labels) in interleave(epochs[epoch]):
            client.write_async(ids, labels, epoch)
        client.flush()
        run_epoch_plain(plain, epochs[epoch], epoch)
        client.end_epoch(counts(plain), [np.full(k, 0.1 * epoch) for k in ks], epoch=epoch)
        close_epoch(plain, counts(plain), [np.full(k, 0.1 * epoch) for k in ks])
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
        counters = checkpoint.shards[0].counters
        assert counters is not None
        np.testing.assert_array_equal(counters[h], client.recount(h))
    # Replaying epoch 2 from the checkpoint gives exactly the uninterrupted run: nothing counted twice.
    client.begin_epoch(2)
    for _, (ids, labels) in steps:
        np.testing.assert_array_equal(client.labels_for(ids), plain.published()[:, ids])
        client.write_async(ids, labels, 2)
    assert client.flush() == n
    run_epoch_plain(plain, epochs[2], 2)
    assert client.end_epoch(counts(plain), epoch=2) == close_epoch(plain, counts(plain))
    for shard_state, (lo, hi) in zip(client.state_dict().shards, client.ranges, strict=True):
        np.testing.assert_array_equal(shard_state.prev_HN, plain.prev_HN[:, lo:hi])


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
