"""Files written in place on object storage (``catalog.store.inplace``'s handles for
``catalog.store.s3``): an overlay's log as a run of part objects, and its lock as a lease.

A log ``NAME`` is an empty marker object ``NAME``, made by ``create_log`` (so the name is durable
before anything is written to it), and parts ``NAME.parts/<offset as 16 hex digits>``: each an
immutable object holding the log's bytes from that offset to the next part. Writes go to a
buffer in memory; ``sync`` uploads it as the next part (one PUT), and a buffer past
``PART_BYTES`` is uploaded before more is added, so memory stays bounded whatever a client writes
between flushes. A PUT is whole or absent and a buffer always ends on a whole record, so no torn
record reaches the bucket; a ``truncate`` below what is uploaded (a damaged tail cut at open)
removes the parts past it and rewrites the one it falls in. Two writers cannot safely append to
one object, so a log written by an earlier opener takes no further writes: every open for writing
starts a new log (``S3Storage.logs_reopen``), and a late part of a holder that lost its lease
lands in that holder's own log.

The lock is a lease: the object ``NAME`` (an overlay's ``lock``), created if absent
(If-None-Match), kept alive by a compare-and-swap heartbeat every quarter of ``lease_seconds()``
(If-Match on the ETag the previous beat got, so a beat fails once another holder replaced it),
and taken over by compare-and-swap once its age on the server's clock passes ``lease_seconds()``.
Its holder stops uploading (every part PUT checks first) when no beat has succeeded for half the
lease: nobody can have taken it over before then. A dead holder's lease expires. A server that
ignores If-Match is refused at the first lease (``probe_cas``).

Must not: know what a log's records hold (``drive.overlays.log``) or which files are overlays.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from catalog.errors import RepositoryError, UsageError

if TYPE_CHECKING:
    from catalog.store.s3 import S3Storage

PART_BYTES = 8 << 20  # a log's buffer is uploaded before it grows past this
LEASE_SECONDS = 60.0  # default; COMB_S3_LEASE_SECONDS sets another
_SMALL_PART = 4 << 20  # parts up to this size are read whole and kept for the next read
_KEPT_PARTS = 8
_PART = re.compile(r"[0-9a-f]{16}")
_LEASES: dict[tuple[str, str], Lease] = {}  # (location, folder) -> the lease held there
_LEASES_LOCK = threading.Lock()
_CAS_PROBED: set[tuple[str, str, str]] = set()


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


def _io(err: RepositoryError) -> OSError:
    return OSError(errno.EIO, err.message)


def _folder(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _part_name(name: str, offset: int) -> str:
    return f"{name}.parts/{offset:016x}"


def probe_cas(s3: S3Storage) -> None:
    """Refuse a server that ignores If-Match (once per process and location): a lease kept by
    compare-and-swap would then be taken by two holders."""
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


class Lease:
    """``FileLock`` on object storage: see the module's text."""

    def __init__(self, s3: S3Storage, name: str) -> None:
        self._s3, self._name = s3, name
        self._seconds = lease_seconds()
        self._token = secrets.token_hex(8)
        self._beats = 0
        self._etag = ""
        self._ok_at = 0.0  # monotonic time the last successful beat was sent
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._beats += 1
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token}
        return json.dumps({**holder, "beat": self._beats}).encode()

    def try_acquire(self) -> bool:
        probe_cas(self._s3)
        for _ in range(3):  # (a holder may release or expire between our requests)
            sent, body = time.monotonic(), self._body()
            etag = self._s3.put(self._name, body, len(body), if_absent=True)
            if etag is None:
                head = self._s3._head(self._name)
                if head is None:
                    continue
                if self._s3.head_age(head, self._name) <= self._seconds:
                    return False
                sent = time.monotonic()
                etag = self._s3.put(self._name, body, len(body), if_match=str(head["ETag"]))
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
        while not self._stop.wait(self._seconds / 4):
            sent, body = time.monotonic(), self._body()
            try:
                etag = self._s3.put(self._name, body, len(body), if_match=self._etag)
            except RepositoryError:
                continue  # tried again at the next beat; ``valid`` runs out meanwhile
            if etag is None:
                self._lost = True  # another holder replaced it, or it was removed
                return
            self._etag, self._ok_at = etag, sent

    def valid(self) -> bool:
        return not self._lost and time.monotonic() - self._ok_at < self._seconds / 2

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with _LEASES_LOCK:
            key = (self._s3.location, _folder(self._name))
            if _LEASES.get(key) is self:
                del _LEASES[key]
        if not self._lost:
            try:  # only our own: a lease taken over meanwhile has another ETag
                self._s3.client.delete_object(
                    Bucket=self._s3.bucket, Key=self._s3.key(self._name), IfMatch=self._etag
                )
            except Exception:  # noqa: S110 (not removed: it expires)
                pass


def _held(s3: S3Storage, name: str) -> Lease:
    with _LEASES_LOCK:
        lease = _LEASES.get((s3.location, _folder(name)))
    if lease is None:
        raise OSError(errno.ENOLCK, f"{s3.where(name)}: written without its folder's lock")
    return lease


def create_log(s3: S3Storage, name: str) -> S3Log:
    lease = _held(s3, name)
    try:
        made = s3.put(name, b"", 0, if_absent=True)
    except RepositoryError as err:
        raise _io(err) from None
    if made is None:
        raise FileExistsError(errno.EEXIST, f"{s3.where(name)} exists")
    return S3Log(s3, name, lease, [], time.time())


def open_log(s3: S3Storage, name: str, writable: bool) -> S3Log:
    try:
        made = s3.mtime(name)
        if made is None:
            raise FileNotFoundError(errno.ENOENT, f"{s3.where(name)}: no such log")
        parts = _parts(s3, name)
    except RepositoryError as err:
        raise _io(err) from None
    return S3Log(s3, name, _held(s3, name) if writable else None, parts, made)


def _parts(s3: S3Storage, name: str) -> list[tuple[int, int, float]]:
    """(offset, size, modified) of every part of log ``name``, by offset."""
    prefix = s3.key(_part_name(name, 0)).rsplit("/", 1)[0] + "/"
    found = []
    with s3._failing("list", s3.where(name + ".parts")):
        pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
        for page in pages:
            for e in page.get("Contents", ()):
                tail = e["Key"][len(prefix) :]
                if _PART.fullmatch(tail):
                    found.append((int(tail, 16), int(e["Size"]), e["LastModified"].timestamp()))
    return sorted(found)


class S3Log:
    """``LogFile`` on object storage: see the module's text. Thread-safe for reads beside
    one writer."""

    def __init__(
        self,
        s3: S3Storage,
        name: str,
        lease: Lease | None,
        parts: Sequence[tuple[int, int, float]],
        made: float,
    ) -> None:
        self._s3, self._name, self._lease = s3, name, lease
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._modified = made
        for offset, size, modified in parts:
            end = self._ends[-1] if self._ends else 0
            if offset != end:
                raise OSError(errno.EIO, f"{s3.where(name)}: no part holds bytes {end}-{offset}")
            self._starts.append(offset)
            self._ends.append(offset + size)
            self._modified = max(self._modified, modified)
        self._synced = self._ends[-1] if self._ends else 0
        self._buf = bytearray()
        self._mutex = threading.Lock()
        self._kept: OrderedDict[int, bytes] = OrderedDict()

    def size(self) -> int:
        with self._mutex:
            return self._synced + len(self._buf)

    def modified(self) -> float:
        return self._modified

    def pread(self, n: int, at: int) -> bytes:
        out = bytearray()
        with self._mutex:
            end, synced = min(at + n, self._synced + len(self._buf)), self._synced
            tail = (
                bytes(self._buf[max(at, synced) - synced : end - synced]) if end > synced else b""
            )
        pos = at
        while pos < min(end, synced):
            i = bisect_right(self._starts, pos) - 1
            take = min(end, self._ends[i]) - pos
            out += self._part(i, pos - self._starts[i], take)
            pos += take
        return bytes(out + tail)

    def _part(self, i: int, lo: int, n: int) -> bytes:
        start, size = self._starts[i], self._ends[i] - self._starts[i]
        if size > _SMALL_PART:
            return self._read(start, lo, n)
        with self._mutex:
            data = self._kept.get(start)
        if data is None:
            data = self._read(start, 0, size)
            with self._mutex:
                self._kept[start] = data
                while len(self._kept) > _KEPT_PARTS:
                    self._kept.popitem(last=False)
        return data[lo : lo + n]

    def _read(self, start: int, lo: int, n: int) -> bytes:
        name = _part_name(self._name, start)
        try:
            data = self._s3.read(name, lo, n)
        except RepositoryError as err:
            raise _io(err) from None
        if len(data) != n:
            raise OSError(errno.EIO, f"{self._s3.where(name)} is shorter than its listing")
        return data

    def _check(self) -> None:
        if self._lease is None:
            raise OSError(errno.EBADF, f"{self._s3.where(self._name)} is open read-only")
        if not self._lease.valid():
            raise OSError(
                errno.ENOLCK,
                f"{self._s3.where(self._name)}: its lock's lease was lost (no heartbeat reached "
                "the server in time, or another process took it over); nothing more is written",
            )

    def pwrite(self, parts: Sequence[bytes | memoryview], at: int) -> None:
        self._check()
        if at != self.size():
            raise OSError(errno.EINVAL, f"{self._s3.where(self._name)}: writes only append")
        if len(self._buf) >= PART_BYTES:
            self._upload()
        with self._mutex:
            for p in parts:
                self._buf += p

    def sync(self) -> None:
        if self._buf:
            self._upload()

    def _upload(self) -> None:
        self._check()
        with self._mutex:
            data, at = bytes(self._buf), self._synced
        try:
            self._s3.put(_part_name(self._name, at), data, len(data))
        except RepositoryError as err:
            raise _io(err) from None
        with self._mutex:
            self._starts.append(at)
            self._ends.append(at + len(data))
            self._synced += len(data)
            del self._buf[: len(data)]
            self._modified = time.time()

    def truncate(self, n: int) -> None:
        with self._mutex:
            if n >= self._synced:
                del self._buf[n - self._synced :]
                return
        self._check()
        try:
            while self._starts and self._starts[-1] >= n:  # the last first: no gap on a crash
                self._s3.remove(_part_name(self._name, self._starts[-1]))
                self._starts.pop()
                self._ends.pop()
            if self._ends and self._ends[-1] > n:
                keep = self._part(len(self._starts) - 1, 0, n - self._starts[-1])
                self._s3.put(_part_name(self._name, self._starts[-1]), keep, len(keep))
                self._ends[-1] = n
        except RepositoryError as err:
            raise _io(err) from None
        with self._mutex:
            self._synced, self._buf = n, bytearray()
            self._kept.clear()

    def close(self) -> None:
        """Writes not synced are dropped (the overlay syncs before it closes)."""
        self._buf = bytearray()
