"""The volumes of a disk image: its partition table (MBR with its extended chain, or GPT) and
what each volume holds, told by magic numbers (ext2/3/4, XFS, NTFS, FAT, exFAT, btrfs, and what
is not a readable filesystem: LUKS, BitLocker, LVM2, swap). An LVM2 physical volume is followed
by its logical volumes (``drive.files.lvm``), named ``lvm/VG/LV``.

Owns partition-table parsing and filesystem detection by signature. The bytes come from an
untrusted guest: every field is checked against the disk, every walk is capped, nothing is
sized by an on-disk count, and a malformed table is a one-line ``FileSystemError``. Partitions
reaching past the disk's end are clipped to it; partitions starting past it are left out.

Must not: read more than the few sectors it needs, parse a filesystem beyond its superblock or
boot sector, or import anything of comb but ``catalog`` (and ``lvm`` beside it).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, replace

from catalog.errors import FileSystemError
from catalog.read.source import BlockSource, read_bytes

SECTOR = 512
BOOT_SIGNATURE = b"\x55\xaa"
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
MBR_PROTECTIVE = 0xEE
MAX_LOGICALS = 128  # logical partitions numbered 5.. in an extended chain
MAX_EBRS = 256  # EBRs walked, empty links included
GPT_SIGNATURE = b"EFI PART"
MAX_GPT_ENTRIES = 4096  # the usual array holds 128
MAX_GPT_ENTRY_BYTES = 1024
HEAD_BYTES = 4096  # boot sector, ext superblock, LVM label and swap signature all lie in here
BTRFS_SUPER = 0x10000

# ext features (e2fsprogs lib/ext2fs/ext2_fs.h) that ext3 already has; any other is ext4's.
EXT_COMPAT_JOURNAL = 0x4
EXT_INCOMPAT_JOURNAL_DEV = 0x8  # an external journal, not a filesystem
EXT3_INCOMPAT = 0x2 | 0x4 | 0x10  # filetype, recover, meta_bg
EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir


@dataclass(frozen=True)
class Volume:
    """One volume of a disk: a partition, or the whole disk ("disk") when it has no table."""

    name: str  # "part1".. numbered as Linux does, or "disk"
    offset: int  # bytes on the disk
    size: int  # bytes (clipped to the disk's end)
    fstype: str | None  # "ext4", "xfs", "ntfs", "fat32", ...; None: no known filesystem
    label: str | None  # the filesystem's label when its superblock holds one
    note: str | None  # what it is when not a readable filesystem ("swap", "LUKS encrypted", ...)
    ptype: str | None  # MBR "0x83", GPT type GUID; None for "disk"


Detected = tuple[str | None, str | None, str | None]


def find_volumes(source: BlockSource) -> list[Volume]:
    """The volumes of ``source``: its partitions in number order (none if its table lists none
    within the disk), or the whole disk as "disk" when it has no partition table."""
    return _with_lvs(source, _volumes(source))


def _volumes(source: BlockSource) -> list[Volume]:
    head = _read(source, 0, SECTOR, source.size)
    if _sector0_filesystem(head) is None:
        table = _table(source, head)
        if table is not None:
            return table
    fstype, label, note = detect(source, 0, source.size)
    note = "unknown" if note == "empty" else note  # nothing found on the whole disk
    return [Volume("disk", 0, source.size, fstype, label, note, None)]


def _with_lvs(source: BlockSource, volumes: list[Volume]) -> list[Volume]:
    """Each LVM2 PV followed by its logical volumes (``lvm/VG/LV``, drive.files.lvm); an LV
    spanning PVs of this disk is listed once; the PV's note says why its LVs cannot be read."""
    from .lvm import logical_volumes  # lvm reads volumes through detect: imported when needed

    out: list[Volume] = []
    names = {v.name for v in volumes}
    for vol in volumes:
        if vol.note != "LVM2 physical volume":
            out.append(vol)
            continue
        lvs = logical_volumes(source, vol)
        if isinstance(lvs, str):
            out.append(replace(vol, note=f"LVM2 physical volume ({lvs})"))
            continue
        out.append(vol)
        for lv in lvs:
            if lv.name not in names:
                names.add(lv.name)
                out.append(lv)
    return out


def detect(source: BlockSource, offset: int, size: int) -> Detected:
    """(fstype, label, note) of the bytes at [offset, offset+size)."""
    end = max(offset, min(offset + size, source.size))
    head = _read(source, offset, HEAD_BYTES, end)
    found = _boot_sector(head, strict=False) or _ext(head) or _lvm_or_swap(head)
    if found is None and end - offset >= BTRFS_SUPER + 0x1000:
        found = _btrfs(_read(source, offset + BTRFS_SUPER, 0x22B, end))
    if found is not None:
        return found
    return (None, None, "unknown" if any(head) else "empty")


# --- partition tables -------------------------------------------------------------------------


def _table(source: BlockSource, head: bytes) -> list[Volume] | None:
    """The partitions, or None when sector 0 holds no partition table."""
    entries = _mbr_entries(head)
    if entries and any(e[1] == MBR_PROTECTIVE for e in entries):
        return _gpt(source)
    if entries:
        return _mbr(source, entries)
    if _read(source, SECTOR, 8, source.size) == GPT_SIGNATURE:
        return _gpt(source)  # a GPT without its protective MBR
    return None


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """(slot, type, start LBA, sectors) of the used entries; None if not a plausible MBR."""
    if sector[510:512] != BOOT_SIGNATURE:
        return None
    used = []
    for slot in range(1, 5):
        boot, kind, start, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * (slot - 1))
        if boot not in (0x00, 0x80):
            return None
        if kind == 0 or count == 0:
            continue
        if start == 0:
            return None
        used.append((slot, kind, start, count))
    return used


def _mbr(source: BlockSource, entries: list[tuple[int, int, int, int]]) -> list[Volume]:
    primaries: list[Volume] = []
    logicals: list[Volume] = []
    number = 5
    for slot, kind, start, count in entries:
        if kind in MBR_EXTENDED:
            more, number = _logicals(source, start, number)
            logicals += more
        elif vol := _volume(source, f"part{slot}", start * SECTOR, count * SECTOR, kind):
            primaries.append(vol)
    return primaries + logicals


def _logicals(source: BlockSource, ext_start: int, number: int) -> tuple[list[Volume], int]:
    """The logical partitions of the EBR chain of the extended partition at ``ext_start``,
    numbered from ``number`` on, and the next number."""
    found: list[Volume] = []
    seen: set[int] = set()
    ebr: int | None = ext_start
    for _ in range(MAX_EBRS):
        if ebr is None or ebr in seen or ebr * SECTOR >= source.size:
            break
        seen.add(ebr)
        sector = _read(source, ebr * SECTOR, SECTOR, source.size)
        if sector[510:512] != BOOT_SIGNATURE:
            break
        link: int | None = None
        for i in range(2):  # entry 0: the logical partition; entry 1: the next EBR
            kind, start, count = struct.unpack_from("<4xB3xII", sector, 446 + 16 * i)
            if kind == 0 or count == 0:
                continue
            if kind in MBR_EXTENDED:
                link = ext_start + start if link is None else link
                continue
            if number >= 5 + MAX_LOGICALS:
                return found, number
            vol = _volume(source, f"part{number}", (ebr + start) * SECTOR, count * SECTOR, kind)
            found += [vol] if vol else []
            number += 1
        ebr = link
    return found, number


class _Invalid(Exception):
    """A GPT header or its entry array does not check out (internal: becomes a FileSystemError)."""


def _gpt(source: BlockSource) -> list[Volume]:
    in_512 = _read(source, SECTOR, 8, source.size) == GPT_SIGNATURE
    sector = SECTOR if in_512 or _read(source, 4096, 8, source.size) != GPT_SIGNATURE else 4096
    array, esize, count = _gpt_checked(source, sector)
    volumes = []
    for i in range(count):
        entry = array[i * esize : i * esize + 128]
        if entry[:16] == bytes(16):
            continue
        first, final = struct.unpack_from("<QQ", entry, 32)
        if first > final:
            raise FileSystemError(f"GPT entry {i + 1}: first LBA {first} is after last LBA {final}")
        kind = str(uuid.UUID(bytes_le=entry[:16]))
        size = (final - first + 1) * sector
        if vol := _volume(source, f"part{i + 1}", first * sector, size, kind):
            volumes.append(vol)
    return volumes


def _gpt_checked(source: BlockSource, sector: int) -> tuple[bytes, int, int]:
    """The entry array of the primary GPT header, else of the backup (at the disk's last LBA,
    or where the primary says: a disk grown after partitioning keeps it there)."""
    last = source.size // sector - 1
    try:
        return _gpt_array(source, 1, sector)
    except _Invalid as err:
        primary = str(err)
    alternate = struct.unpack_from("<Q", _read(source, sector + 32, 8, source.size))[0]
    backup = "no backup header"
    for lba in dict.fromkeys([last, alternate]):
        if lba == 1 or lba > last:
            continue
        try:
            return _gpt_array(source, lba, sector)
        except _Invalid as err:
            backup = f"backup header (LBA {lba}): {err}" if lba == last else backup
    raise FileSystemError(f"GPT: primary header (LBA 1): {primary}; {backup}")


def _gpt_array(source: BlockSource, lba: int, sector: int) -> tuple[bytes, int, int]:
    """(entry array, entry size, entry count) of the GPT header at ``lba``, checked."""
    if lba < 1:
        raise _Invalid("the disk is too small")
    header = _read(source, lba * sector, sector, source.size)
    if header[:8] != GPT_SIGNATURE:
        raise _Invalid("no GPT signature")
    header_size, header_crc = struct.unpack_from("<II", header, 12)
    if not 92 <= header_size <= sector:
        raise _Invalid(f"bad header size {header_size}")
    if zlib.crc32(header[:16] + bytes(4) + header[20:header_size]) != header_crc:
        raise _Invalid("header CRC mismatch")
    my_lba, entries_lba, count, esize, array_crc = struct.unpack_from("<Q40xQIII", header, 24)
    if my_lba != lba:
        raise _Invalid(f"header says it is at LBA {my_lba}")
    if esize < 128 or esize % 8 or esize > MAX_GPT_ENTRY_BYTES:
        raise _Invalid(f"bad partition entry size {esize}")
    if count > MAX_GPT_ENTRIES:
        raise _Invalid(f"{count} partition entries (at most {MAX_GPT_ENTRIES})")
    if entries_lba < 1 or entries_lba * sector + count * esize > source.size:
        raise _Invalid(f"partition entries at LBA {entries_lba} reach past the disk's end")
    array = read_bytes(source, entries_lba * sector, count * esize)
    if zlib.crc32(array) != array_crc:
        raise _Invalid("partition entry array CRC mismatch")
    return array, esize, count


def _volume(
    source: BlockSource, name: str, offset: int, size: int, kind: int | str
) -> Volume | None:
    """The volume of a partition, clipped to the disk; None if it starts past the disk's end."""
    if offset >= source.size:
        return None
    size = min(size, source.size - offset)
    fstype, label, note = detect(source, offset, size)
    ptype = f"0x{kind:02x}" if isinstance(kind, int) else kind
    return Volume(name, offset, size, fstype, label, note, ptype)


# --- filesystem signatures --------------------------------------------------------------------


def _sector0_filesystem(head: bytes) -> Detected | None:
    """A filesystem that sector 0 identifies beyond doubt (a FAT boot sector also ends in 55AA,
    and its boot code may pass for partition entries, so it wins over a table)."""
    return _boot_sector(head, strict=True)


def _boot_sector(head: bytes, strict: bool) -> Detected | None:
    if head[:6] == b"LUKS\xba\xbe":
        return (None, None, "LUKS encrypted")
    if head[:4] == b"XFSB":
        return ("xfs", _label(head[108:120]), None)
    oem = head[3:11]
    if oem == b"-FVE-FS-":
        return (None, None, "BitLocker encrypted")
    if oem == b"NTFS    ":
        return ("ntfs", None, None)
    if oem == b"EXFAT   ":
        return ("exfat", None, None)
    return _fat(head, strict)


def _fat(head: bytes, strict: bool) -> Detected | None:
    """FAT12/16/32 by its BPB; ``strict``: only with its type string (for sector 0 of a disk)."""
    if head[510:512] != BOOT_SIGNATURE or head[0] not in (0xEB, 0xE9):
        return None
    bps, spc, reserved, fats, roots, total16, media, fat16 = struct.unpack_from(
        "<HBHBHHBH", head, 11
    )
    total32, fat32 = struct.unpack_from("<II", head, 32)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        return None
    if reserved == 0 or fats not in (1, 2) or not (media == 0xF0 or media >= 0xF8):
        return None
    if head[82:90] == b"FAT32   ":
        return ("fat32", _fat_label(head, 66), None)
    if head[54:62] in (b"FAT12   ", b"FAT16   "):
        return (head[54:59].decode().lower(), _fat_label(head, 38), None)
    if strict:
        return None
    sectors = total16 or total32
    fat_sectors = fat16 or fat32
    data = sectors - reserved - fats * fat_sectors - (roots * 32 + bps - 1) // bps
    if fat_sectors == 0 or data <= 0:
        return None
    clusters = data // spc
    kind = "fat12" if clusters < 4085 else "fat16" if clusters < 65525 else "fat32"
    return (kind, _fat_label(head, 66 if kind == "fat32" else 38), None)


def _fat_label(head: bytes, ext_sig: int) -> str | None:
    """The BPB volume label, after the extended boot signature (0x29) at ``ext_sig``."""
    if head[ext_sig] != 0x29:
        return None
    raw = head[ext_sig + 5 : ext_sig + 16]
    return None if raw == b"NO NAME    " else _label(raw)


def _ext(head: bytes) -> Detected | None:
    sb = head[1024:2048]
    if sb[56:58] != b"\x53\xef":
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    if incompat & EXT_INCOMPAT_JOURNAL_DEV:
        return (None, None, "ext journal device")
    if incompat & ~EXT3_INCOMPAT or ro_compat & ~EXT3_RO_COMPAT:
        kind = "ext4"
    else:
        kind = "ext3" if compat & EXT_COMPAT_JOURNAL else "ext2"
    return (kind, _label(sb[120:136]), None)


def _lvm_or_swap(head: bytes) -> Detected | None:
    for k in range(4):
        if head[512 * k : 512 * k + 8] == b"LABELONE" and head[512 * k + 24 : 512 * k + 32] == (
            b"LVM2 001"
        ):
            return (None, None, "LVM2 physical volume")
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return (None, None, "swap")
    return None


def _btrfs(sb: bytes) -> Detected | None:
    if sb[0x40:0x48] != b"_BHRfS_M":
        return None
    return ("btrfs", _label(sb[0x12B:0x22B]), None)


def _label(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip(" \0")
    return text or None


def _read(source: BlockSource, offset: int, length: int, end: int) -> bytes:
    """Bytes [offset, offset+length) clipped to ``end`` (and the disk), zero-padded to length."""
    data = read_bytes(source, offset, max(0, min(length, end - offset)))
    return data + bytes(length - len(data))
