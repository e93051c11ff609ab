"""The XFS backend (libfsxfs, libyal's pyfsxfs) of the filesystem worker, read through a
``read(offset, length)`` function over one volume.

Runs only inside the worker process (``drive.files.worker``): it parses untrusted guest data.

libfsxfs gives names and symbolic link targets only as UTF-8 text and refuses one that is not
valid UTF-8; such a name or target is then read here from the raw directory (short form in the
inode, or its directory data blocks) or link (inode or blocks). A name found in neither (a
directory in a form this fallback does not parse: a corrupt one) is left out of the listing, as
the worker has no way to report one entry. libfsxfs gives an extent's disk address as XFS's
(allocation group, block) number times the block size, not a byte offset of the volume: runs
translate it with the superblock's geometry.

Owns the translation of libfsxfs's file entries, reads and extents into comb's terms. Must
not: be imported outside the worker, touch a file or a repository, or skip an error silently
(a name is left out only when neither libfsxfs nor the raw directory can give its bytes).
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from typing import Any

import pyfsxfs

from .backend import Row
from .devices import checked
from .xattrs import MAX_VALUE, Collected, xfs_acl, xfs_name

_KIND = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}
_NOT_ON_DISK = 1  # libfsxfs's extent flag: a hole or an unwritten (preallocated) extent
_LEAF_OFFSET = 32 << 30  # a directory's data blocks lie below this offset; its index above
_FREE_TAG = 0xFFFF
_MAX_DIR_SCAN = 256 << 20


class _Window:
    """One volume as the file-like object libfsxfs reads: its bytes come from ``read``."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read, self._size, self._at = read, size, 0

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._at + size)
        if end <= self._at:
            return b""
        data = self._read(self._at, end - self._at)
        self._at += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._at, 2: self._size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the volume")
        self._at = base + offset
        return self._at

    def tell(self) -> int:
        return self._at

    def get_size(self) -> int:
        return self._size

    def close(self) -> None:
        pass


class _Geometry:
    """What the superblock says about where blocks and inodes lie."""

    def __init__(self, sb: bytes, size: int) -> None:
        if len(sb) < 224 or sb[:4] != b"XFSB":
            raise ValueError("no XFS superblock")
        u32 = _u32
        self.block = u32(sb, 4)
        self.ag_blocks, self.ag_count = u32(sb, 84), u32(sb, 88)
        self.inode_size = int.from_bytes(sb[104:106], "big")
        self.ag_log, self.inopb_log = sb[124], sb[123]
        self.dir_block = self.block << sb[192]
        self.v5 = int.from_bytes(sb[100:102], "big") & 0xF == 5
        self.ftype = bool(u32(sb, 216) & 1) if self.v5 else bool(u32(sb, 200) & 0x200)
        if not (512 <= self.block <= 65536 and self.block & (self.block - 1) == 0):
            raise ValueError(f"XFS superblock: block size {self.block} is not valid")
        if not (0 < self.ag_blocks <= 1 << self.ag_log and 0 < self.ag_count):
            raise ValueError("XFS superblock: allocation group geometry is not valid")
        if self.ag_count * self.ag_blocks > size // self.block + self.ag_blocks:
            raise ValueError("XFS superblock: allocation groups beyond the volume")
        if not (256 <= self.inode_size <= 2048 and self.dir_block <= 65536):
            raise ValueError("XFS superblock: inode or directory block size is not valid")

    def volume_offset(self, address: int) -> int:
        """The volume byte offset of libfsxfs's extent address ((ag << ag_log | block) * size)."""
        fsb, rest = divmod(address, self.block)
        ag, block = fsb >> self.ag_log, fsb & ((1 << self.ag_log) - 1)
        if rest or ag >= self.ag_count or block >= self.ag_blocks:
            raise ValueError(f"an extent lies outside the filesystem (block {fsb})")
        return (ag * self.ag_blocks + block) * self.block

    def inode_offset(self, inode: int) -> int:
        log = self.ag_log + self.inopb_log
        ag, ag_inode = inode >> log, inode & ((1 << log) - 1)
        block, index = ag_inode >> self.inopb_log, ag_inode & ((1 << self.inopb_log) - 1)
        if ag >= self.ag_count or block >= self.ag_blocks:
            raise ValueError(f"inode {inode} lies outside the filesystem")
        return (ag * self.ag_blocks + block) * self.block + index * self.inode_size


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


class XfsFilesystem:
    """A volume's XFS filesystem as libfsxfs reads it."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._readv = read
        self._geo = _Geometry(read(0, 512), size)
        self.block_size = self._geo.block
        self._volume = pyfsxfs.volume()
        try:
            self._volume.open_file_object(_Window(read, size))
            self.root = int(self._volume.get_root_directory().inode_number)
        except OSError as err:
            raise ValueError(_message(err, "no XFS filesystem libfsxfs can read")) from None
        self._open: tuple[int, Any] | None = None

    def _entry(self, inode: int) -> Any:
        if self._open is None or self._open[0] != inode:
            try:
                self._open = (inode, self._volume.get_file_entry_by_inode(inode))
            except OSError as err:
                raise ValueError(_message(err, f"inode {inode} cannot be opened")) from None
        return self._open[1]

    def listdir(self, inode: int) -> list[Row]:
        directory = self._entry(inode)
        try:
            if stat.S_IFMT(int(directory.file_mode)) != stat.S_IFDIR:
                raise ValueError(f"inode {inode} is not a directory")
            rows: list[Row] = []
            unnamed = []
            for i in range(int(directory.number_of_sub_file_entries)):
                sub = directory.get_sub_file_entry(i)
                name = _text(sub, "name")
                if name is None:
                    unnamed.append(sub)
                elif name not in (b"", b".", b".."):
                    rows.append(self._row(sub, name))
            if unnamed:
                raw = self._raw_names(inode, directory)
                for sub in unnamed:
                    names = raw.get(int(sub.inode_number))
                    if names:
                        rows.append(self._row(sub, names.pop(0)))
        except OSError as err:
            raise ValueError(_message(err, f"inode {inode} is not a readable directory")) from None
        return rows

    def _row(self, sub: Any, name: bytes) -> Row:
        mode = int(sub.file_mode)
        kind = _KIND.get(stat.S_IFMT(mode), "other")
        inode = int(sub.inode_number)
        target = None
        if kind == "symlink":
            target = _text(sub, "symbolic_link_target")
            if target is None or len(target) != int(sub.size):  # libfsxfs: b"XSLM" for a
                target = self._raw_target(inode, int(sub.size))  # v5 link kept in a block
        return (
            name,
            kind,
            inode,
            int(sub.size) if kind in ("file", "symlink") else 0,
            mode & 0o7777,
            int(sub.owner_identifier),
            int(sub.group_identifier),
            int(sub.get_modification_time_as_integer()),
            int(sub.get_inode_change_time_as_integer()),
            int(sub.get_access_time_as_integer()),
            int(sub.number_of_links),
            target or None,
        )

    def read(self, inode: int, offset: int, length: int) -> bytes:
        entry = self._entry(inode)
        try:
            size = int(entry.size)
            if offset >= size or length <= 0:
                return b""
            return bytes(entry.read_buffer_at_offset(min(length, size - offset), offset))
        except OSError as err:
            raise ValueError(_message(err, f"inode {inode} cannot be read")) from None

    def runs(self, inode: int) -> list[tuple[int, int, int]] | None:
        """The file's data as (file offset, length, volume offset) runs, holes and unwritten
        extents left out; None when libfsxfs cannot list its extents."""
        entry = self._entry(inode)
        try:
            if stat.S_IFMT(int(entry.file_mode)) != stat.S_IFREG:
                return None
            size = int(entry.size)
            extents = self._extents(entry)
        except OSError:
            return None
        out = []
        for start, length, address, flags in extents:
            if flags & ~_NOT_ON_DISK:
                return None
            length = min(length, size - start)
            if flags & _NOT_ON_DISK or length <= 0:
                continue
            out.append((start, length, self._geo.volume_offset(address)))
        return out

    def device(self, inode: int) -> tuple[int, int]:
        """A character or block device's number (major, minor), as libfsxfs reads it."""
        entry = self._entry(inode)
        try:
            mode = int(entry.file_mode)
            number = entry.device_number
        except OSError as err:
            raise ValueError(_message(err, f"inode {inode}: no device number")) from None
        if stat.S_IFMT(mode) not in (stat.S_IFCHR, stat.S_IFBLK):
            raise ValueError(f"inode {inode} is not a device (mode {mode:o})")
        if not (isinstance(number, tuple) and len(number) == 2):
            raise ValueError(f"inode {inode}: libfsxfs gave no device number")
        return checked(inode, int(number[0]), int(number[1]))

    def xattrs(self, inode: int) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """The inode's extended attributes and ACLs in Linux's terms (``drive.files.xattrs``),
        and what could not be read of them (that attribute left out)."""
        entry = self._entry(inode)
        out = Collected()
        try:
            count = int(entry.number_of_extended_attributes)
        except OSError as err:
            raise ValueError(_message(err, f"inode {inode}: its xattrs cannot be read")) from None
        for i in range(count):
            try:
                attribute = entry.get_extended_attribute(i)
                text = str(attribute.name)
                size = int(attribute.size)
            except (OSError, UnicodeError) as err:
                why = " ".join(str(err).split()).split(". ")[0][:200]
                out.problems.append(f"inode {inode}: xattr {i} cannot be read: {why}")
                continue
            name = xfs_name(text)
            if name is None:
                out.problems.append(f"inode {inode}: xattr {text[:80]!r} is not one Linux sets")
                continue
            if size > MAX_VALUE:
                out.problems.append(f"inode {inode}: xattr {text[:80]!r} of {size} bytes")
                continue
            try:
                value = bytes(attribute.read_buffer_at_offset(size, 0)) if size else b""
                if len(value) != size:
                    raise ValueError(f"its value is cut short ({len(value)} of {size} bytes)")
                if name.startswith(b"system.posix_acl_"):
                    value = xfs_acl(value)
            except (OSError, ValueError) as err:
                why = " ".join(str(err).split()).split(". ")[0][:200]
                out.problems.append(f"inode {inode}: xattr {text[:80]!r}: {why}")
                continue
            out.add(name, value)
        return out.found, out.problems

    def _extents(self, entry: Any) -> list[tuple[int, int, int, int]]:
        """libfsxfs's extents as (file offset, length, address, flags): they follow one another
        from offset 0, holes included as extents of their own (flagged ``_NOT_ON_DISK``)."""
        out, at = [], 0
        for i in range(int(entry.number_of_extents)):
            address, length, flags = (int(v) for v in entry.get_extent(i))
            out.append((at, length, address, flags))
            at += length
        return out

    def _inode(self, inode: int) -> tuple[int, bytes]:
        """The inode's format (1 local, 2 extents, 3 btree) and its literal area."""
        data = self._readv(self._geo.inode_offset(inode), self._geo.inode_size)
        if data[:2] != b"IN":
            raise ValueError(f"inode {inode} has no inode magic")
        return data[5], data[176 if data[4] >= 3 else 100 :]

    def _blocks(self, entry: Any, below: int) -> list[bytes]:
        """The bytes of the extents of ``entry`` that lie on disk below file offset ``below``."""
        out, total = [], 0
        for start, length, address, flags in self._extents(entry):
            if flags & _NOT_ON_DISK or start >= below:
                continue
            total += length
            if total > _MAX_DIR_SCAN:
                raise ValueError("a directory too large to read its raw names")
            out.append(self._readv(self._geo.volume_offset(address), length))
        return out

    def _raw_names(self, inode: int, directory: Any) -> dict[int, list[bytes]]:
        """Names that are not valid UTF-8 in the raw directory, by the inode they name."""
        form, literal = self._inode(inode)
        found: list[tuple[int, bytes]] = []
        if form == 1:
            found = _short_form(literal, self._geo.ftype)
        else:
            size = self._geo.dir_block
            for data in self._blocks(directory, _LEAF_OFFSET):
                for at in range(0, len(data) - size + 1, size):
                    found += _data_block(data[at : at + size], self._geo.ftype)
        names: dict[int, list[bytes]] = {}
        for number, name in found:
            if not _utf8(name):
                names.setdefault(number, []).append(name)
        return names

    def _raw_target(self, inode: int, size: int) -> bytes:
        form, literal = self._inode(inode)
        if form == 1:
            return literal[:size]
        header = 56 if self._geo.v5 else 0  # each remote link block starts "XSLM" on v5
        data = b"".join(b[header:] for b in self._blocks(self._entry(inode), 1 << 62))
        return data[:size]


def _short_form(data: bytes, ftype: bool) -> list[tuple[int, bytes]]:
    """(inode, name) of a short-form directory kept in its inode's literal area."""
    count, wide = data[0], data[1]
    width = 8 if wide else 4
    at, out = 2 + width, []
    for _ in range(count):
        length = data[at]
        name = data[at + 3 : at + 3 + length]
        at += 3 + length + ftype
        out.append((int.from_bytes(data[at : at + width], "big"), name))
        at += width
    return out


def _data_block(block: bytes, ftype: bool) -> list[tuple[int, bytes]]:
    """(inode, name) of one directory data block; a damaged entry ends the block."""
    magic = block[:4]
    header = {b"XD2B": 16, b"XD2D": 16, b"XDB3": 64, b"XDD3": 64}.get(magic)
    if header is None:
        return []
    end = len(block)
    if magic in (b"XD2B", b"XDB3"):  # a single-block directory: its leaf lies at the end
        end -= 8 + 8 * _u32(block, len(block) - 8)
    at, out = header, []
    while 0 <= at < end - 10:
        if int.from_bytes(block[at : at + 2], "big") == _FREE_TAG:
            skip = int.from_bytes(block[at + 2 : at + 4], "big")
            if skip < 8:
                break
            at += skip
            continue
        length = block[at + 8]
        size = (8 + 1 + length + ftype + 2 + 7) // 8 * 8
        if int.from_bytes(block[at + size - 2 : at + size], "big") != at:
            break
        out.append((int.from_bytes(block[at : at + 8], "big"), block[at + 9 : at + 9 + length]))
        at += size
    return out


def _utf8(name: bytes) -> bool:
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return True


def _text(entry: Any, attribute: str) -> bytes | None:
    """A name or link target of ``entry`` as UTF-8 bytes; None when libfsxfs cannot give it."""
    try:
        value = getattr(entry, attribute)
    except OSError:
        return None
    if value is None:
        return None
    return str(value).encode("utf-8", "surrogateescape")


def _message(err: OSError, fallback: str) -> str:
    """libyal's error chain, shortened to its first link (what is wrong)."""
    text = " ".join(str(err).split())
    first = text.split(". ")[0] if text else ""
    return first[:200] if first else fallback
