"""VHD export, fixed and dynamic, generated on the fly from a block source.

Owns the VHD layout ("Virtual Hard Disk Image Format Specification", Microsoft, 2006): the
512-byte footer, the dynamic disk header, the block allocation table (BAT) and the per-block
sector bitmaps. It computes only that metadata up front (from the disk's size and extents) and
places the disk's data as ``FromSource`` segments; it must never read or copy the disk itself.

Decisions a reader of the output should know:

- **Size.** ``current_size`` is the disk's size rounded up to a whole 512-byte sector, because a
  VHD is addressed in sectors: qemu takes ``current_size // 512`` sectors (checked with qemu
  7.2), so an exact byte size that is not a sector multiple would silently lose the disk's last
  partial sector. Rounding up instead appends at most 511 zero bytes, which ``qemu-img
  compare`` accepts; for such disks the exported virtual size is ``size`` rounded up to 512,
  not ``size`` (an exact size is impossible in VHD).
- **Creator application ``"win "``** (the id Windows' own VHD tooling writes). qemu derives the
  size from the CHS geometry unless the creator is one it trusts for ``current_size`` ("win ",
  "d2v ", "qem2", "tap", "CTXS") or the geometry is the maximum. The spec's CHS is rounded down,
  so under comb's own id qemu (and libvirt, virt-v2v... through it) would see a disk up to ~2 MB
  short (8704 bytes for the 33 MiB test disk). The geometry itself is still the spec's, for
  BIOSes and ATA emulations that use it.
- **Time stamp.** The creation time of the image (when it is built), unless the caller passes
  ``created_s``; the unique id is random unless passed. Both are fixed for one ``VirtualImage``,
  so every read of it agrees.
- **Dynamic layout.** Footer copy, header, BAT, then the allocated blocks in disk order (only
  blocks that overlap an extent), then the footer. Each block's data starts 4 KiB-aligned in the
  file, so the parts of a block outside the extents (left out, read as zeros) stay filesystem
  holes. Sector bitmaps are all ones: the spec only requires zero-bit sectors to hold zeros, and
  all-ones is what qemu writes, correct whatever bit order a reader assumes.
"""

from __future__ import annotations

import struct
import time
import uuid

from catalog.errors import OutputError, UsageError
from catalog.read.source import MappedSource
from drive.formats.image import FromSource, Literal, Segment, VirtualImage

SECTOR_BYTES = 512
FOOTER_BYTES = 512
DYNAMIC_HEADER_BYTES = 1024
DEFAULT_BLOCK_BYTES = 2 << 20  # the spec's default, and what Hyper-V and qemu write
MAX_BLOCK_BYTES = 1 << 31  # block size is a uint32 field
# qemu's and Hyper-V's limit (VHD_MAX_SECTORS): BAT entries are 32-bit sector offsets.
MAX_DISK_BYTES = 2040 << 30
# Block data starts on this boundary in the file so filesystem holes line up with disk gaps.
DATA_ALIGN_BYTES = 4096
VHD_EPOCH_UNIX_S = 946_684_800  # 2000-01-01T00:00:00Z, the spec's time stamp origin
UNALLOCATED = 0xFFFFFFFF  # a BAT entry for a block with no data
NO_NEXT_STRUCTURE = 0xFFFF_FFFF_FFFF_FFFF  # data offset of a fixed disk / in the dynamic header

COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
FEATURES_RESERVED = 0x00000002  # "must always be set"
FORMAT_VERSION = 0x00010000
CREATOR_APPLICATION = b"win "
CREATOR_VERSION = 0x000A0000  # informational only (10.0)
CREATOR_HOST_OS = b"Wi2k"
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3

# Big-endian like every VHD field: cookie, features, version, data offset, time stamp, creator
# application, version, host OS, original size, current size, geometry, disk type, checksum,
# unique id, saved state, 427 reserved bytes.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sB427x")
# Cookie, data offset, table offset, header version, max table entries, block size, checksum;
# the parent fields, locators and reserved bytes that follow are zeros for a dynamic disk.
_DYNAMIC_HEADER = struct.Struct(">8sQQIIII")
_CHECKSUM_AT = {FOOTER_BYTES: 64, DYNAMIC_HEADER_BYTES: 36}
assert _FOOTER.size == FOOTER_BYTES


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) per the spec's appendix "CHS Calculation"; the
    product is at most ``total_sectors`` (rounded down, capped at 65535 x 16 x 255)."""
    total = min(total_sectors, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cyl_times_heads = total // per_track
    else:
        per_track = 17
        cyl_times_heads = total // per_track
        heads = max(4, (cyl_times_heads + 1023) // 1024)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cyl_times_heads = total // per_track
        if cyl_times_heads >= heads * 1024:
            per_track, heads = 63, 16
            cyl_times_heads = total // per_track
    return cyl_times_heads // heads, heads, per_track


def _checksum(data: bytes) -> int:
    """The spec's checksum: one's complement of the byte sum, the checksum field zeroed."""
    at = _CHECKSUM_AT[len(data)]
    return ~sum(data[:at] + data[at + 4 :]) & 0xFFFFFFFF


def _with_checksum(data: bytes) -> bytes:
    at = _CHECKSUM_AT[len(data)]
    return data[:at] + struct.pack(">I", _checksum(data)) + data[at + 4 :]


def _disk_bytes(source: MappedSource) -> int:
    """The VHD's current size: the disk rounded up to a sector (see the module docstring)."""
    disk_bytes = _round_up(source.size, SECTOR_BYTES)
    if disk_bytes > MAX_DISK_BYTES:
        raise OutputError(
            f"a {source.size}-byte disk is larger than VHD allows ({MAX_DISK_BYTES} bytes)"
        )
    return disk_bytes


def _footer(
    disk_bytes: int, disk_type: int, data_offset: int, created_s: float | None, unique_id: bytes
) -> bytes:
    created = time.time() if created_s is None else created_s
    stamp = min(max(0, int(created) - VHD_EPOCH_UNIX_S), 0xFFFFFFFF)
    cylinders, heads, per_track = chs_geometry(disk_bytes // SECTOR_BYTES)
    geometry = cylinders << 16 | heads << 8 | per_track
    # Original size equals current size: the image is created at the disk's size.
    raw = _FOOTER.pack(
        COOKIE,
        FEATURES_RESERVED,
        FORMAT_VERSION,
        data_offset,
        stamp,
        CREATOR_APPLICATION,
        CREATOR_VERSION,
        CREATOR_HOST_OS,
        disk_bytes,
        disk_bytes,
        geometry,
        disk_type,
        0,
        unique_id,
        0,
    )
    return _with_checksum(raw)


def _unique_id(unique_id: uuid.UUID | None) -> bytes:
    return (unique_id or uuid.uuid4()).bytes


def vhd_fixed_image(
    source: MappedSource, *, created_s: float | None = None, unique_id: uuid.UUID | None = None
) -> VirtualImage:
    """A fixed VHD: the disk's data in place (holes kept), zeros up to a whole sector, then the
    512-byte footer. ``created_s`` (Unix seconds) defaults to now, ``unique_id`` to random."""
    disk_bytes = _disk_bytes(source)
    segs: list[Segment] = [FromSource(o, n, o) for o, n in source.extents()]
    footer = _footer(
        disk_bytes, DISK_TYPE_FIXED, NO_NEXT_STRUCTURE, created_s, _unique_id(unique_id)
    )
    segs.append(Literal(disk_bytes, footer))
    return VirtualImage(disk_bytes + FOOTER_BYTES, segs, source)


def _block_pieces(
    extents: list[tuple[int, int]], block_bytes: int
) -> dict[int, list[tuple[int, int]]]:
    """Block index -> the (disk offset, length) runs of the extents inside it, in disk order."""
    blocks: dict[int, list[tuple[int, int]]] = {}
    for offset, length in extents:
        end = offset + length
        while offset < end:
            index = offset // block_bytes
            cut = min(end, (index + 1) * block_bytes)
            blocks.setdefault(index, []).append((offset, cut - offset))
            offset = cut
    return blocks


def _check_block_bytes(block_bytes: int) -> None:
    if not SECTOR_BYTES <= block_bytes <= MAX_BLOCK_BYTES or block_bytes & (block_bytes - 1):
        raise UsageError(
            f"VHD block size {block_bytes} is not a power of two"
            f" between {SECTOR_BYTES} and {MAX_BLOCK_BYTES} bytes"
        )


def _dynamic_header(bat_offset: int, entries: int, block_bytes: int) -> bytes:
    head = _DYNAMIC_HEADER.pack(
        DYNAMIC_COOKIE, NO_NEXT_STRUCTURE, bat_offset, FORMAT_VERSION, entries, block_bytes, 0
    )
    return _with_checksum(head + bytes(DYNAMIC_HEADER_BYTES - len(head)))


def vhd_dynamic_image(
    source: MappedSource,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    *,
    created_s: float | None = None,
    unique_id: uuid.UUID | None = None,
) -> VirtualImage:
    """A dynamic (sparse) VHD: only blocks overlapping ``source.extents()`` are allocated, each
    holding just the extents' data (the rest of the block reads as zeros)."""
    _check_block_bytes(block_bytes)
    disk_bytes = _disk_bytes(source)
    entries = -(-disk_bytes // block_bytes)
    bat_offset = FOOTER_BYTES + DYNAMIC_HEADER_BYTES
    bat_end = bat_offset + _round_up(4 * entries, SECTOR_BYTES)
    bitmap_bytes = _round_up(block_bytes // SECTOR_BYTES // 8, SECTOR_BYTES)
    bitmap = b"\xff" * bitmap_bytes  # shared by every block
    stride = _round_up(bitmap_bytes + block_bytes, DATA_ALIGN_BYTES)
    data_at = _round_up(bat_end + bitmap_bytes, DATA_ALIGN_BYTES)

    bat = [UNALLOCATED] * entries
    segs: list[Segment] = []
    for index, pieces in _block_pieces(source.extents(), block_bytes).items():
        bat[index] = (data_at - bitmap_bytes) // SECTOR_BYTES
        segs.append(Literal(data_at - bitmap_bytes, bitmap))
        base = index * block_bytes
        segs.extend(FromSource(data_at + o - base, n, o) for o, n in pieces)
        data_at += stride
    footer_at = data_at - stride + block_bytes if segs else bat_end
    if footer_at // SECTOR_BYTES >= UNALLOCATED:
        raise OutputError(f"a dynamic VHD of this disk would pass 2 TiB ({footer_at} bytes)")

    footer = _footer(disk_bytes, DISK_TYPE_DYNAMIC, FOOTER_BYTES, created_s, _unique_id(unique_id))
    table = struct.pack(f">{entries}I", *bat)
    table += b"\xff" * (bat_end - bat_offset - len(table))  # the BAT fills its last sector
    segs += [
        Literal(0, footer),
        Literal(FOOTER_BYTES, _dynamic_header(bat_offset, entries, block_bytes)),
        Literal(bat_offset, table),
        Literal(footer_at, footer),
    ]
    return VirtualImage(footer_at + FOOTER_BYTES, segs, source)
