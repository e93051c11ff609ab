"""Sources: what is backed up. An image file or a block device, read with pread.

``ImageSource`` is plain picklable configuration; ``open()`` gives the handle that reads. Holes
are found with SEEK_DATA/SEEK_HOLE and never read. An open source is a block source
(``catalog.read.source.BlockSource``, the protocol the virtual drive serves points through too)
that also says where its data is and closes.

Owns the ``Source`` and ``SourceHandle`` protocols and image files. Must not: write to a source,
or know the repository.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import Protocol

from catalog.errors import SourceError, describe_os_error
from catalog.read.source import BlockSource

_BLKGETSIZE64 = 0x80081272


class SourceHandle(BlockSource, Protocol):
    """What the Reader needs of an open source (``OpenSource`` is one): its reads
    (``BlockSource.read_into``), where its data may be, and closing."""

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Picklable configuration of a source; ``open()`` in the process that reads."""

    def open(self) -> SourceHandle: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class ImageSource:
    path: str

    def open(self) -> OpenSource:
        return OpenSource(self.path)

    def describe(self) -> str:
        return self.path


class OpenSource:
    """An open image file or block device."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except OSError as err:
            raise SourceError(f"cannot open source {path}: {describe_os_error(err)}") from None
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"source {path} is a directory, not a disk image or block device")
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            raise SourceError(f"source {path} is not a regular file or block device")
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise SourceError(f"cannot open source {path}: {describe_os_error(err)}") from None
        self.size = self._size(st)

    def _size(self, st: os.stat_result) -> int:
        if not self.is_block:
            return st.st_size
        try:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("Q", buf)[0])
        except OSError:
            return os.lseek(self.fd, 0, os.SEEK_END)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """(offset, length) ranges in [start, end) that may hold data; holes are left out."""
        if self.is_block:
            return [(start, end - start)] if end > start else []
        out: list[tuple[int, int]] = []
        pos = start
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as err:
                    if err.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                out.append((data, hole - data))
                pos = hole
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(start, end - start)] if end > start else []
            raise SourceError(f"cannot map source {self.path}: {describe_os_error(err)}") from None
        return out

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; a short read means the source shrank: an error."""
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as err:
                raise SourceError(
                    f"cannot read source {self.path} at offset {offset + done}: "
                    f"{describe_os_error(err)}"
                ) from None
            if n == 0:
                raise SourceError(
                    f"source {self.path} ended at offset {offset + done}, "
                    f"expected data up to {offset + len(buf)} (truncated while reading?)"
                )
            done += n

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
