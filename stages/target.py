"""The restore output: a sparse file, or a block device whose zero regions are zeroed; or, for a
delta restore (``in_place``), an existing file or device read and rewritten where it differs.

Contiguous runs of restored chunks are written in one call each; aligned runs go past the page
cache (O_DIRECT, through a per-thread aligned staging buffer), the rare unaligned tail (a disk
whose size is not a multiple of 4 KiB) through the buffered descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from catalog.errors import OutputError, describe_os_error
from catalog.store.local import pwrite_all

_BLKZEROOUT = 0x127F
_MAX_IOV = 512
_ALIGN_BYTES = 4096
# A run is written in pieces of at most this size: bounds each thread's staging buffer.
_MAX_RUN_BYTES = 8 * 1024 * 1024
_local = threading.local()
# fallocate(2) FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: a file's zeroed range becomes a hole.
_PUNCH_HOLE = 0x02 | 0x01
_fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _open_direct(path: str) -> int | None:
    """A second, O_DIRECT descriptor on the output; None where the filesystem refuses it."""
    if os.environ.get("COMB_DIRECT_IO", "1") == "0":
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None


def thread_buffer(name: str, size: int, minimum: int) -> mmap.mmap:
    """This thread's reused, page-aligned buffer ``name`` of at least ``size`` bytes.

    Reuse matters: a fresh multi-MiB object per call costs thousands of page faults (measured
    on restore: more system CPU than the reads themselves); page alignment lets O_DIRECT use it.
    """
    buf: mmap.mmap | None = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, max(size, minimum))
        setattr(_local, name, buf)
    return buf


def _stage(size: int) -> mmap.mmap:
    return thread_buffer("stage", size, _MAX_RUN_BYTES)


class RestoreTarget:
    """A sparse output file (or a block device, whose zero regions are zeroed explicitly)."""

    def __init__(
        self,
        path: str,
        size: int,
        exclusive: bool = False,
        name: str | None = None,
        in_place: bool = False,
    ) -> None:
        """``path`` is written; ``name`` (default: ``path``) is what errors call it (the final
        output when ``path`` is a private temporary file). ``in_place``: an existing file or
        device, opened to be read too; a file is cut or extended to ``size``, never emptied."""
        self.path = path
        self.name = name or path
        self.size = size
        self._closed = False
        try:
            st = os.stat(path) if os.path.exists(path) else None
            self.is_block = st is not None and stat.S_ISBLK(st.st_mode)
            create = os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
            mode = os.O_RDWR if in_place else os.O_WRONLY
            flags = mode | os.O_CLOEXEC | (0 if self.is_block or in_place else create)
            self.fd = os.open(path, flags, 0o600)
            self.dfd = _open_direct(path)
            if self.is_block:
                dev_size = os.lseek(self.fd, 0, os.SEEK_END)
                if dev_size < size:
                    raise OutputError(
                        f"block device {path} ({dev_size} bytes) is smaller than {size}"
                    )
            else:
                os.ftruncate(self.fd, size)
        except OSError as err:
            raise OutputError(
                f"cannot write restore target {self.name}: {describe_os_error(err)}"
            ) from None

    def write(self, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as err:
            raise OutputError(
                f"cannot write {self.name} at offset {offset}: {describe_os_error(err)}"
            ) from None

    def write_pieces(self, pieces: list[tuple[int, bytes]]) -> int:
        """Write (offset, data) pieces, contiguous runs in one write each; returns bytes."""
        pieces.sort(key=lambda p: p[0])
        run: list[bytes] = []
        run_start = run_end = -1
        for off, data in pieces:
            data = data[: max(0, min(len(data), self.size - off))]
            if (
                run
                and off == run_end
                and len(run) < _MAX_IOV
                and run_end - run_start + len(data) <= _MAX_RUN_BYTES
            ):
                run.append(data)
                run_end += len(data)
                continue
            if run:
                self._writev(run_start, run)
            run, run_start, run_end = [data], off, off + len(data)
        if run:
            self._writev(run_start, run)
        return sum(len(d) for _, d in pieces)

    def _writev(self, offset: int, bufs: list[bytes]) -> None:
        total = sum(len(b) for b in bufs)
        if self.dfd is not None and offset % _ALIGN_BYTES == 0 and total >= _ALIGN_BYTES:
            self._write_direct(offset, bufs, total)
            return
        try:
            done = os.pwritev(self.fd, bufs, offset)
            if done < total:  # a short write: finish the rest piece by piece
                self.write(offset + done, b"".join(bufs)[done:])
        except OSError as err:
            raise OutputError(
                f"cannot write {self.name} at offset {offset}: {describe_os_error(err)}"
            ) from None

    def _write_direct(self, offset: int, bufs: list[bytes], total: int) -> None:
        """Through an aligned per-thread staging buffer, past the page cache (O_DIRECT): no
        kernel copy into the cache and no long final fsync (bench/README.md "Restore")."""
        stage = _stage(total)
        pos = 0
        for b in bufs:
            stage[pos : pos + len(b)] = b
            pos += len(b)
        aligned = total - total % _ALIGN_BYTES
        view = memoryview(stage)
        failed = ""
        try:
            assert self.dfd is not None
            pwrite_all(self.dfd, view[:aligned], offset)
            if aligned < total:
                pwrite_all(self.fd, view[aligned:total], offset + aligned)
        except OSError as err:
            failed = describe_os_error(err)
        view.release()  # (after the handler: its traceback held views of the buffer)
        if failed:
            raise OutputError(f"cannot write {self.name} at offset {offset}: {failed}")

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the output's bytes at ``offset`` (an in-place target)."""
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    raise OutputError(f"{self.name} ended at {offset + done} while being read")
                done += n
        except OSError as err:
            raise OutputError(
                f"cannot read {self.name} at offset {offset}: {describe_os_error(err)}"
            ) from None

    def clear(self, offset: int, length: int) -> None:
        """Make a range read as zeros: zeroed on a block device, a hole in a file (or zeros
        written where the filesystem cannot punch one)."""
        if self.is_block:
            self.zero(offset, length)
            return
        if length <= 0:
            return
        if _fallocate is not None and _fallocate(self.fd, _PUNCH_HOLE, offset, length) == 0:
            return
        self._write_zeros(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Zero a range of a block device (a sparse file needs nothing)."""
        if not self.is_block or length <= 0:
            return
        try:
            fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as err:
            if err.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                raise OutputError(
                    f"cannot zero {self.name} at {offset}: {describe_os_error(err)}"
                ) from None
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, 4 << 20))
        while length > 0:
            n = min(length, len(zeros))
            self.write(offset, zeros[:n])
            offset += n
            length -= n

    def close(self, durable: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if durable:
                os.fsync(self.fd)
                if self.dfd is not None:
                    os.fsync(self.dfd)
        except OSError as err:
            raise OutputError(f"cannot flush {self.name}: {describe_os_error(err)}") from None
        finally:
            os.close(self.fd)
            if self.dfd is not None:
                os.close(self.dfd)
