"""Logs written in place on object storage (``catalog.store.inplace.LogFile`` for
``catalog.store.s3``): an overlay's log as a run of part objects (FORMAT.md 19.5).

A log ``NAME`` is a marker object ``NAME`` (created if absent before anything is written, so
the name is durable first) and parts ``NAME.parts/<offset as 16 hex digits>``, each immutable,
holding the log's bytes from its offset to the next part's. Writes go to a buffer; ``sync``
uploads it as the next part (one PUT), and a buffer past ``PART_BYTES`` is uploaded before more
is added, so memory stays bounded. A PUT is whole or absent and a buffer ends on a whole
record, so no torn record is stored. Every open for writing starts a new log
(``S3Storage.logs_reopen``): a log an earlier opener wrote is never written again. Instead the
opener **seals** the logs it takes over (``truncate`` on a handle opened on an existing log):
the marker then holds the length the opener replayed, and readers ignore every byte past it,
so a part that a former holder's late PUT adds afterwards is never seen by anyone.

The lock under which a log is written is a lease (``catalog.store.s3_lease``): a log is
written, created or sealed only while it is valid, and a part whose PUT ended after it ran out
is reported as failed.

Must not: know what a log's records hold (``drive.overlays.log``) or which files are overlays.
"""

from __future__ import annotations

import errno
import json
import re
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from catalog.errors import RepositoryError
from catalog.store.s3_lease import Lease, fetch, held, lost

if TYPE_CHECKING:
    from catalog.store.s3 import S3Storage

PART_BYTES = 8 << 20  # a log's buffer is uploaded before it grows past this
WINDOW = 4 << 20  # parts are read in windows of this size, kept for the next reads
WINDOWS_KEPT = 16  # per process
_PART = re.compile(r"[0-9a-f]{16}")
_WINDOWS: OrderedDict[tuple[str, str, int, int, int], bytes] = OrderedDict()
_WINDOWS_LOCK = threading.Lock()


def _io(err: RepositoryError) -> OSError:
    return OSError(errno.EIO, err.message)


def _part_name(name: str, offset: int) -> str:
    return f"{name}.parts/{offset:016x}"


def create_log(s3: S3Storage, name: str) -> S3Log:
    lease = held(s3, name)
    try:
        made = s3.put(name, b"", 0, if_absent=True)
    except RepositoryError as err:
        raise _io(err) from None
    if made is None:
        raise FileExistsError(errno.EEXIST, f"{s3.where(name)} exists")
    return S3Log(s3, name, lease, [], (time.time(), made), None, created=True)


def open_log(s3: S3Storage, name: str, writable: bool) -> S3Log:
    try:
        found = fetch(s3, name)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"{s3.where(name)}: no such log")
        raw, got = found
        parts = _parts(s3, name)
    except RepositoryError as err:
        raise _io(err) from None
    try:
        sealed = json.loads(raw)["length"] if raw else None
        if sealed is not None and (not isinstance(sealed, int) or sealed < 0):
            raise ValueError(sealed)
    except (ValueError, TypeError, KeyError):
        raise OSError(errno.EIO, f"{s3.where(name)}: not a log's marker") from None
    lease = held(s3, name) if writable else None
    made = (got["LastModified"].timestamp(), str(got["ETag"]))
    return S3Log(s3, name, lease, parts, made, sealed)


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
        marker: tuple[float, str],
        sealed: int | None,
        created: bool = False,
    ) -> None:
        """``marker``: the marker's time and ETag (a seal replaces only that one)."""
        self._s3, self._name, self._lease, self._created = s3, name, lease, created
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._modified, self._marker = (max(p[2] for p in parts) if parts else marker[0]), marker[1]
        self._pending: bytes | None = None  # a part whose PUT failed: sent again as it was
        end = 0
        for offset, size, _ in parts:
            if sealed is not None and offset >= sealed:
                break  # added after the log was sealed: never read
            if offset != end:
                raise OSError(errno.EIO, f"{s3.where(name)}: no part holds bytes {end}-{offset}")
            end = offset + size if sealed is None else min(offset + size, sealed)
            self._starts.append(offset)
            self._ends.append(end)
        if sealed is not None and end < sealed:
            raise OSError(errno.EIO, f"{s3.where(name)}: no part holds bytes {end}-{sealed}")
        self._synced = end
        self._buf = bytearray()
        self._mutex = threading.Lock()

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
            start = self._starts[i]
            w = (pos - start) // WINDOW
            window = self._window(start, self._ends[i], w)
            take = min(end, self._ends[i], start + (w + 1) * WINDOW) - pos
            lo = pos - start - w * WINDOW
            if len(window) < lo + take:
                raise OSError(errno.EIO, f"{self._s3.where(self._name)}: a part is too short")
            out += window[lo : lo + take]
            pos += take
        return bytes(out + tail)

    def _window(self, start: int, end: int, w: int) -> bytes:
        """Window ``w`` of the part at ``start`` (fetched once, kept for the next reads)."""
        key = (self._s3.location, self._name, start, end - start, w)
        with _WINDOWS_LOCK:
            data = _WINDOWS.get(key)
            if data is not None:
                _WINDOWS.move_to_end(key)
                return data
        name, lo = _part_name(self._name, start), w * WINDOW
        n = min(WINDOW, end - start - lo)
        try:
            data = self._s3.read(name, lo, n)
        except RepositoryError as err:
            raise _io(err) from None
        if len(data) != n:
            raise OSError(errno.EIO, f"{self._s3.where(name)} is shorter than its listing")
        with _WINDOWS_LOCK:
            _WINDOWS[key] = data
            while len(_WINDOWS) > WINDOWS_KEPT:
                _WINDOWS.popitem(last=False)
        return data

    def _writer(self) -> Lease:
        if self._lease is None:
            raise OSError(errno.EBADF, f"{self._s3.where(self._name)} is open read-only")
        if not self._lease.valid():
            raise lost(self._s3.where(self._name))
        return self._lease

    def pwrite(self, parts: Sequence[bytes | memoryview], at: int) -> None:
        if self._lease is None or not self._created:
            raise OSError(errno.EBADF, f"{self._s3.where(self._name)} takes no more writes")
        if at != self.size():
            raise OSError(errno.EINVAL, f"{self._s3.where(self._name)}: writes only append")
        data = b"".join(parts)
        if len(self._buf) >= PART_BYTES:
            self._upload()
        with self._mutex:
            self._buf += data

    def sync(self) -> None:
        while self._buf:
            self._upload()

    def _upload(self) -> None:
        """The buffer as the next part. After a failed PUT the same bytes go again under the
        same name, so a part, once stored, never changes (a late first attempt included)."""
        lease = self._writer()
        with self._mutex:
            if self._pending is None:
                self._pending = bytes(self._buf)
            data, at = self._pending, self._synced
        try:
            self._s3.put(_part_name(self._name, at), data, len(data))
        except RepositoryError as err:
            raise _io(err) from None
        with self._mutex:
            self._starts.append(at)
            self._ends.append(at + len(data))
            self._synced += len(data)
            del self._buf[: len(data)]
            self._pending = None
            self._modified = time.time()
        if not lease.valid():  # the PUT ended too late to be sure no one took over meanwhile
            raise lost(self._s3.where(self._name))

    def truncate(self, n: int) -> None:
        """On a log this handle created: cut what is not uploaded yet. On a log opened
        writable (an earlier opener's): seal it at ``n`` (see the module)."""
        if self._created:
            with self._mutex:
                if n < self._synced + len(self._pending or b""):
                    raise OSError(errno.EINVAL, f"{self._s3.where(self._name)}: cut below a part")
                del self._buf[n - self._synced :]
            return
        lease = self._writer()
        seal = json.dumps({"length": n}).encode()
        try:  # only over the marker this handle read: never over another opener's seal
            if self._s3.put(self._name, seal, len(seal), if_match=self._marker) is None:
                if self._s3.read(self._name) != seal:  # (not our own request, retried)
                    raise OSError(
                        errno.ENOLCK,
                        f"{self._s3.where(self._name)}: sealed by another opener since it was "
                        "read; open the overlay again",
                    )
        except RepositoryError as err:
            raise _io(err) from None
        if not lease.valid():
            raise lost(self._s3.where(self._name))
        with self._mutex:
            while self._starts and self._starts[-1] >= n:
                self._starts.pop()
                self._ends.pop()
            if self._ends:
                self._ends[-1] = min(self._ends[-1], n)
            self._synced = min(self._synced, n)

    def close(self) -> None:
        """Writes not synced are dropped (the overlay syncs before it closes)."""
        self._buf = bytearray()
