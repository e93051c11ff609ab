"""The lock of an overlay on object storage (``catalog.store.inplace.FileLock`` for
``catalog.store.s3``): a lease (FORMAT.md 19.5).

The lease is the object ``NAME`` holding JSON (holder, ``token``, ``beat``, its ``seconds``,
``released``), created if absent (If-None-Match), rewritten every quarter of its ``seconds`` by
compare-and-swap (If-Match on the ETag of the previous beat: a beat fails once someone replaced
it), released by a compare-and-swap write of ``released``, and taken over by compare-and-swap
when released or when its age on the server's clock passes the longer of both sides'
``seconds``. A conditional request botocore retried after its first attempt succeeded is
recognised by the token. Its holder writes only while a beat has succeeded within half its
``seconds`` (``valid``, on a clock that counts suspend): nobody can take the lease over before
then. A server that ignores If-Match is refused at the first lease (``probe_cas``).

Owns the lease object and the registry of the leases this process holds (``held``). Must not:
know what the files under a lease hold (``catalog.store.s3_inplace``).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from catalog.errors import RepositoryError, UsageError
from catalog.store.s3_client import missing

if TYPE_CHECKING:
    from catalog.store.s3 import S3Storage
    from catalog.store.storage import Storage

LEASE_SECONDS = 60.0  # default; COMB_S3_LEASE_SECONDS sets another
_LEASES: dict[tuple[str, str], Lease] = {}  # (location, folder) -> the lease held there
_LEASES_LOCK = threading.Lock()
_CAS_PROBED: set[tuple[str, str, str]] = set()


def clock() -> float:
    """Seconds on a clock that also counts the time the machine was suspended."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def lease_seconds() -> float:
    raw = os.environ.get("COMB_S3_LEASE_SECONDS", "")
    if not raw:
        return LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 2 <= value <= 86400:
        raise UsageError(f"COMB_S3_LEASE_SECONDS={raw[:40]!r} is not a number from 2 to 86400")
    return value


def _folder(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def probe_cas(s3: S3Storage) -> None:
    """Refuse a server that ignores If-Match (once per process and location): a lease kept by
    compare-and-swap would then be held by two holders."""
    where = (str(s3.client.meta.endpoint_url), s3.bucket, s3.prefix)
    if where in _CAS_PROBED:
        return
    s3.probe()
    name = f"probe/{secrets.token_hex(8)}"
    etag = s3.put(name, b"a", 1, if_absent=True)
    try:
        stale = s3.put(name, b"b", 1, if_match='"00000000000000000000000000000000"')
        if etag is None or stale is not None or s3.put(name, b"c", 1, if_match=etag) is None:
            raise RepositoryError(
                f"{s3.location}: the S3 server ignores If-Match (compare-and-swap); comb refuses "
                "it for overlays: two servers could write one overlay at once"
            )
    finally:
        s3.remove(name)
    _CAS_PROBED.add(where)


def fetch(s3: S3Storage, name: str) -> tuple[bytes, dict[str, Any]] | None:
    """A small object's bytes with the response's metadata (ETag, Last-Modified, Date), in one
    GET; None when there is none."""
    with s3._failing("read", s3.where(name)):
        try:
            got = s3.client.get_object(Bucket=s3.bucket, Key=s3.key(name))
        except Exception as err:
            if missing(err):
                return None
            raise
        return got["Body"].read(), got


def swap(
    s3: S3Storage,
    name: str,
    body: bytes,
    etag: str | None,
    mine: Callable[[bytes], bool] | None = None,
) -> str | None:
    """Write a small object by compare-and-swap: created only if absent (``etag`` None), else
    only over the version of ``etag``; its new ETag, or None when someone else changed or
    removed it. A refusal is ours when the stored bytes are ``body`` (botocore retried a write
    that had succeeded) or ``mine`` says so (an earlier write that landed unseen): then it is
    taken, or written again over what is stored. A conditional write that fails otherwise (a
    server that rejects If-Match, a dropped request) is sent once more plain: repository locks
    are safe without compare-and-swap (FORMAT.md 13)."""
    cond: dict[str, Any] = {"if_absent": True} if etag is None else {"if_match": etag}
    try:
        new = s3.put(name, body, len(body), **cond)
    except RepositoryError:
        if etag is None:
            raise
        return s3.put(name, body, len(body)) or None
    if new is None:
        now = fetch(s3, name)
        if now is not None and now[0] == body:
            return str(now[1]["ETag"])
        if now is not None and mine is not None and mine(now[0]):
            return s3.put(name, body, len(body), if_match=str(now[1]["ETag"]))
    return new


def beat(
    storage: Storage, name: str, body: bytes, etag: str | None, mine: Callable[[bytes], bool]
) -> str | None:
    """A repository lock's write (``catalog.store.locks``): by ``swap`` on object storage, an
    atomic write elsewhere. Its ETag ("" off S3), or None: someone else changed or removed it."""
    from catalog.store.s3 import S3Storage  # (s3 imports this module)

    if not isinstance(storage, S3Storage):
        storage.write_atomic(name, body)
        return ""
    return swap(storage, name, body, etag, mine)


def _get(s3: S3Storage, name: str) -> tuple[dict[str, Any], str, float] | None:
    """(body as JSON, ETag, age on the server's clock) of a lease; None when it is gone."""
    found = fetch(s3, name)
    if found is None:
        return None
    raw, got = found
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return (body if isinstance(body, dict) else {}), str(got["ETag"]), s3.head_age(got, name)


class Lease:
    """``FileLock`` on object storage: see the module's text."""

    def __init__(self, s3: S3Storage, name: str) -> None:
        self._s3, self._name = s3, name
        self._seconds = lease_seconds()
        self._token = secrets.token_hex(8)
        self._beats = 0
        self._etag = ""
        self._ok_at = -1e18  # when the last successful beat was sent (``clock``)
        self._lost = self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, released: bool = False) -> bytes:
        self._beats += 1
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token}
        state = {"beat": self._beats, "seconds": self._seconds, "released": released}
        return json.dumps({**holder, **state}).encode()

    def _put(self, body: bytes, **cond: Any) -> str | None:
        """A conditional write; a refusal caused by our own earlier attempt (botocore retried
        a request that had succeeded) is taken for the success it was."""
        etag = self._s3.put(self._name, body, len(body), **cond)
        if etag is None:
            now = _get(self._s3, self._name)
            if now is not None and now[0].get("token") == self._token:
                return now[1]  # ours (whichever beat): nobody took it over
        return etag

    def try_acquire(self) -> bool:
        probe_cas(self._s3)
        for _ in range(3):  # (a holder may release or expire between our requests)
            sent, body = clock(), self._body()
            etag = self._put(body, if_absent=True)
            if etag is None:
                now = _get(self._s3, self._name)
                if now is None:
                    continue
                held, tag, age = now
                wait = max(self._seconds, float(held.get("seconds") or 0))
                if not held.get("released") and age - 1 <= wait:  # (whole seconds: age + 1)
                    return False
                sent = clock()
                etag = self._put(body, if_match=tag)
                if etag is None:
                    continue
            self._etag, self._ok_at = etag, sent
            with _LEASES_LOCK:
                _LEASES[(self._s3.location, _folder(self._name))] = self
            self._thread = threading.Thread(target=self._keep, name="comb-lease", daemon=True)
            self._thread.start()
            return True
        return False

    def _keep(self) -> None:
        due = self._ok_at + self._seconds / 4
        while not self._stop.wait(max(0.0, due - clock())):
            sent, body = clock(), self._body()
            try:
                etag = self._put(body, if_match=self._etag)
            except RepositoryError:
                due = clock() + min(1.0, self._seconds / 8)  # soon again
                continue
            if etag is None:
                self._lost = True  # another holder replaced it, or it was removed
                return
            self._etag, self._ok_at = etag, sent
            due = sent + self._seconds / 4

    def valid(self) -> bool:
        return not (self._lost or self._released) and clock() - self._ok_at < self._seconds / 2

    def release(self) -> None:
        if self._thread is None:
            return
        self._released = True  # nothing is written under it from now on
        self._stop.set()
        self._thread.join(timeout=5)  # (a beat stuck on the network is left to end alone)
        self._thread = None
        with _LEASES_LOCK:
            key = (self._s3.location, _folder(self._name))
            if _LEASES.get(key) is self:
                del _LEASES[key]
        if not self._lost:
            try:  # only our own: a lease taken over meanwhile has another ETag
                self._put(self._body(released=True), if_match=self._etag)
            except RepositoryError:
                pass  # it expires instead


def held(s3: S3Storage, name: str) -> Lease:
    with _LEASES_LOCK:
        lease = _LEASES.get((s3.location, _folder(name)))
    if lease is None:
        raise OSError(errno.ENOLCK, f"{s3.where(name)}: written without its folder's lock")
    if not lease.valid():
        raise lost(s3.where(name))
    return lease


def lost(where: str) -> OSError:
    return OSError(
        errno.ENOLCK,
        f"{where}: the overlay's lease is lost (no heartbeat reached the server in time, or "
        "another process took it over); it must be opened again",
    )
