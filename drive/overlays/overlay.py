"""Writable overlays: the copy-on-write layer of a recovery point, kept in the repository.

Owns ``overlays/<name>/`` (FORMAT.md, "Overlays"): names, creation (``overlay.json``, written
atomically), listing, removal, the exclusive lock of an open overlay, and ``Overlay``, an open
overlay that appends write records to its log and reads its payloads on demand. The record
format and the extent map live in ``drive.overlays.log``. The base recovery point is never
written. Imports catalog only; every file is reached through the repository's storage (its log
files and lock through ``catalog.store.inplace``'s handles).
"""

from __future__ import annotations

import errno
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass

import drive.overlays.log as L
from catalog.errors import CombError, CorruptionError, RepositoryError, UsageError
from catalog.errors import describe_os_error as _os
from catalog.repo import Repository
from catalog.store.inplace import FileLock, LogFile
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


def overlay_prefix(name: str) -> str:
    """The storage prefix of overlay ``name`` (checked first: a usage error if invalid)."""
    return f"{OVERLAYS_DIR}/{check_name(name)}"


def log_name(n: int) -> str:
    return f"log-{n}.dat"


def log_path(name: str, n: int) -> str:
    """The storage name of log ``n`` of overlay ``name``."""
    return f"{overlay_prefix(name)}/{log_name(n)}"


def shown(repo: Repository, name: str) -> str:
    """How messages name a repository file (its local path)."""
    return repo.storage.local_path(name) or name


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
    doc_name = f"{overlay_prefix(name)}/overlay.json"
    path = shown(repo, doc_name)
    try:
        raw = repo.storage.read(doc_name)
    except RepositoryError:  # "cannot read PATH: ..." unless there is no such overlay
        if not repo.storage.exists(doc_name):
            raise UsageError(f"no overlay {name!r} in {repo.location}") from None
        raise
    try:
        raw = repo.sealer.open_doc(raw, f"overlay {name}", path)  # bound to the name
        doc = json.loads(raw)
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
    entries = [d.rsplit("/", 1)[-1] for d in repo.storage.list_dirs(OVERLAYS_DIR)]
    return [
        n
        for n in entries
        if _NAME.fullmatch(n) and repo.storage.exists(f"{OVERLAYS_DIR}/{n}/overlay.json")
    ]


def create(repo: Repository, name: str, point: RecoveryPoint) -> None:
    """A new, empty overlay over ``point``; UsageError if the name is taken."""
    repo.require_writable()
    if repo.storage.exists(f"{overlay_prefix(name)}/overlay.json"):
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
    prefix = overlay_prefix(name)
    leftovers = [f for f in repo.storage.list(prefix) if f != f"{prefix}/lock"]
    if leftovers:  # logs an interrupted ``rm`` left belong to no overlay: not replayed into this
        lock = _lock(repo, name)
        try:
            for left in leftovers:
                repo.storage.remove(left)
        finally:
            lock.release()
    repo.storage.write_atomic(f"{prefix}/overlay.json", data)


def log_numbers(repo: Repository, name: str) -> list[int]:
    prefix = overlay_prefix(name) + "/"
    files = [f[len(prefix) :] for f in repo.storage.list(prefix[:-1])]
    return sorted(int(m.group(1)) for f in files if (m := _LOG.fullmatch(f)))


def replay_log(
    repo: Repository, name: str, n: int, last: bool, size: int, into: L.ExtentMap | None,
    sealed: L.Sealed | None = None, encrypted: bool | None = None,
) -> L.Replayed:  # fmt: skip
    """``L.replay`` of log ``n`` through a read-only handle (OSError when it cannot be read)."""
    log = repo.storage.open_log(log_path(name, n))
    try:
        return L.replay(log, shown(repo, log_path(name, n)), n, last, size, into, sealed, encrypted)
    finally:
        log.close()


def info(repo: Repository, name: str) -> OverlayInfo:
    doc = read_doc(repo, name)
    logs = log_numbers(repo, name)
    size, log_bytes, written, mtime = int(str(doc["size"])), 0, 0, 0.0
    for k, n in enumerate(logs):
        file = shown(repo, log_path(name, n))
        try:
            found = replay_log(repo, name, n, k == len(logs) - 1, size, None)
        except OSError as err:
            raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
        written += found.written_bytes
        log_bytes += found.file_bytes
        mtime = max(mtime, found.modified)
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
        logs = log_numbers(repo, name)
        size = int(str(doc["size"]))
        for k, n in enumerate(logs):
            file = shown(repo, log_path(name, n))
            try:
                sealed = sealed_records(repo, doc, name)
                last = k == len(logs) - 1
                got = replay_log(
                    repo, name, n, last, size, L.ExtentMap(), sealed, sealed is not None
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


def _lock(repo: Repository, name: str) -> FileLock:
    """The overlay's ``lock`` (FORMAT.md 19.4), taken: held while it is open for writing."""
    try:
        lock = repo.storage.file_lock(f"{overlay_prefix(name)}/lock")
    except OSError as err:
        raise RepositoryError(f"cannot open the lock of overlay {name!r}: {_os(err)}") from None
    try:
        held = lock.try_acquire()
    except OSError as err:
        lock.release()
        raise RepositoryError(f"cannot lock overlay {name!r}: {_os(err)}") from None
    if not held:
        lock.release()
        raise OverlayBusy(f"overlay {name!r} is in use by another process (a server has it open)")
    return lock


def remove(repo: Repository, name: str) -> None:
    """Delete an overlay; OverlayBusy while a server has it open."""
    read_doc(repo, name)
    prefix, storage = overlay_prefix(name), repo.storage
    lock = _lock(repo, name)
    try:
        files = storage.list(prefix)  # its logs (and their parts on object storage)
        storage.remove(f"{prefix}/overlay.json")  # from here on it is no overlay
        for f in files:
            if f not in (f"{prefix}/overlay.json", f"{prefix}/lock"):
                storage.remove(f)
        storage.remove(f"{prefix}/lock")
        storage.remove_dir(prefix)
        storage.sync(OVERLAYS_DIR)
    except RepositoryError as err:
        raise RepositoryError(f"cannot remove overlay {name!r}: {err.message}") from None
    finally:
        lock.release()


class Overlay:
    """An overlay open for writing (holds its lock until ``close``). Writes append a record
    to the current log; ``flush`` makes every write so far durable. Thread-safe."""

    def __init__(self, repo: Repository, name: str) -> None:
        repo.require_writable()
        doc = read_doc(repo, name)
        self.name = name
        self.base_id = str(doc["base"])
        self.size = int(str(doc["size"]))
        self._repo = repo
        self._lock = _lock(repo, name)
        self._mutex = threading.Lock()
        self.map = L.ExtentMap()
        self._sealer = repo.sealer
        self._ident = ident(doc, name)
        self._sealed = sealed_records(repo, doc, name)
        self._logs: dict[int, LogFile] = {}
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
        logs = log_numbers(self._repo, self.name)
        encrypted = self._sealer.encrypted
        for k, n in enumerate(logs):
            last = k == len(logs) - 1
            found = replay_log(
                self._repo, self.name, n, last, self.size, self.map, self._sealed, encrypted
            )
            log = self._logs[n] = self._repo.storage.open_log(log_path(self.name, n), writable=True)
            # A crash mid-write (the record was never acknowledged) is cut away; on object
            # storage the last log is sealed where it was replayed (``catalog.store.s3_inplace``).
            if found.torn or (last and not self._repo.storage.logs_reopen):
                log.truncate(found.good_bytes)
                log.sync()
        self._current = logs[-1] if logs else -1
        # A storage whose logs take no writes from a later opener: a new log at the first write.
        self._fresh = bool(logs) and not self._repo.storage.logs_reopen
        if self._current < 0:
            self._new_log()
        self._end = self._logs[self._current].size()

    def _new_log(self) -> None:
        n, storage = self._current + 1, self._repo.storage
        # The new file's entry is durable before anything written to it is acknowledged.
        while True:
            try:
                self._logs[n] = storage.create_log(log_path(self.name, n))
                break
            except FileExistsError:
                if storage.logs_reopen or n > self._current + 3:
                    raise
            # On object storage: a log made after this overlay was opened (a request of a
            # former holder that arrived late). This opener never replayed it: sealed empty.
            late = storage.open_log(log_path(self.name, n), writable=True)
            try:
                if late.size():  # written: not a late request, another writer
                    raise OSError(errno.ENOLCK, f"{log_path(self.name, n)} is being written")
                late.truncate(0)
            finally:
                late.close()
            n += 1
        self._current, self._end, self._fresh = n, 0, False

    def close(self) -> None:
        with self._mutex:
            for log in self._logs.values():
                log.close()
            self._logs.clear()
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
            if self._fresh or (self._end + need > LOG_MAX_BYTES and self._end):
                self._sync()
                self._new_log()
            log, at = self._logs[self._current], self._end
            where = (self._ident, self._current, at)
            head, stored = L.encode_record(kind, offset, length, payload, self._sealer, where)
            try:
                log.pwrite((head, stored), at)  # one pwritev
            except OSError:
                log.truncate(at)  # no partial record stays behind a later one
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
            self._logs[self._current].sync()  # earlier logs were synced when they were left
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
            return self._sealed.read(self._logs[piece.log], piece.log, piece.pos, n, self.name)
        data = self._logs[piece.log].pread(n, piece.pos)
        if len(data) != n:
            raise CorruptionError(f"overlay {self.name}: log {piece.log} is shorter than its map")
        return data
