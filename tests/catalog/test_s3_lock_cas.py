"""Repository locks on S3 (``catalog.store.locks``, a real server process): the lock object is
created if absent and every heartbeat is a compare-and-swap on the last one's ETag, so a lock
whose object someone removed or replaced is lost at its next beat (a prune then stops before
removing anything); botocore's retry of a write that had succeeded is taken as the success."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from combtest import TEST_PASSWORD
from s3server import S3Server

from catalog.errors import LockedError, RepositoryError
from catalog.repo import Repository
from catalog.store import locks, s3_lease
from catalog.store.s3 import S3Storage


def _repo(s3_env: S3Server, name: str) -> Repository:
    return Repository.init(f"s3://{s3_env.bucket()}/{name}", password=TEST_PASSWORD)


def _lost_within(lock: locks.Lock, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lock.held(look=False)
        except LockedError as err:
            return err.message
        time.sleep(0.02)
    raise AssertionError("the lock was not lost")


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_lock_changed_behind_its_holder_is_lost_at_the_next_beat(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    repo = _repo(s3_env, how)
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    lock = locks.acquire(repo.storage, "prune", wait_s=0)
    try:
        time.sleep(0.3)  # several beats, each a compare-and-swap on the one before
        lock.held()
        if how == "replaced":
            repo.storage.write_atomic(lock.info.name, b'{"someone": "else"}')
        else:
            repo.storage.remove(lock.info.name)
        message = _lost_within(lock)
        assert "compare-and-swap refused" in message or "was removed" in message, message
        assert "lost the repository's prune lock" in message
    finally:
        lock.release()


def test_a_retried_write_that_had_succeeded_is_taken_as_ours(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = _repo(s3_env, "retried").storage
    assert isinstance(storage, S3Storage)
    first = s3_lease.swap(storage, "locks/x.json", b"one", None)
    assert first is not None
    assert s3_lease.swap(storage, "locks/x.json", b"two", None) is None  # (exists: refused)
    real = S3Storage.put

    def put_then_refuse(self, name, body, size, **cond):  # type: ignore[no-untyped-def]
        real(self, name, body, size, **cond)  # the first attempt lands ...
        return None  # ... and its retry is refused (412)

    monkeypatch.setattr(S3Storage, "put", put_then_refuse)
    again = s3_lease.swap(storage, "locks/x.json", b"three", first)
    assert again is not None and again != first
    assert storage.read("locks/x.json") == b"three"
    # Someone else's bytes are not ours: refused.
    monkeypatch.setattr(S3Storage, "put", lambda *a, **k: None)
    assert s3_lease.swap(storage, "locks/x.json", b"four", again) is None


def test_a_beat_that_landed_unseen_does_not_lose_the_lock(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat stored although its request failed (every attempt of it): the next beat's
    If-Match names an older version, and the stored one is recognised as the holder's own."""
    repo = _repo(s3_env, "unseen")
    lock = locks.acquire(repo.storage, "prune", wait_s=0)  # (no beat thread runs within 60 s)
    try:
        real = S3Storage.put

        def lands_then_fails(self, name, body, size, **cond):  # type: ignore[no-untyped-def]
            real(self, name, body, size)
            raise RepositoryError(f"{name}: the connection dropped")

        with monkeypatch.context() as m:
            m.setattr(S3Storage, "put", lands_then_fails)
            lock.info = replace(lock.info, heartbeat="2026-12-07T00:00:01.000000+00:00")
            with pytest.raises(RepositoryError):
                lock._write()
        lock.info = replace(lock.info, heartbeat="2026-12-07T00:00:02.000000+00:00")
        lock._write()  # refused on the stale ETag, then taken as ours and written
        lock.held()
        assert b"00:00:02" in repo.storage.read(lock.info.name)
        # Someone else's lock bytes under our name are not ours.
        other = lock.info.to_json().replace(b'"pid": ', b'"pid": 1')
        repo.storage.write_atomic(lock.info.name, other)
        with pytest.raises(RepositoryError, match="compare-and-swap refused"):
            lock._write()
    finally:
        lock.release()
