"""Device numbers (major, minor) of character and block device files, as Linux's ``mknod``
takes them: a 12-bit major and a 20-bit minor (``os.makedev``).

ext2/3/4 (``ext_device``) keep the number in the inode's ``i_block`` area: the old encoding in
``i_block[0]`` (``major << 8 | minor``, both below 256) when it is not zero, else the new one in
``i_block[1]`` (minor's low byte, major's 12 bits, minor's high 12 bits). XFS's number is
libfsxfs's (``yal``). NTFS, FAT and exFAT keep none comb restores.

``ext_device`` and ``checked`` run inside the worker (the bytes are the guest's); ``answer``
checks the worker's answer in the parent (``view.PointFiles.device``). Every field is checked:
a damaged record is one line (ValueError in the worker, ``FileSystemError`` in the parent).

Owns the on-disk form of ext's device numbers and the range a restored one may have. Must not:
import a parsing library, read a disk itself, or touch a file of the host.
"""

from __future__ import annotations

import stat
import struct
from typing import Any

from catalog.errors import FileSystemError

MAJOR_MAX, MINOR_MAX = 0xFFF, 0xFFFFF  # what the kernel's dev_t holds (new_encode_dev)
_EXT_RECORD_MIN = 100  # i_mode .. i_block's end
_EXT_FLAGS_OF_DATA = 0x80000 | 0x10000000  # EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL


def checked(inode: int, major: int, minor: int) -> tuple[int, int]:
    """(major, minor) when Linux's mknod can make it, else ValueError."""
    if not (0 <= major <= MAJOR_MAX and 0 <= minor <= MINOR_MAX):
        raise ValueError(
            f"inode {inode}: device number {major}:{minor} is beyond what Linux can make "
            f"(major up to {MAJOR_MAX}, minor up to {MINOR_MAX}; damaged?)"
        )
    return major, minor


def ext_device(inode: int, raw: bytes) -> tuple[int, int]:
    """The device number of ext inode ``inode`` from its raw record ``raw``."""
    if len(raw) < _EXT_RECORD_MIN:
        raise ValueError(f"inode {inode}: its record is cut short")
    (mode,) = struct.unpack_from("<H", raw, 0)
    if stat.S_IFMT(mode) not in (stat.S_IFCHR, stat.S_IFBLK):
        raise ValueError(f"inode {inode}: its record is not a device's (mode {mode:o})")
    (flags,) = struct.unpack_from("<I", raw, 32)
    if flags & _EXT_FLAGS_OF_DATA:
        raise ValueError(
            f"inode {inode}: a device whose flags say it holds data ({flags:#x}; damaged)"
        )
    old, new = struct.unpack_from("<2I", raw, 40)
    if old:
        if old > 0xFFFF:
            raise ValueError(f"inode {inode}: its device number {old:#x} is not valid (damaged)")
        return checked(inode, old >> 8, old & 0xFF)
    return checked(inode, (new >> 8) & 0xFFF, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def answer(ok: Any, what: str) -> tuple[int, int]:
    """The worker's ``device`` answer ({major, minor}) checked; ``what`` names the volume."""
    major = ok.get("major") if isinstance(ok, dict) else None
    minor = ok.get("minor") if isinstance(ok, dict) else None
    if type(major) is not int or type(minor) is not int:
        raise FileSystemError(f"{what}: the filesystem reader's device number is not valid")
    if not (0 <= major <= MAJOR_MAX and 0 <= minor <= MINOR_MAX):
        raise FileSystemError(f"{what}: device number {major}:{minor} is out of range")
    return major, minor
