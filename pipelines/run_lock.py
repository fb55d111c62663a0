"""A lock object on storage that at most one holder creates: ``create-if-absent`` with owner and expiry.

Used by reclustering (``runs/<base>/_recluster.lock``) so that two schedules firing at once, or a
manual run during a scheduled one, cannot work on the same series.

Atomic creation:

- local root: the content is written to a temporary file that is then hard-linked to the lock path
  (``os.link`` fails when the path exists), so the lock appears whole or not at all;
- S3: a conditional PUT (``If-None-Match: *``, through s3fs' exclusive mode ``"xb"``); S3, MinIO and
  moto refuse it with 412 when the object exists. The content is read back afterwards, so an endpoint
  that ignores the condition is caught in all but a few-millisecond window.

A holder renews its lock every ``heartbeat_s`` seconds from a background thread (the ``heartbeat``
field); a lock whose heartbeat is older than ``lease_s`` (default 10 heartbeats), whose ``expires`` time
has passed, or whose holder was a process on this host that no longer runs (``holder_is_gone``),
belongs to a holder that died without releasing it, on any host: the next acquirer deletes it (logged)
and creates its own. Locks written before heartbeats existed have no ``heartbeat`` and wait for
``expires``. A holder that finds its lock gone or taken over stops renewing it and logs a warning.

Taking over an abandoned lock is not atomic (two acquirers that both find the same abandoned lock can
both delete it); that needs a crash first. A holder that cannot reach storage for a whole lease (10
heartbeats, 5 minutes by default) loses its lock to the next acquirer. ``release`` deletes the lock only
when it still holds this owner's id.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.storage import Storage

logger = logging.getLogger(__name__)


class LockHeldError(RuntimeError):
    """The lock exists and has not expired: another holder works on the same thing."""


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock object."""

    owner: str
    """Unique id of the holder (host, process id and a random suffix)."""
    purpose: str
    """What the holder does (e.g. the run id of a reclustering tick)."""
    created: float
    """Unix time of creation."""
    expires: float
    """Unix time after which the lock counts as abandoned."""
    heartbeat: float | None = None
    """Unix time of the holder's last renewal (None: a lock written before heartbeats)."""
    lease_s: float | None = None
    """A heartbeat older than this many seconds means the holder is gone."""

    def silent_for(self, now: float) -> float | None:
        """Seconds past the lease since the last heartbeat (> 0: the holder is gone), None without one."""
        if self.heartbeat is None or self.lease_s is None:
            return None
        return now - self.heartbeat - self.lease_s

    def describe(self) -> str:
        """Human-readable holder and times (for error messages)."""
        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        beat = "" if self.heartbeat is None else f", last heartbeat {iso(self.heartbeat)}"
        return f"owner {self.owner}, {self.purpose}, since {iso(self.created)}{beat}, expires {iso(self.expires)}"

    def to_bytes(self) -> bytes:
        """JSON encoding stored in the lock object."""
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockInfo | None:
        """Parse a lock object; None when it is not a lock written by this module."""
        try:
            raw: dict[str, Any] = json.loads(data.decode("utf-8"))
            beat, lease = raw.get("heartbeat"), raw.get("lease_s")
            return cls(str(raw["owner"]), str(raw["purpose"]), float(raw["created"]), float(raw["expires"]),
                       None if beat is None else float(beat), None if lease is None else float(lease))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def new_owner_id() -> str:
    """``host:pid:random``, unique per acquisition."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(info: LockInfo) -> bool:
    """True when the lock's owner was a process on this host that no longer runs (killed, or stopped by
    ``ray job stop``): its lock can be taken over at once instead of after its expiry. Holders on other
    hosts cannot be checked from here and count as alive until the lock expires."""
    host, _, rest = info.owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


HEARTBEAT_S = 30.0
"""Default seconds between a holder's renewals."""
LEASE_BEATS = 10
"""Default lease: a holder silent for this many heartbeats is gone."""


def abandoned_because(info: LockInfo, now: float) -> str | None:
    """Why the lock's holder counts as gone (expired, silent past its lease, its process gone), else None."""
    if info.expires <= now:
        return "expired"
    silent = info.silent_for(now)
    if silent is not None and silent > 0:
        return f"its holder sent no heartbeat for {now - (info.heartbeat or now):.0f} s (lease {info.lease_s:.0f} s)"
    if holder_is_gone(info):
        return "its holder's process is gone"
    return None


_BEATING: weakref.WeakSet[StorageLock] = weakref.WeakSet()
"""Locks whose heartbeat thread may still run."""


@atexit.register
def _stop_heartbeats() -> None:
    """Stop renewing every lock still held when the interpreter exits (an interpreter that exits without
    releasing one has crashed, as far as the lock is concerned: it lapses after its lease); a daemon thread
    inside a storage call during finalisation can crash the interpreter."""
    for lock in list(_BEATING):
        lock.stop_heartbeat()


class StorageLock:
    """``with StorageLock(storage, rel, ttl_s=..., purpose=...):`` holds the lock object at ``rel``, renewing
    it every ``heartbeat_s`` seconds while held."""

    def __init__(self, storage: Storage, rel: str, *, ttl_s: float, purpose: str, heartbeat_s: float = HEARTBEAT_S,
                 lease_s: float | None = None) -> None:
        if ttl_s <= 0 or heartbeat_s <= 0:
            raise ValueError(f"lock ttl_s={ttl_s} and heartbeat_s={heartbeat_s} must be positive")
        self.storage, self.rel, self.ttl_s, self.purpose = storage, rel, float(ttl_s), purpose
        self.heartbeat_s = float(heartbeat_s)
        self.lease_s = float(lease_s) if lease_s is not None else LEASE_BEATS * self.heartbeat_s
        if self.lease_s <= self.heartbeat_s:
            raise ValueError(f"lock lease_s={self.lease_s} must be longer than heartbeat_s={self.heartbeat_s}")
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @property
    def uri(self) -> str:
        """Where the lock object lives."""
        return self.storage.uri(self.rel)

    def _create(self, data: bytes) -> bool:
        """Create the lock object with ``data`` unless it exists; True when this call created it."""
        if self.storage.is_s3:
            fs = self.storage.fsspec()
            try:
                with fs.open(self.storage.path(self.rel), "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            return True
        path = self.storage.path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # atomic, and fails if the lock exists
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def read(self) -> LockInfo | None:
        """The current lock's content; None when there is no lock (or it is unreadable)."""
        try:
            return LockInfo.from_bytes(self.storage.read_bytes(self.rel))
        except FileNotFoundError:
            return None

    def acquire(self) -> LockInfo:
        """Create the lock, taking over an expired one.

        Raises:
            LockHeldError: A live lock exists (the message names the holder, the expiry and the fix).
        """
        for _ in range(3):
            now = time.time()
            info = LockInfo(new_owner_id(), self.purpose, now, now + self.ttl_s, now, self.lease_s)
            if self._create(info.to_bytes()):
                if self.read() != info:  # an endpoint that ignored the condition; the other writer won
                    break
                self.info = info
                logger.info("acquired lock %s (%s)", self.uri, self.purpose)
                self._start_heartbeat()
                return info
            holder = self.read()
            if holder is None and self.storage.exists(self.rel):
                raise LockHeldError(f"lock {self.uri} exists but is not a readable lock: delete it if no run "
                                    "is active, then retry")
            why = None if holder is None else abandoned_because(holder, time.time())
            if holder is not None and why is None:
                wait = ("" if holder.lease_s is None else
                        f"; if that holder is gone, the lock is taken over {holder.lease_s:.0f} s after its last "
                        "heartbeat")
                raise LockHeldError(
                    f"another run holds lock {self.uri} ({holder.describe()}): wait for it to finish{wait}; a lock "
                    "without heartbeats (older versions) stays until it expires: delete the lock object by hand "
                    "if its holder is gone"
                )
            if holder is not None:
                logger.warning("lock %s: %s (%s): taking it over", self.uri, why, holder.describe())
                self.storage.delete(self.rel)
        holder = self.read()
        raise LockHeldError(f"could not acquire lock {self.uri} (held by {holder.describe() if holder else '?'}); "
                            "another run is starting at the same time: retry later")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.rel}", daemon=True)
        self._beater.start()
        _BEATING.add(self)

    def _beat(self) -> None:
        """Renew the lock every ``heartbeat_s`` while it is ours; stop (warning) when it is not any more."""
        while not self._stop.wait(self.heartbeat_s):
            mine = self.info
            if mine is None:
                return
            try:
                current = self.read()
                if current is None or current.owner != mine.owner:
                    logger.warning("lock %s is no longer ours (now %s): not renewing it", self.uri,
                                   current.describe() if current else "absent")
                    return
                renewed = dataclasses.replace(mine, heartbeat=time.time())
                self.storage.write_bytes_atomic(self.rel, renewed.to_bytes())
                self.info = renewed
            except OSError as err:  # storage briefly unreachable: the lease covers several missed beats
                logger.warning("could not renew lock %s (%s); retrying in %.0f s", self.uri, err, self.heartbeat_s)

    def stop_heartbeat(self) -> None:
        """Stop renewing the lock without releasing it (what a crash leaves: the lock lapses after its lease)."""
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=30)
            self._beater = None

    def release(self) -> None:
        """Stop renewing; delete the lock if this holder still owns it (never someone else's)."""
        self.stop_heartbeat()
        if self.info is None:
            return
        current = self.read()
        if current is not None and current.owner == self.info.owner:
            self.storage.delete(self.rel)
            logger.info("released lock %s", self.uri)
        else:
            logger.warning("lock %s is no longer ours (now %s): not deleting it", self.uri,
                           current.describe() if current else "absent")
        self.info = None

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
