"""Writable overlays: the copy-on-write layer of a recovery point, kept in the repository.

Owns ``overlays/<name>/`` (FORMAT.md, "Overlays"): names, creation (``overlay.json``, written
atomically), listing, removal, the exclusive lock of an open overlay, and ``Overlay``, an open
overlay that appends write records to its log and reads its payloads on demand. The record
format and the extent map live in ``drive.overlays.log``. The base recovery point is never
written. Imports catalog only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

import drive.overlays.log as L
from catalog.errors import CombError, CorruptionError, RepositoryError, UsageError
from catalog.errors import describe_os_error as _os
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

OVERLAYS_DIR = "overlays"
OVERLAY_FORMAT = "comb-overlay"
OVERLAY_VERSION = 1
LOG_MAX_BYTES = 1 << 30  # a new log file is started past this size
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_LOG = re.compile(r"log-(\d{1,12})\.dat")


class OverlayBusy(CombError):
    """The overlay is open for writing by another process (a server)."""

    exit_code = 1


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"overlay name {name[:80]!r} is invalid (1-64 of A-Z a-z 0-9 . _ -, not starting "
            "with '.')"
        )
    return name


def overlay_dir(repo: Repository, name: str) -> str:
    root = repo.storage.local_path("")
    if root is None:
        raise RepositoryError(f"{repo.location}: overlays need a local repository")
    return os.path.join(root, OVERLAYS_DIR, check_name(name))


def log_name(n: int) -> str:
    return f"log-{n}.dat"


@dataclass(frozen=True)
class OverlayInfo:
    name: str
    base: str
    source: str
    size: int
    created: str
    log_bytes: int
    written_bytes: int
    last_write: str | None


def read_doc(repo: Repository, name: str) -> dict[str, object]:
    path = os.path.join(overlay_dir(repo, name), "overlay.json")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        raw = repo.sealer.open_doc(raw, f"overlay {name}", path)  # bound to the name
        doc = json.loads(raw)
    except FileNotFoundError:
        raise UsageError(f"no overlay {name!r} in {repo.location}") from None
    except OSError as err:
        raise RepositoryError(f"cannot read {path}: {_os(err)}") from None
    except ValueError as err:
        raise CorruptionError(f"{path}: not JSON ({err})") from None
    ok = isinstance(doc, dict) and doc.get("format") == OVERLAY_FORMAT
    if not ok or not isinstance(doc.get("size"), int) or not isinstance(doc.get("base"), str):
        raise CorruptionError(f"{path}: not an overlay document")
    if doc.get("version") != OVERLAY_VERSION:
        raise RepositoryError(f"{path}: unknown overlay version {doc.get('version')!r}")
    return doc


def ident(doc: dict[str, object], name: str) -> str:
    """The overlay's id (random, from its document), bound into its sealed records."""
    return str(doc.get("id") or name)


def sealed_records(repo: Repository, doc: dict[str, object], name: str) -> L.Sealed | None:
    """What reads an encrypted repository's sealed records of this overlay (None: plain)."""
    return L.Sealed(repo.sealer, ident(doc, name)) if repo.sealer.encrypted else None


def names(repo: Repository) -> list[str]:
    """Overlays with a document, sorted (a directory without one is an interrupted create)."""
    root = repo.storage.local_path(OVERLAYS_DIR)
    try:
        entries = sorted(os.listdir(root)) if root else []
    except FileNotFoundError:
        return []
    except OSError as err:
        raise RepositoryError(f"cannot list {root}: {_os(err)}") from None
    return [
        n
        for n in entries
        if _NAME.fullmatch(n) and os.path.exists(os.path.join(str(root), n, "overlay.json"))
    ]


def create(repo: Repository, name: str, point: RecoveryPoint) -> None:
    """A new, empty overlay over ``point``; UsageError if the name is taken."""
    repo.require_writable()
    path = overlay_dir(repo, name)
    if os.path.exists(os.path.join(path, "overlay.json")):
        raise UsageError(f"overlay {name!r} already exists")
    doc = {
        "format": OVERLAY_FORMAT,
        "version": OVERLAY_VERSION,
        "id": secrets.token_hex(16),
        "base": point.id,
        "source": point.source,
        "size": point.size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    data = repo.sealer.seal_doc(data, f"overlay {name}")
    repo.storage.write_atomic(f"{OVERLAYS_DIR}/{name}/overlay.json", data)


def log_numbers(path: str) -> list[int]:
    try:
        found = [m for f in os.listdir(path) if (m := _LOG.fullmatch(f))]
    except OSError as err:
        raise RepositoryError(f"cannot list {path}: {_os(err)}") from None
    return sorted(int(m.group(1)) for m in found)


def info(repo: Repository, name: str) -> OverlayInfo:
    doc = read_doc(repo, name)
    path = overlay_dir(repo, name)
    logs = log_numbers(path)
    size, log_bytes, written, mtime = int(str(doc["size"])), 0, 0, 0.0
    for k, n in enumerate(logs):
        file = os.path.join(path, log_name(n))
        try:
            st = os.stat(file)
            written += L.replay(file, n, k == len(logs) - 1, size, None).written_bytes
        except OSError as err:
            raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
        log_bytes += st.st_size
        mtime = max(mtime, st.st_mtime)
    last = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)) if logs else None
    return OverlayInfo(
        name, str(doc["base"]), str(doc.get("source", "")), size, str(doc.get("created", "")),
        log_bytes, written, last,
    )  # fmt: skip


def check(repo: Repository, name: str, point_ids: set[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of one overlay, for ``verify``: its document parses, its base point
    exists, and every record of every log is whole and matches its checksum (a torn record at
    the end of the last log is a warning: the next open cuts it away). Takes no lock."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        doc = read_doc(repo, name)
        if str(doc["base"]) not in point_ids:
            errors.append(f"overlay {name}: its base recovery point {doc['base']} is missing")
        path = overlay_dir(repo, name)
        logs = log_numbers(path)
        size = int(str(doc["size"]))
        for k, n in enumerate(logs):
            file = os.path.join(path, log_name(n))
            try:
                sealed = sealed_records(repo, doc, name)
                got = L.replay(
                    file, n, k == len(logs) - 1, size, L.ExtentMap(), sealed, sealed is not None
                )
            except OSError as err:
                errors.append(f"overlay {name}: cannot read {file}: {_os(err)}")
                continue
            if got.torn:
                warnings.append(
                    f"overlay {name}: {file} ends in a torn record at offset {got.good_bytes} "
                    "(a write cut by a crash, never acknowledged; removed when it is next opened)"
                )
    except CombError as err:
        errors.append(f"overlay {name}: {err.message}")
    return errors, warnings


class _Lock:
    """``flock`` on ``overlays/<name>/lock``: held while the overlay is open for writing."""

    def __init__(self, path: str, name: str) -> None:
        try:
            self.fd = os.open(
                os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as err:
            raise RepositoryError(f"cannot open the lock of overlay {name!r}: {_os(err)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self.fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OverlayBusy(
                    f"overlay {name!r} is in use by another process (a server has it open)"
                ) from None
            raise RepositoryError(f"cannot lock overlay {name!r}: {_os(err)}") from None

    def release(self) -> None:
        os.close(self.fd)


def remove(repo: Repository, name: str) -> None:
    """Delete an overlay; OverlayBusy while a server has it open."""
    read_doc(repo, name)
    path = overlay_dir(repo, name)
    lock = _Lock(path, name)
    try:
        os.unlink(os.path.join(path, "overlay.json"))  # from here on it is no overlay
        for n in log_numbers(path):
            os.unlink(os.path.join(path, log_name(n)))
        os.unlink(os.path.join(path, "lock"))
        os.rmdir(path)
        _sync_dir(os.path.dirname(path))
    except OSError as err:
        raise RepositoryError(f"cannot remove overlay {name!r}: {_os(err)}") from None
    finally:
        lock.release()


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Overlay:
    """An overlay open for writing (holds its lock until ``close``). Writes append a record
    to the current log; ``flush`` makes every write so far durable. Thread-safe."""

    def __init__(self, repo: Repository, name: str) -> None:
        repo.require_writable()
        doc = read_doc(repo, name)
        self.name = name
        self.base_id = str(doc["base"])
        self.size = int(str(doc["size"]))
        self.path = overlay_dir(repo, name)
        self._lock = _Lock(self.path, name)
        self._mutex = threading.Lock()
        self.map = L.ExtentMap()
        self._sealer = repo.sealer
        self._ident = ident(doc, name)
        self._sealed = sealed_records(repo, doc, name)
        self._fds: dict[int, int] = {}
        try:
            self._open_logs()
        except OSError as err:
            self.close()
            raise RepositoryError(f"cannot open overlay {name!r}: {_os(err)}") from None
        except BaseException:
            self.close()
            raise
        self._dirty = False

    def _open_logs(self) -> None:
        logs = log_numbers(self.path)
        for k, n in enumerate(logs):
            file = os.path.join(self.path, log_name(n))
            found = L.replay(
                file,
                n,
                k == len(logs) - 1,
                self.size,
                self.map,
                self._sealed,
                self._sealer.encrypted,
            )
            self._fds[n] = os.open(file, os.O_RDWR | os.O_CLOEXEC)
            if found.torn:  # a crash mid-write: the record was never acknowledged
                os.ftruncate(self._fds[n], found.good_bytes)
                os.fsync(self._fds[n])
        self._current = logs[-1] if logs else -1
        if self._current < 0:
            self._new_log()
        self._end = os.fstat(self._fds[self._current]).st_size

    def _new_log(self) -> None:
        n = self._current + 1
        file = os.path.join(self.path, log_name(n))
        self._fds[n] = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.fsync(self._fds[n])
        _sync_dir(self.path)  # the new file's entry is durable before anything is acknowledged
        self._current, self._end = n, 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._lock.release()

    # -- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._append(L.KIND_DATA, offset, len(data), data, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._append(L.KIND_ZERO, offset, length, b"", fua)

    def _append(self, kind: int, offset: int, length: int, payload: bytes, fua: bool) -> None:
        if offset + length > self.size:
            raise UsageError(f"overlay {self.name}: {offset}+{length} is beyond its end")
        if not length:
            return
        sealed = self._sealer.encrypted and kind == L.KIND_DATA
        need = L.HEADER_BYTES + L.stored_length(kind, L.FLAG_SEALED if sealed else 0, length)
        with self._mutex:
            if self._end + need > LOG_MAX_BYTES and self._end:
                self._sync()
                self._new_log()
            fd, at = self._fds[self._current], self._end
            where = (self._ident, self._current, at)
            head, stored = L.encode_record(kind, offset, length, payload, self._sealer, where)
            try:
                _pwrite_all(fd, [head, stored], at)
            except OSError:
                os.ftruncate(fd, at)  # no partial record stays behind a later one
                raise
            self._end = at + len(head) + len(stored)
            if self._sealed is not None and payload:
                self._sealed.add(self._current, at)
            self.map.add(offset, offset + length, self._current, at + len(head) if payload else -1)
            self._dirty = True
            if fua:
                self._sync()

    def flush(self) -> None:
        with self._mutex:
            self._sync()

    def _sync(self) -> None:
        if self._dirty:
            os.fsync(self._fds[self._current])  # earlier logs were synced when they were left
            self._dirty = False

    # -- reading ------------------------------------------------------------------------------

    def pieces(self, offset: int, length: int) -> list[L.Piece]:
        with self._mutex:
            return self.map.pieces(offset, length)

    def read_piece(self, piece: L.Piece) -> bytes:
        """The bytes of one written run (zeros for a zero record)."""
        n = piece.end - piece.start
        if piece.pos < 0:
            return bytes(n)
        if self._sealed is not None:
            return self._sealed.read(self._fds[piece.log], piece.log, piece.pos, n, self.name)
        data = os.pread(self._fds[piece.log], n, piece.pos)
        if len(data) != n:
            raise CorruptionError(f"overlay {self.name}: log {piece.log} is shorter than its map")
        return data


def _pwrite_all(fd: int, parts: list[bytes | memoryview], at: int) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.pwritev(fd, views, at)
        at += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
