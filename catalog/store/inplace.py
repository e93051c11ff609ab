"""Repository files written in place: the one exception to immutable, atomically committed
objects (FORMAT.md 13 note 4, 19). An overlay's log files are appended to, their torn tail is
cut, and its ``lock`` is held by one process at a time.

Owns the two handle interfaces a storage hands out for them (``Storage.open_log``,
``create_log``, ``file_lock``) and their local implementation: a file descriptor each. Object
storage implements them differently (``catalog.store.s3_inplace``: a log as a run of part
objects, the lock as a lease), so what each call promises is written here. Handles raise
``OSError`` with its errno (a full disk stays ENOSPC for an NBD client), not
``RepositoryError``: their callers word the message. Must not: know record formats or overlay
names (``drive.overlays``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from typing import Protocol


class LogFile(Protocol):
    """A file one writer appends to in place. Nothing written is durable before ``sync``; a
    crash may leave a partial write at its end (a torn tail), never reorder earlier bytes."""

    def size(self) -> int:
        """Its length in bytes now."""

    def modified(self) -> float:
        """When it was last written to storage (seconds since the epoch)."""

    def pread(self, n: int, at: int) -> bytes:
        """Up to ``n`` bytes from offset ``at`` (fewer only at its end)."""

    def pwrite(self, parts: Sequence[bytes | memoryview], at: int) -> None:
        """All of ``parts``, in order, from offset ``at``: one gathered write (more only when the
        system writes short). On an error part of it may have been written."""

    def truncate(self, n: int) -> None:
        """Cut it to ``n`` bytes (durable with the next ``sync``)."""

    def sync(self) -> None:
        """Make every write and truncation so far durable."""

    def close(self) -> None: ...


class FileLock(Protocol):
    """An exclusive lock held by one process, never waited for. The holder's death releases it:
    at once on a local disk (no stale lock is left behind), when its lease runs out on object
    storage."""

    def try_acquire(self) -> bool:
        """Take it: True when held now, False when another holder has it."""

    def release(self) -> None:
        """Let it go (when held) and close the handle."""


class InPlaceFiles(Protocol):
    """What a storage offers for files written in place (part of ``storage.Storage``)."""

    logs_reopen: bool  # a log written by an earlier opener takes more writes (else: a new log)

    def open_log(self, name: str, writable: bool = False) -> LogFile:
        """The existing log file ``name``, read-only unless ``writable``."""

    def create_log(self, name: str) -> LogFile:
        """A new, empty log file (an error if ``name`` exists): the file and its name are
        durable before it returns, so nothing later written to it is lost with its name."""

    def file_lock(self, name: str) -> FileLock:
        """The lock ``name``, created empty if missing (not taken yet: ``try_acquire``)."""


class LocalLog:
    """A log file of a local repository: one file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def modified(self) -> float:
        return os.fstat(self.fd).st_mtime

    def pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    def pwrite(self, parts: Sequence[bytes | memoryview], at: int) -> None:
        views = [memoryview(p) for p in parts if p]
        while views:
            n = os.pwritev(self.fd, views, at)
            at += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def truncate(self, n: int) -> None:
        os.ftruncate(self.fd, n)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def open_log(path: str, writable: bool) -> LocalLog:
    return LocalLog(os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC))


def create_log(path: str, sync_dir: Callable[[str], None], mode: int) -> LocalLog:
    """A new, empty log at ``path`` of ``mode``: the file, then its directory entry, made
    durable."""
    log = LocalLog(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode))
    try:
        os.fchmod(log.fd, mode)  # whatever the umask
        log.sync()
        sync_dir(os.path.dirname(path))
    except BaseException:
        log.close()
        raise
    return log


class LocalLock:
    """``flock(LOCK_EX | LOCK_NB)`` on a local file, created empty if missing."""

    def __init__(self, path: str, mode: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

    def release(self) -> None:
        os.close(self.fd)
