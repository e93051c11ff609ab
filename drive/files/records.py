"""Where a filesystem keeps an inode's own record on its volume: what a directory's listing
depends on besides the directory's blocks, so an incremental file catalog re-lists only the
directories whose metadata changed (``drive.files.worker``'s deps).

ext2/3/4: the inode tables named by the group descriptors (not with ``meta_bg``, whose
descriptors are scattered: no answer there); NTFS: the MFT record, through the runs of $MFT.
An answer of None means "unknown": the caller then re-lists the directory every time.

Runs only inside the worker (the bytes are the guest's). Must not: guess (an offset out of the
volume, or a field out of range, is None), or read more than a descriptor or a boot sector.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Read = Callable[[int, int], bytes]
_EXT_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80
_INCOMPAT_META_BG = 0x10


class ExtRecords:
    """Inode record offsets of an ext2/3/4 volume."""

    def __init__(self, read: Read, size: int) -> None:
        self._read, self._size = read, size
        self.ok = False
        sb = read(1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
            return
        (log_block,) = struct.unpack_from("<I", sb, 24)
        (self.ipg,) = struct.unpack_from("<I", sb, 40)
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] or 128
        (incompat,) = struct.unpack_from("<I", sb, 96)
        (first_data_block,) = struct.unpack_from("<I", sb, 20)
        if log_block > 6 or not self.ipg or incompat & _INCOMPAT_META_BG:
            return
        self.block = 1024 << log_block
        wide = incompat & _INCOMPAT_64BIT
        self.desc_size = struct.unpack_from("<H", sb, 254)[0] if wide else 32
        if self.desc_size < 32 or self.desc_size > 1024:
            return
        self.gdt = (first_data_block + 1) * self.block
        self._tables: dict[int, int | None] = {}
        self.length = self.inode_size
        self.ok = True

    def _table(self, group: int) -> int | None:
        if group not in self._tables:
            raw = self._read(self.gdt + group * self.desc_size, self.desc_size)
            table = None
            if len(raw) == self.desc_size:
                table = struct.unpack_from("<I", raw, 8)[0]
                if self.desc_size >= 64:
                    table |= struct.unpack_from("<I", raw, 40)[0] << 32
            self._tables[group] = table
        return self._tables[group]

    def offset(self, inode: int) -> int | None:
        if not self.ok or inode < 1:
            return None
        group, index = divmod(inode - 1, self.ipg)
        table = self._table(group)
        if table is None:
            return None
        at = table * self.block + index * self.inode_size
        return at if 0 < at and at + self.inode_size <= self._size else None


class NtfsRecords:
    """MFT record offsets of an NTFS volume, given the runs of $MFT's data."""

    def __init__(self, read: Read, size: int, mft_runs: list[tuple[int, int, int]] | None):
        self._size = size
        self._runs = mft_runs or []
        boot = read(0, 512)
        self.ok = False
        if len(boot) < 512 or boot[3:11] != b"NTFS    ":
            return
        (sector,) = struct.unpack_from("<H", boot, 11)
        cluster = sector * boot[13]
        per = struct.unpack_from("<b", boot, 64)[0]
        self.record = cluster * per if per > 0 else 1 << -per
        self.length = self.record
        self.ok = bool(self._runs) and 256 <= self.record <= 65536

    def offset(self, inode: int) -> int | None:
        if not self.ok:
            return None
        want = inode * self.record
        for start, length, where in self._runs:
            if start <= want < start + length:
                at = where + want - start
                return at if at + self.record <= self._size else None
        return None
