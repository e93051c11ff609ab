"""Extended attributes and POSIX ACLs of a guest's files, in the terms Linux's ``setxattr`` takes:
a name with its namespace (``user.``, ``trusted.``, ``security.``, ``system.posix_acl_*``) and
its value; ACLs in the VFS format (``posix_acl_xattr``: version 2, then tag/perm/id entries).

ext2/3/4 (``ext_xattrs``): the entries after the inode's ``i_extra_isize`` (magic 0xEA020000)
and in its xattr block (``i_file_acl``); a value kept in an inode of its own (``ea_inode``) is
read through the backend. ACLs are stored in ext's compact format (name index 2 and 3) and are
converted. XFS (``xfs_name``, ``xfs_acl``): libfsxfs gives the names (``secure.`` for the
security namespace) and values; ACLs are the root namespace's ``SGI_ACL_FILE`` and
``SGI_ACL_DEFAULT`` in XFS's big-endian format. ext's internal attributes (``system.data`` of
inline data, encryption contexts) are not files' attributes and are left out.

Every length and offset is checked against the inode or block it lies in: a damaged entry is
one line in ``problems`` (its attribute left out), a damaged table ends its area.

Runs only inside the worker (the bytes are the guest's). Owns the on-disk formats of xattrs and
ACLs. Must not: import a parsing library, touch a file, or hold more than ``MAX_TOTAL`` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Xattrs = list[tuple[bytes, bytes]]
MAX_VALUE = 64 << 10  # Linux's XATTR_SIZE_MAX: a larger value cannot be set
MAX_NAMES = 64 << 10  # Linux's XATTR_LIST_MAX: more names cannot be listed
MAX_TOTAL = 16 << 20
MAX_NAME = 255

_EXT_MAGIC = 0xEA020000
_EXT_ENTRY = 16
_EXT_BLOCK_HEADER = 32
_EXT_PREFIX = {1: b"user.", 4: b"trusted.", 6: b"security."}
_EXT_ACL = {2: b"system.posix_acl_access", 3: b"system.posix_acl_default"}
_EXT_INTERNAL = (7, 9)  # system.data (inline data), the encryption context
_EXT_ACL_VERSION = 1

_VFS_ACL_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAGS = (_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER)
_WITH_ID = (_USER, _GROUP)

_XFS_PREFIX = {"user.": b"user.", "trusted.": b"trusted.", "secure.": b"security."}
_XFS_ACL = {
    "trusted.SGI_ACL_FILE": b"system.posix_acl_access",
    "trusted.SGI_ACL_DEFAULT": b"system.posix_acl_default",
}


class Collected:
    """The attributes of one inode as they are found, within the limits, and what was wrong."""

    def __init__(self) -> None:
        self.found: Xattrs = []
        self.problems: list[str] = []
        self._names: set[bytes] = set()
        self._name_bytes = 0
        self._total = 0

    def add(self, name: bytes, value: bytes) -> None:
        if name in self._names:
            return  # ext: the inode's copy wins over the block's, as in Linux
        if len(value) > MAX_VALUE:
            self.problems.append(f"{_shown(name)}: a value of {len(value)} bytes (at most 64 KiB)")
            return
        self._name_bytes += len(name) + 1
        self._total += len(name) + len(value)
        if self._name_bytes > MAX_NAMES or self._total > MAX_TOTAL:
            self.problems.append(f"{_shown(name)}: more extended attributes than Linux can list")
            return
        self._names.add(name)
        self.found.append((name, value))


def ext_xattrs(
    number: int,
    inode: bytes,
    read: Callable[[int, int], bytes],
    block_size: int,
    volume_size: int,
    read_inode: Callable[[int, int], bytes],
) -> Collected:
    """The attributes of ext inode ``number`` whose on-disk record is ``inode``; ``read`` reads
    the volume, ``read_inode(number, size)`` an ``ea_inode``'s data."""
    out = Collected()
    if len(inode) > 128 + 2:
        (extra,) = struct.unpack_from("<H", inode, 128)
        start = 128 + extra
        if extra % 4 or start + 4 > len(inode):
            if extra:
                out.problems.append(f"inode {number}: i_extra_isize {extra} is not valid")
        elif struct.unpack_from("<I", inode, start)[0] == _EXT_MAGIC:
            area = inode[start + 4 :]
            _ext_entries(area, 0, 0, f"inode {number}", out, read_inode)
    if len(inode) >= 120:
        (low,) = struct.unpack_from("<I", inode, 104)
        (high,) = struct.unpack_from("<H", inode, 118)
        block = low | high << 32
        if block:
            _ext_block(number, block, read, block_size, volume_size, out, read_inode)
    return out


def _ext_block(
    number: int,
    block: int,
    read: Callable[[int, int], bytes],
    block_size: int,
    volume_size: int,
    out: Collected,
    read_inode: Callable[[int, int], bytes],
) -> None:
    where = f"inode {number}: xattr block {block}"
    if (block + 1) * block_size > volume_size:
        out.problems.append(f"{where} lies outside the volume")
        return
    data = read(block * block_size, block_size)
    if len(data) != block_size or struct.unpack_from("<I", data, 0)[0] != _EXT_MAGIC:
        out.problems.append(f"{where} has no xattr magic")
        return
    if struct.unpack_from("<I", data, 8)[0] != 1:
        out.problems.append(f"{where} spans more than one block")
        return
    _ext_entries(data, _EXT_BLOCK_HEADER, 0, where, out, read_inode)


def _ext_entries(
    area: bytes,
    first: int,
    base: int,
    where: str,
    out: Collected,
    read_inode: Callable[[int, int], bytes],
) -> None:
    """The entries from ``area[first:]`` up to the 4 zero bytes that end them; value offsets
    count from ``area[base:]``."""
    at = first
    while True:
        if at + 4 > len(area):
            out.problems.append(f"{where}: the attribute table runs past its end")
            return
        if struct.unpack_from("<I", area, at)[0] == 0:
            return
        if at + _EXT_ENTRY > len(area):
            out.problems.append(f"{where}: an attribute entry runs past its end")
            return
        name_len, index, offs, inum, size = struct.unpack_from("<BBHII", area, at)
        raw = area[at + _EXT_ENTRY : at + _EXT_ENTRY + name_len]
        if len(raw) != name_len:
            out.problems.append(f"{where}: an attribute name runs past its end")
            return
        at += (_EXT_ENTRY + name_len + 3) & ~3
        name = _ext_name(index, raw)
        if name is None:
            if index not in _EXT_INTERNAL:
                out.problems.append(f"{where}: attribute {_shown(raw)} of namespace {index}")
            continue
        if size > MAX_VALUE:
            out.problems.append(f"{_shown(name)}: a value of {size} bytes (at most 64 KiB)")
            continue
        if inum:
            try:
                value = read_inode(inum, size)
            except (ValueError, OSError) as err:
                out.problems.append(f"{where}: the value of {_shown(name)}: {err}")
                continue
        elif base + offs + size <= len(area):
            value = area[base + offs : base + offs + size]
        else:
            out.problems.append(f"{where}: the value of {_shown(name)} lies outside it")
            continue
        if len(value) != size:
            out.problems.append(f"{where}: the value of {_shown(name)} is cut short")
            continue
        if index in _EXT_ACL:
            try:
                value = ext_acl(value)
            except ValueError as err:
                out.problems.append(f"{where}: {_shown(name)}: {err}")
                continue
        out.add(name, value)


def _ext_name(index: int, raw: bytes) -> bytes | None:
    if index in _EXT_ACL:
        return _EXT_ACL[index] if not raw else None
    prefix = _EXT_PREFIX.get(index)
    return None if prefix is None or not raw else prefix + raw


def ext_acl(value: bytes) -> bytes:
    """ext's compact ACL (version 1; 4-byte entries, 8 for a named user or group) in the VFS
    format."""
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != _EXT_ACL_VERSION:
        raise ValueError("not an ext ACL (version 1)")
    entries: list[tuple[int, int, int]] = []
    at = 4
    while at < len(value):
        if at + 4 > len(value):
            raise ValueError("an ACL entry runs past its end")
        tag, perm = struct.unpack_from("<HH", value, at)
        ident = _UNDEFINED_ID
        if tag in _WITH_ID:
            if at + 8 > len(value):
                raise ValueError("an ACL entry runs past its end")
            (ident,) = struct.unpack_from("<I", value, at + 4)
            at += 8
        else:
            at += 4
        entries.append((tag, perm, ident))
    return _vfs_acl(entries)


def xfs_name(name: str) -> bytes | None:
    """The Linux name of an attribute as libfsxfs names it (None: not one Linux sets)."""
    if name in _XFS_ACL:
        return _XFS_ACL[name]
    for prefix, linux in _XFS_PREFIX.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return linux + name[len(prefix) :].encode("utf-8", "surrogateescape")
    return None


def xfs_acl(value: bytes) -> bytes:
    """XFS's ACL (big-endian count, then tag, id, perm, pad) in the VFS format."""
    if len(value) < 4:
        raise ValueError("an XFS ACL shorter than its header")
    (count,) = struct.unpack_from(">I", value, 0)
    if len(value) != 4 + 12 * count:
        raise ValueError(f"an XFS ACL of {len(value)} bytes for {count} entries")
    entries = []
    for i in range(count):
        tag, ident, perm, _ = struct.unpack_from(">IIHH", value, 4 + 12 * i)
        entries.append((tag, perm, ident if tag in _WITH_ID else _UNDEFINED_ID))
    return _vfs_acl(entries)


def _vfs_acl(entries: list[tuple[int, int, int]]) -> bytes:
    out = [struct.pack("<I", _VFS_ACL_VERSION)]
    for tag, perm, ident in entries:
        if tag not in _TAGS or perm > 7:
            raise ValueError(f"an ACL entry of tag {tag:#x}, permissions {perm:#o}")
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def _shown(name: bytes) -> str:
    text = name[:80].decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
