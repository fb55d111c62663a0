"""The storage lock: one winner among racing acquirers (local disk and S3 conditional put), expiry, release."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest

from pipelines.run_lock import LockHeldError, LockInfo, StorageLock
from pipelines.storage import Storage


def race(storage: Storage, contenders: int = 8) -> tuple[int, list[str]]:
    """Start ``contenders`` threads acquiring the same lock at once; (winners, refusal messages)."""
    barrier = threading.Barrier(contenders)
    winners, refusals, held = [], [], []

    def attempt(i: int) -> None:
        lock = StorageLock(storage, "runs/base/_recluster.lock", ttl_s=60, purpose=f"contender {i}")
        barrier.wait()
        try:
            lock.acquire()
            winners.append(i)
            held.append(lock)
        except LockHeldError as err:
            refusals.append(str(err))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lock in held:  # stop the winner's heartbeat; the lock object stays for the caller to inspect
        lock.stop_heartbeat()
    return len(winners), refusals


def test_exactly_one_local_acquirer_wins(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    won, refusals = race(storage)
    assert won == 1 and len(refusals) == 7
    assert all("holds lock" in r and "_recluster.lock" in r and "delete the lock" in r for r in refusals)
    assert [p.name for p in (tmp_path / "runs" / "base").iterdir()] == ["_recluster.lock"]  # no temp files left


def test_exactly_one_s3_acquirer_wins(moto_endpoint: str, s3_bucket: str) -> None:
    storage = Storage(f"s3://{s3_bucket}/secu", s3_endpoint=moto_endpoint)
    won, refusals = race(storage, contenders=4)
    assert won == 1 and len(refusals) == 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_expired_lock_is_taken_over_and_release_spares_other_owners(
        tmp_path: Path, where: str, moto_endpoint: str, s3_bucket: str) -> None:
    storage = (Storage(str(tmp_path)) if where == "local"
               else Storage(f"s3://{s3_bucket}/p", s3_endpoint=moto_endpoint))
    rel = "runs/b/_recluster.lock"
    dead = LockInfo("crashed-host:1:abc", "tick x", time.time() - 100, time.time() - 1)
    storage.write_bytes_atomic(rel, dead.to_bytes())
    lock = StorageLock(storage, rel, ttl_s=30, purpose="tick y")
    info = lock.acquire()
    assert LockInfo.from_bytes(storage.read_bytes(rel)) == info and info.purpose == "tick y"
    with pytest.raises(LockHeldError, match="tick y"):
        StorageLock(storage, rel, ttl_s=30, purpose="tick z").acquire()
    # Someone else took the lock over (e.g. after our expiry): our release must leave theirs alone.
    other = LockInfo("other:2:def", "tick z", time.time(), time.time() + 30)
    storage.write_bytes_atomic(rel, other.to_bytes())
    lock.release()
    assert LockInfo.from_bytes(storage.read_bytes(rel)) == other
    storage.delete(rel)
    with StorageLock(storage, rel, ttl_s=30, purpose="tick w"):
        assert storage.exists(rel)
    assert not storage.exists(rel)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_silent_holder_on_another_host_loses_its_lock_after_the_lease_a_live_one_keeps_it(
        tmp_path: Path, where: str, moto_endpoint: str, s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17: a tick killed on another host left a lock that refused every tick for 12 hours. A holder
    renews its lock every heartbeat; one silent for longer than its lease is gone, wherever it ran."""
    storage = (Storage(str(tmp_path)) if where == "local"
               else Storage(f"s3://{s3_bucket}/hb", s3_endpoint=moto_endpoint))
    rel = "runs/base/_recluster.lock"
    now = time.time()
    silent = LockInfo("another-host:4242:abc", "tick 1", now - 100, now + 12 * 3600, now - 20, 10.0)
    storage.write_bytes_atomic(rel, silent.to_bytes())
    lock = StorageLock(storage, rel, ttl_s=12 * 3600, purpose="tick 2", heartbeat_s=0.2, lease_s=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.run_lock"):
            mine = lock.acquire()
        assert re.search(r"sent no heartbeat for 2\d s \(lease 10 s\).*taking it over", caplog.text), caplog.text
        time.sleep(2.5)  # past the lease: only the heartbeats keep the lock alive
        renewed = LockInfo.from_bytes(storage.read_bytes(rel))
        assert renewed is not None and renewed.owner == mine.owner and renewed.heartbeat is not None
        assert renewed.heartbeat > mine.created + 1.0
        with pytest.raises(LockHeldError, match="taken over 1 s after its last heartbeat"):
            StorageLock(storage, rel, ttl_s=60, purpose="tick 3", heartbeat_s=0.2, lease_s=1.0).acquire()
    finally:
        lock.release()
    assert not storage.exists(rel)


def _lock_of(storage: Storage, owner: str) -> None:
    now = time.time()
    storage.write_bytes_atomic("runs/base/_recluster.lock", LockInfo(owner, "a tick", now, now + 3600).to_bytes())


def test_a_lock_whose_process_is_gone_is_taken_over_at_once(tmp_path: Path) -> None:
    """A holder killed on this host (``ray job stop``, SIGKILL) does not block the next run until expiry."""
    import socket
    import subprocess
    import sys

    storage = Storage(str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    _lock_of(storage, f"{socket.gethostname()}:{int(done.stdout)}:deadbeef")
    with StorageLock(storage, "runs/base/_recluster.lock", ttl_s=60, purpose="next tick") as lock:
        assert lock.info is not None and lock.info.purpose == "next tick"

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(storage, f"{socket.gethostname()}:{alive.pid}:cafe0001")
        with pytest.raises(LockHeldError, match="another run holds lock"):
            StorageLock(storage, "runs/base/_recluster.lock", ttl_s=60, purpose="x").acquire()
    finally:
        alive.kill()
        alive.wait()
    _lock_of(storage, "some-other-host:1:cafe0002")  # another host's process cannot be checked: alive until expiry
    with pytest.raises(LockHeldError):
        StorageLock(storage, "runs/base/_recluster.lock", ttl_s=60, purpose="x").acquire()
