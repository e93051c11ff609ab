"""The local-filesystem storage (``catalog.store.storage.Storage``): a repository in a directory.

Reached by ``LocalStorage.new`` + ``make_root`` or ``LocalStorage.existing``. New files are
written in ``tmp/`` (O_DIRECT for bulk pack data where it works), fsynced, renamed, dir fsynced.

Owns every system call on repository files. Must not: know what a file holds (the other
``catalog.store`` modules do).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import mmap
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

from catalog.errors import RepositoryError, describe_os_error
from catalog.store import inplace
from catalog.store.inplace import FileLock, LogFile
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import TMP_DIR, NewFile

_MAX_IOV = 512  # buffers per writev call (IOV_MAX is 1024 on Linux)
# A repository is its owner's alone (key files, and a plain repository's disks): files 0600,
# directories 0700, whatever the umask (as restic does).
FILE_MODE = 0o600
DIR_MODE = 0o700


class _LocalNewFile:
    def __init__(self, storage: LocalStorage) -> None:
        self._storage = storage
        self._tmp = os.path.join(storage.root, TMP_DIR, f"{os.getpid()}-{secrets.token_hex(8)}.tmp")
        try:
            storage.ensure_dir(os.path.dirname(self._tmp), durable=False)
            self._fh = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in commit/abort
            os.fchmod(self._fh.fileno(), FILE_MODE)  # whatever the umask (before any byte)
        except OSError as err:
            raise RepositoryError(f"cannot create {self._tmp}: {describe_os_error(err)}") from None
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        try:
            while view:
                written = self._fh.write(view)
                if written is None:  # pragma: no cover - only for non-blocking files
                    continue
                view = view[written:]
                self._pos += written
        except OSError as err:
            self.abort()
            raise RepositoryError(f"cannot write {self._tmp}: {describe_os_error(err)}") from None
        return len(data)

    def write_many(self, parts: list[bytes | memoryview]) -> int:
        """Gathered write (writev) of several buffers, in order."""
        total = 0
        try:
            fd = self._fh.fileno()
            for i in range(0, len(parts), _MAX_IOV):
                group = parts[i : i + _MAX_IOV]
                want = sum(len(p) for p in group)
                done = os.writev(fd, group)
                if done < want:  # a short write: finish it buffer by buffer
                    rest = memoryview(b"".join(group))[done:]
                    self._pos += done
                    self.write(rest)
                    done = want
                else:
                    self._pos += done
                total += done
        except OSError as err:
            self.abort()
            raise RepositoryError(f"cannot write {self._tmp}: {describe_os_error(err)}") from None
        return total

    def tell(self) -> int:
        return self._pos

    def commit(self, name: str, durable: bool = True) -> None:
        final = self._storage.path(name)
        try:
            if durable:
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._storage.ensure_dir(os.path.dirname(final), durable)
            os.replace(self._tmp, final)
            if durable:
                self._storage.sync_dir(os.path.dirname(final))
        except OSError as err:
            self.abort()
            raise RepositoryError(f"cannot commit {name}: {describe_os_error(err)}") from None

    def abort(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


class _DirectNewFile(_LocalNewFile):
    """A bulk file (a pack) written with O_DIRECT through an aligned staging buffer.

    Buffered pack writes cost a kernel copy into the page cache (11 % of a full backup's CPU,
    bench/README.md "Where the time goes") and long fsync stalls; O_DIRECT writes go straight
    to the device. The unaligned tail is written buffered at commit. Filesystems that refuse
    O_DIRECT (tmpfs) silently get the buffered path.
    """

    STAGE_BYTES = 4 * 1024 * 1024  # a multiple of every logical block size
    ALIGN_BYTES = 4096

    def __init__(self, storage: LocalStorage) -> None:
        super().__init__(storage)
        self._stage: mmap.mmap | None = None
        self._fill = 0
        self._flushed = 0
        try:
            fd = self._fh.fileno()
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            self._stage = mmap.mmap(-1, self.STAGE_BYTES)
        except OSError:
            self._stage = None  # no O_DIRECT here: plain buffered writes

    def write(self, data: bytes | memoryview) -> int:
        if self._stage is None:
            return super().write(data)
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = min(len(view), self.STAGE_BYTES - self._fill)
            self._stage[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.STAGE_BYTES:
                self._flush(self.STAGE_BYTES)
        return total

    def write_many(self, parts: list[bytes | memoryview]) -> int:
        if self._stage is None:
            return super().write_many(parts)
        return sum(self.write(p) for p in parts)

    def tell(self) -> int:
        return self._flushed + self._fill if self._stage is not None else super().tell()

    def _flush(self, length: int) -> None:
        assert self._stage is not None
        failed = ""
        try:
            pwrite_all(self._fh.fileno(), memoryview(self._stage)[:length], self._flushed)
        except OSError as err:
            failed = describe_os_error(err)
        if failed:  # (outside the handler: its traceback holds views of the staging buffer)
            self.abort()
            raise RepositoryError(f"cannot write {self._tmp}: {failed}")
        self._flushed += length
        rest = self._fill - length
        if rest:
            self._stage.move(0, length, rest)
        self._fill = rest

    def commit(self, name: str, durable: bool = True) -> None:
        if self._stage is not None:
            aligned = self._fill - self._fill % self.ALIGN_BYTES
            if aligned:
                self._flush(aligned)
            failed = ""
            try:
                fd = self._fh.fileno()
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                if self._fill:
                    pwrite_all(fd, memoryview(self._stage)[: self._fill], self._flushed)
            except OSError as err:
                failed = describe_os_error(err)
            if failed:
                self.abort()
                raise RepositoryError(f"cannot write {self._tmp}: {failed}")
            self._stage.close()
            self._stage = None
        super().commit(name, durable)

    def abort(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        super().abort()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``. A short write is continued, so a full disk surfaces as
    the next write's ENOSPC ("No space left on device"), not as a count of bytes."""
    done = 0
    while done < len(data):
        try:
            n = os.pwrite(fd, data[done:], offset + done)
        except OSError as err:
            # After a short O_DIRECT write the rest may be misaligned (EINVAL): say why.
            if done and err.errno != errno.ENOSPC:
                st = os.fstatvfs(fd)
                if st.f_bavail * st.f_frsize < len(data) - done:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise
        if n <= 0:
            raise OSError(errno.EIO, "the device accepted no more bytes")
        done += n


class LocalStorage:
    """A repository in a local directory."""

    logs_reopen = True  # (``inplace.InPlaceFiles``)

    def __init__(self, root: str, direct_io: bool = True, sealer: Sealer = PLAIN) -> None:
        self.root = os.path.abspath(root)
        self.sealer = sealer  # plain, or the unwrapped keys of an encrypted repository
        self.direct_io = direct_io and os.environ.get("COMB_DIRECT_IO", "1") != "0"

    @classmethod
    def new(cls, location: str, marker: str) -> LocalStorage:
        """For a repository to create at ``location``: a missing or empty directory (``marker``
        there: a repository already). Nothing is created before ``make_root``."""
        root = os.path.abspath(location)
        if os.path.exists(os.path.join(root, marker)):
            raise RepositoryError(f"{root} already holds a comb repository")
        if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
            raise RepositoryError(f"{root} exists and is not an empty directory")
        return cls(root)

    def make_root(self, prefixes: Iterable[str]) -> None:
        """Create the repository's directory and these standard prefixes in it (FORMAT.md 3)."""
        with _failing("create", self.root):
            os.makedirs(os.path.dirname(self.root), exist_ok=True)  # (its parents: the user's)
            _private_dir(self.root)
            for prefix in prefixes:
                at = self.root
                for part in prefix.split("/"):
                    at = os.path.join(at, part)
                    _private_dir(at)

    @classmethod
    def existing(cls, location: str) -> LocalStorage:
        """For the repository at ``location``: a directory (its config is not read here)."""
        root = os.path.abspath(location)
        if not os.path.isdir(root):
            raise RepositoryError(
                f"repository {root} does not exist (run `comb -r {location} init`)"
            )
        return cls(root)

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise RepositoryError(f"invalid repository object name {name!r}")
        return os.path.join(self.root, *name.split("/"))

    def local_path(self, name: str) -> str | None:
        return self.path(name)

    def local_copy(self, name: str) -> str:
        return self.path(name)

    def local_copies(self) -> str:
        return self.root

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def size(self, name: str) -> int:
        with _failing("stat", self.path(name)):
            return os.stat(self.path(name)).st_size

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        path = self.path(name)
        try:
            with open(path, "rb", buffering=0) as fh:
                if length < 0:
                    length = os.fstat(fh.fileno()).st_size - offset
                return os.pread(fh.fileno(), length, offset)
        except OSError as err:
            raise RepositoryError(f"cannot read {path}: {describe_os_error(err)}") from None

    def read_into(self, name: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at end of file)."""
        path = self.path(name)
        done = 0
        try:
            with open(path, "rb", buffering=0) as fh:
                while done < len(buf):
                    n = os.preadv(fh.fileno(), [buf[done:]], offset + done)
                    if n == 0:
                        break
                    done += n
        except OSError as err:
            raise RepositoryError(f"cannot read {path}: {describe_os_error(err)}") from None
        return done

    def list(self, prefix: str) -> list[str]:  # noqa: A003
        """All committed names under a directory prefix, sorted (temporary files excluded)."""
        base = self.path(prefix)
        out: list[str] = []
        for dirpath, _dirs, files in _walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            lead = "" if rel == "." else f"{rel}/"  # (the repository's own top level)
            out.extend(f"{lead}{f}" for f in files if not f.endswith(".tmp"))
        return sorted(out)

    def create(self, bulk: bool = False) -> NewFile:
        """A new file; ``bulk`` (packs) bypasses the page cache where the filesystem allows."""
        if bulk and self.direct_io:
            return _DirectNewFile(self)
        return _LocalNewFile(self)

    def write_atomic(self, name: str, data: bytes) -> None:
        new = self.create()
        new.write(data)
        new.commit(name)

    def remove(self, name: str) -> None:
        with _failing("remove", self.path(name)), suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def ensure_dir(self, path: str, durable: bool) -> None:
        """Create a directory (and make its entry durable in its parent when it is new)."""
        if os.path.isdir(path):
            return
        if os.path.abspath(path) == self.root or not path.startswith(self.root + os.sep):
            raise OSError(2, f"repository directory {self.root} is missing")
        parent = os.path.dirname(path)
        self.ensure_dir(parent, durable)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            return
        os.chmod(path, DIR_MODE)  # whatever the umask
        if durable:
            self.sync_dir(parent)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def tmp_files(self) -> builtins.list[str]:
        """Leftovers of interrupted writes (removed by prune, reported by verify)."""
        with suppress(FileNotFoundError, NotADirectoryError):
            return sorted(os.listdir(os.path.join(self.root, TMP_DIR)))
        return []

    def mtime(self, name: str) -> float | None:
        with _failing("stat", self.path(name)), suppress(FileNotFoundError):
            return os.stat(self.path(name)).st_mtime
        return None

    def age(self, name: str) -> float | None:
        written = self.mtime(name)
        return None if written is None else time.time() - written

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        base, found = self.path(prefix), []
        with _failing("list", base), suppress(FileNotFoundError), os.scandir(base) as entries:
            found = [e.name for e in entries if e.is_dir()]
        return sorted(f"{prefix}/{d}" if prefix else d for d in found)

    def sync(self, prefix: str) -> None:
        path = self.path(prefix)
        with _failing("sync", path):
            if os.path.isdir(path):
                self.sync_dir(path)

    def remove_dir(self, prefix: str) -> None:
        with _failing("remove", self.path(prefix)), suppress(FileNotFoundError):
            os.rmdir(self.path(prefix))

    def open_log(self, name: str, writable: bool = False) -> LogFile:
        return inplace.open_log(self.path(name), writable)

    def create_log(self, name: str) -> LogFile:
        return inplace.create_log(self.path(name), self.sync_dir, FILE_MODE)

    def file_lock(self, name: str) -> FileLock:
        return inplace.LocalLock(self.path(name), FILE_MODE)


def _private_dir(path: str) -> None:
    """``path`` as a directory of mode 0700 (an existing one keeps its mode)."""
    with suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)


@contextmanager
def _failing(verb: str, path: str) -> Iterator[None]:
    """An OSError inside becomes RepositoryError("cannot VERB PATH: reason")."""
    try:
        yield
    except OSError as err:
        raise RepositoryError(f"cannot {verb} {path}: {describe_os_error(err)}") from None


def _walk(base: str) -> Iterator[tuple[str, list[str], list[str]]]:
    if not os.path.isdir(base):
        return iter(())
    return os.walk(base, onerror=_walk_error)


def _walk_error(err: OSError) -> None:
    # An unreadable directory must not look empty (its packs would seem missing).
    raise RepositoryError(f"cannot list {err.filename}: {describe_os_error(err)}")
