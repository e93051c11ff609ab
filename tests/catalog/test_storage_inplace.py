"""Files written in place (``catalog.store.inplace``: an overlay's logs and lock) on a local
directory and on a real S3 server (moto, its own process): one conformance suite for both, then
what only object storage needs: parts that bound memory, a lease that a dead holder loses on the
server's clock, a holder that stops writing once its lease is gone, and a server that ignores
If-Match refused."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import S3Server, header_stripper

from catalog.errors import RepositoryError
from catalog.store import s3_inplace, s3_lease
from catalog.store.inplace import FileLock, LogFile
from catalog.store.local import LocalStorage
from catalog.store.s3 import S3Storage
from catalog.store.storage import TMP_DIR, Storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        (tmp_path / TMP_DIR).mkdir()
        (tmp_path / "ov").mkdir()
        yield LocalStorage(str(tmp_path))
        return
    server: S3Server = request.getfixturevalue("s3_env")
    yield S3Storage.existing(f"s3://{server.bucket()}/repo")


def test_a_log_round_trips_through_sync_close_and_open(storage: Storage) -> None:
    lock = storage.file_lock("ov/lock")
    assert lock.try_acquire()
    log = storage.create_log("ov/log-0.dat")
    assert log.size() == 0
    log.pwrite([b"head", memoryview(b"-body"), b""], 0)
    log.sync()
    log.pwrite((b"more",), 9)  # not synced yet: read back from where it waits
    assert log.size() == 13 and log.pread(100, 4) == b"-bodymore"
    log.sync()
    log.pwrite((b"++",), 13)
    log.truncate(13)  # the unsynced tail cut away
    log.sync()
    log.close()
    with pytest.raises(FileExistsError):
        storage.create_log("ov/log-0.dat")  # never over an existing log
    reader = storage.open_log("ov/log-0.dat")
    assert reader.size() == 13 and reader.pread(100, 0) == b"head-bodymore"
    assert reader.pread(6, 2) == b"ad-bod"  # across what two syncs wrote
    assert abs(reader.modified() - time.time()) < 120
    with pytest.raises(OSError):
        reader.pwrite([b"x"], 13)  # read-only
    reader.close()
    with pytest.raises(FileNotFoundError):
        storage.open_log("ov/log-1.dat")
    lock.release()


def test_a_truncate_below_what_was_synced(storage: Storage) -> None:
    lock = storage.file_lock("ov/lock")
    assert lock.try_acquire()
    log = storage.create_log("ov/log-0.dat")
    for i, piece in enumerate((b"aaaa", b"bbbb", b"cccc")):
        log.pwrite([piece], 4 * i)
        log.sync()
    log.close()
    again = storage.open_log("ov/log-0.dat", writable=True)
    again.truncate(6)  # a damaged tail cut at open: inside the second sync's bytes
    again.sync()
    again.close()
    assert storage.open_log("ov/log-0.dat").pread(100, 0) == b"aaaabb"
    lock.release()


def test_a_lock_has_one_holder_and_is_never_waited_for(storage: Storage) -> None:
    first = storage.file_lock("ov/lock")
    assert first.try_acquire()
    second = storage.file_lock("ov/lock")
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


# -- object storage only -----------------------------------------------------------------------


@pytest.fixture
def bucket_storage(s3_env: S3Server) -> S3Storage:
    return S3Storage.existing(f"s3://{s3_env.bucket()}/repo")


def _new_log(storage: Storage) -> tuple[FileLock, LogFile]:
    """The folder's lock, taken, and a new log in it."""
    lock = storage.file_lock("ov/lock")
    assert lock.try_acquire()
    return lock, storage.create_log("ov/log-0.dat")


def test_unsynced_writes_are_uploaded_in_bounded_parts(
    bucket_storage: S3Storage, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_inplace, "PART_BYTES", 1000)
    lock, log = _new_log(bucket_storage)
    data = os.urandom(600)
    for i in range(10):  # 6,000 bytes and no sync: memory holds at most one part and a write
        log.pwrite([data], 600 * i)
    keys = s3_env.client().list_objects_v2(
        Bucket=bucket_storage.bucket, Prefix="repo/ov/log-0.dat.parts/"
    )
    parts = [o["Size"] for o in keys.get("Contents", [])]
    assert len(parts) == 4 and all(1000 <= p <= 1600 for p in parts), parts
    log.sync()
    assert bucket_storage.open_log("ov/log-0.dat").pread(6000, 0) == data * 10
    log.close()
    lock.release()
    assert json.loads(bucket_storage.read("ov/lock"))["released"]  # taken at once by the next


def test_parts_are_read_in_windows(
    bucket_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_inplace, "WINDOW", 1000)
    lock, log = _new_log(bucket_storage)
    data = os.urandom(5500)
    log.pwrite([data[:4200]], 0)
    log.sync()  # one part of 4,200 bytes: five windows
    log.pwrite([data[4200:]], 4200)
    log.sync()
    reader = bucket_storage.open_log("ov/log-0.dat")
    for at, n in ((0, 5500), (990, 30), (3999, 1202), (4199, 2), (5400, 500)):
        assert reader.pread(n, at) == data[at : at + n], (at, n)
    lock.release()


def test_a_sealed_log_ignores_a_late_part_and_a_missing_part_is_found(
    bucket_storage: S3Storage, s3_env: S3Server
) -> None:
    """The next opener seals the log it replayed: a part that a former holder's late PUT adds
    afterwards is never read. A part gone from the middle of a log is an error."""
    lock, log = _new_log(bucket_storage)
    log.pwrite([b"aaaa"], 0)
    log.sync()
    stale = bucket_storage.open_log("ov/log-0.dat", writable=True)
    bucket_storage.open_log("ov/log-0.dat", writable=True).truncate(4)  # the next opener
    with pytest.raises(OSError, match="sealed by another opener"):
        stale.truncate(2)  # a seal goes only over the marker its handle read
    log.pwrite([b"bbbb"], 4)  # the former holder's late part
    log.sync()
    assert bucket_storage.exists("ov/log-0.dat.parts/0000000000000004")
    reader = bucket_storage.open_log("ov/log-0.dat")
    assert reader.size() == 4 and reader.pread(100, 0) == b"aaaa"
    log = bucket_storage.create_log("ov/log-1.dat")
    for i in range(3):
        log.pwrite([b"c" * 10], 10 * i)
        log.sync()
    bucket_storage.remove("ov/log-1.dat.parts/000000000000000a")
    with pytest.raises(OSError, match="no part holds bytes 10-20") as err:
        bucket_storage.open_log("ov/log-1.dat")
    assert err.value.errno == errno.EIO
    lock.release()


def test_a_retried_conditional_write_is_taken_for_its_own_success(
    bucket_storage: S3Storage,
) -> None:
    """botocore retries a request whose answer was lost; when the first attempt had been
    applied, the retry is refused by its own precondition. The lease knows its own token."""
    lock = bucket_storage.file_lock("ov/lock")
    assert isinstance(lock, s3_lease.Lease) and lock.try_acquire()
    old = lock._etag
    body = lock._body()
    applied = bucket_storage.put("ov/lock", body, len(body), if_match=old)  # the first attempt
    assert applied is not None
    assert lock._put(body, if_match=old) == applied  # its retry: refused, yet ours
    other = b'{"token": "someone else"}'
    assert bucket_storage.put("ov/lock", other, len(other), if_match=applied) is not None
    assert lock._put(lock._body(), if_match=applied) is None  # taken over: lost
    lock.release()


def test_a_part_whose_upload_failed_is_sent_again_unchanged(
    bucket_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUT that failed may still land later: the retry must store the very same bytes under
    that name, so a part never changes once stored."""
    lock, log = _new_log(bucket_storage)
    log.pwrite([b"first"], 0)
    real = S3Storage.put
    failing = [True]

    def put(self: S3Storage, name: str, *args: object, **kw: object) -> str | None:
        if ".parts/" in name and failing[0]:
            failing[0] = False
            raise RepositoryError(f"cannot write {name}: connection reset")
        return real(self, name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(S3Storage, "put", put)
    with pytest.raises(OSError, match="connection reset"):
        log.sync()
    log.pwrite([b"-second"], 5)
    log.sync()
    assert bucket_storage.read("ov/log-0.dat.parts/0000000000000000") == b"first"
    assert bucket_storage.read("ov/log-0.dat.parts/0000000000000005") == b"-second"
    assert bucket_storage.open_log("ov/log-0.dat").pread(100, 0) == b"first-second"
    lock.release()


def _holder(s3_env: S3Server, location: str, seconds: int = 2) -> subprocess.Popen[str]:
    """Another process that takes the lease and then only sleeps (killed by the test)."""
    code = (
        "import sys, time\n"
        "from catalog.store.s3 import S3Storage\n"
        f"lock = S3Storage.existing({location!r}).file_lock('ov/lock')\n"
        "print(lock.try_acquire(), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, **s3_env.env(), "PYTHONPATH": str(ROOT)}
    env["COMB_S3_LEASE_SECONDS"] = str(seconds)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
    return proc


def test_a_dead_holders_lease_expires_on_the_servers_clock(
    bucket_storage: S3Storage, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's own lease time counts when it is longer than the taker's."""
    monkeypatch.setenv("COMB_S3_LEASE_SECONDS", "2")
    proc = _holder(s3_env, bucket_storage.location, seconds=5)
    try:
        time.sleep(3)  # its heartbeat keeps the lease while it lives
        assert not bucket_storage.file_lock("ov/lock").try_acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        taken, deadline = False, killed + 15
        while not taken and time.monotonic() < deadline:
            lock = bucket_storage.file_lock("ov/lock")
            taken = lock.try_acquire()
            time.sleep(0 if taken else 0.5)
        assert taken and time.monotonic() - killed > 2.5  # not after our 2 s: its 5 s
        lock.release()
    finally:
        proc.kill()
        proc.wait(10)


def test_a_holder_whose_lease_was_taken_stops_writing(
    bucket_storage: S3Storage, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMB_S3_LEASE_SECONDS", "2")
    proc = _holder(s3_env, bucket_storage.location)
    try:
        proc.send_signal(signal.SIGSTOP)  # suspended: no heartbeat, and it does not know it
        time.sleep(5)  # (its age, in whole seconds, must pass 2 by more than a second)
        mine = bucket_storage.file_lock("ov/lock")
        assert mine.try_acquire()  # taken over by compare-and-swap
        proc.send_signal(signal.SIGCONT)
        time.sleep(1.5)  # its next heartbeat fails its compare-and-swap
    finally:
        proc.kill()
        proc.wait(10)
    assert isinstance(mine, s3_lease.Lease)
    body = json.loads(bucket_storage.read("ov/lock"))
    assert body["token"] == mine._token  # still ours: the old holder's beat was refused
    mine.release()
    # Here, in this process: a holder cut off from the server stops writing by itself.
    lock = bucket_storage.file_lock("ov/lock")
    assert isinstance(lock, s3_lease.Lease) and lock.try_acquire()
    log = bucket_storage.create_log("ov/log-0.dat")
    log.pwrite([b"x"], 0)
    lock._stop.set()  # no heartbeat gets through from now on ...
    assert lock._thread is not None
    lock._thread.join()
    lock._ok_at -= 60  # ... and a minute has passed
    log.pwrite([b"y"], 1)  # (only kept in memory)
    with pytest.raises(OSError, match="lease is lost") as err:
        log.sync()
    assert err.value.errno == errno.ENOLCK
    with pytest.raises(OSError, match="lease is lost"):
        bucket_storage.create_log("ov/log-1.dat")
    lock.release()


def test_a_server_that_ignores_if_match_is_refused(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.bucket()
    with header_stripper(s3_env.endpoint, "If-Match") as lying:
        monkeypatch.setenv("AWS_ENDPOINT_URL", lying)
        storage = S3Storage.existing(f"s3://{bucket}/repo")
        with pytest.raises(RepositoryError, match="ignores If-Match"):
            storage.file_lock("ov/lock").try_acquire()
    assert s3_env.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_log_is_written_only_under_its_folders_lock(bucket_storage: S3Storage) -> None:
    with pytest.raises(OSError, match="without its folder's lock"):
        bucket_storage.create_log("ov/log-0.dat")
