"""VHDX export generated on the fly: a dynamic [MS-VHDX] v1 file as a ``VirtualImage``.

Owns the VHDX layout and its checksums (CRC-32C): the file type identifier, both headers, both
region tables, the metadata region, the block allocation table (BAT) and where each payload
block lands. Payload blocks exist only for blocks that overlap the disk's extents, and inside a
block only the extents' bytes are segments: the rest of the block reads as zeros from the gap,
so the exported file stays as sparse as the disk. Must not read the disk's data (only its
extents), write a log (the log GUID is zero: nothing to replay), or make differencing disks.

File layout (offsets in the file; every region and payload block 1 MiB aligned, as the
specification requires of the log, the regions and the BAT's file offsets)::

    0        file type identifier   "vhdxfile" + creator           (64 KiB slot)
    64 KiB   header 1               sequence 1, CRC-32C over 4 KiB (64 KiB slot)
    128 KiB  header 2               sequence 2 (the current one)   (64 KiB slot)
    192 KiB  region table 1         BAT + metadata, CRC-32C over 64 KiB
    256 KiB  region table 2         identical copy
    1 MiB    log                    1 MiB, all zeros, never replayed (LogGuid zero)
    2 MiB    metadata region        1 MiB: table at 0, items from 64 KiB
    3 MiB    BAT region             entries rounded up to 1 MiB
    ...      payload blocks         the present blocks in disk order, ``block_bytes`` each

The virtual disk size is ``source.size`` rounded up to the 512-byte logical sector, since
[MS-VHDX] requires a whole number of logical sectors: a disk whose size is not a multiple of
512 gains up to 511 zero bytes at its end (the only way VHDX can hold it). A 0-byte disk is
refused: readers (qemu, dissect.hypervisor) reject a VHDX of size zero.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from catalog.errors import OutputError, UsageError
from catalog.read.source import MappedSource
from drive.formats.image import FromSource, Literal, Segment, VirtualImage

KIB_BYTES = 1 << 10
MIB_BYTES = 1 << 20
DEFAULT_BLOCK_BYTES = 32 * MIB_BYTES  # what Hyper-V uses for dynamic disks
MIN_BLOCK_BYTES = 1 * MIB_BYTES
MAX_BLOCK_BYTES = 256 * MIB_BYTES
MAX_DISK_BYTES = 64 << 40  # the specification's limit on VirtualDiskSize
LOGICAL_SECTOR_BYTES = 512
# We do not know the source's physical sector size; claiming the logical one promises the guest
# no alignment that the original disk may not have had.
PHYSICAL_SECTOR_BYTES = 512
# One sector bitmap block (1 MiB) describes 2^23 sectors: that span is a "chunk".
SECTORS_PER_CHUNK = 1 << 23
BAT_ENTRY_BYTES = 8

FILE_ID_OFFSET_BYTES = 0
HEADER_OFFSETS_BYTES = (64 * KIB_BYTES, 128 * KIB_BYTES)
REGION_TABLE_OFFSETS_BYTES = (192 * KIB_BYTES, 256 * KIB_BYTES)
HEADER_STRUCT_BYTES = 4 * KIB_BYTES
REGION_TABLE_BYTES = 64 * KIB_BYTES
METADATA_TABLE_BYTES = 64 * KIB_BYTES
LOG_OFFSET_BYTES = 1 * MIB_BYTES
LOG_LENGTH_BYTES = 1 * MIB_BYTES
METADATA_OFFSET_BYTES = 2 * MIB_BYTES
METADATA_LENGTH_BYTES = 1 * MIB_BYTES
BAT_OFFSET_BYTES = 3 * MIB_BYTES

# BAT entry states (low 3 bits of an entry; the file offset in MiB is bits 20-63).
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_FULLY_PRESENT = 6
SB_BLOCK_NOT_PRESENT = 0

BAT_REGION_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
# The "Page 83 Data" item of the specification's table is the Virtual Disk ID (one GUID).
PAGE_83_DATA_GUID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")

_CREATOR = "comb"
_META_IS_VIRTUAL_DISK = 1 << 1
_META_IS_REQUIRED = 1 << 2
_REGION_REQUIRED = 1


def _crc32c_table() -> tuple[int, ...]:
    reflected_poly = 0x82F63B78  # Castagnoli 0x1EDC6F41, bit-reversed
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (reflected_poly if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """CRC-32C (Castagnoli) as [MS-VHDX] uses it. Plain Python, one table lookup a byte: it
    only ever covers two 4 KiB headers and one 64 KiB region table per export."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _with_checksum(structure: bytearray) -> bytes:
    """Store the CRC-32C of ``structure`` (computed with its checksum field, bytes 4-8, zero)."""
    structure[4:8] = bytes(4)
    structure[4:8] = struct.pack("<I", crc32c(structure))
    return bytes(structure)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(frozen=True)
class Geometry:
    """The numbers the whole layout follows from."""

    disk_bytes: int  # VirtualDiskSize: source.size rounded up to a logical sector
    block_bytes: int
    chunk_ratio: int  # payload blocks per sector bitmap block
    data_blocks: int
    bat_entries: int  # payload entries + the sector bitmap entries between whole chunks

    @property
    def bat_region_bytes(self) -> int:
        return _round_up(self.bat_entries * BAT_ENTRY_BYTES, MIB_BYTES)

    @property
    def data_offset_bytes(self) -> int:
        """Where the first payload block goes (after the BAT region)."""
        return BAT_OFFSET_BYTES + self.bat_region_bytes

    def bat_index(self, block: int) -> int:
        """The BAT entry of payload block ``block``: one sector bitmap entry follows every
        ``chunk_ratio`` payload entries, so each whole chunk before it shifts it by one."""
        return block + block // self.chunk_ratio


def geometry(size: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Geometry:
    """The VHDX geometry of a ``size``-byte disk; refuses what [MS-VHDX] cannot express."""
    if not (MIN_BLOCK_BYTES <= block_bytes <= MAX_BLOCK_BYTES) or block_bytes & (block_bytes - 1):
        raise UsageError(f"VHDX block size {block_bytes} is not a power of two in 1-256 MiB")
    disk_bytes = _round_up(size, LOGICAL_SECTOR_BYTES)
    if disk_bytes > MAX_DISK_BYTES:
        raise OutputError(f"a {size}-byte disk is larger than VHDX allows (64 TiB)")
    if disk_bytes == 0:
        # qemu and dissect.hypervisor both refuse to open a VHDX of size zero.
        raise OutputError("an empty (0-byte) disk cannot be exported as VHDX")
    chunk_ratio = SECTORS_PER_CHUNK * LOGICAL_SECTOR_BYTES // block_bytes
    data_blocks = -(-disk_bytes // block_bytes)
    # Dynamic disks: the bitmap entry of the last, possibly partial, chunk is not stored.
    entries = data_blocks + (data_blocks - 1) // chunk_ratio
    return Geometry(disk_bytes, block_bytes, chunk_ratio, data_blocks, entries)


def vhdx_image(
    source: MappedSource,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    *,
    disk_id: uuid.UUID | None = None,
) -> VirtualImage:
    """The disk as a dynamic VHDX: blocks holding extents are present, the others are
    PAYLOAD_BLOCK_ZERO (defined to read as zeros, unlike NOT_PRESENT which the specification
    leaves undefined on a dynamic disk). ``disk_id`` (the guest-visible Virtual Disk ID) is
    random unless given; given, the file is byte-for-byte reproducible (the write GUIDs derive
    from it), which re-mounting the same recovery point needs."""
    geo = geometry(source.size, block_bytes)
    if disk_id is None:
        disk_id = uuid.uuid4()
    extents = _clipped_extents(source)
    present = _present_blocks(extents, geo)
    where = {b: geo.data_offset_bytes + i * geo.block_bytes for i, b in enumerate(present)}
    segments: list[Segment] = [Literal(FILE_ID_OFFSET_BYTES, _file_identifier())]
    for seq, at in enumerate(HEADER_OFFSETS_BYTES, start=1):
        segments.append(Literal(at, _header(seq, disk_id)))
    table = _region_table(geo)
    segments += [Literal(at, table) for at in REGION_TABLE_OFFSETS_BYTES]
    segments.append(Literal(METADATA_OFFSET_BYTES, _metadata(geo, disk_id)))
    segments.append(Literal(BAT_OFFSET_BYTES, _bat(geo, where)))
    segments += _payload(extents, geo, where)
    size = geo.data_offset_bytes + len(present) * geo.block_bytes
    return VirtualImage(size, segments, source)


def _file_identifier() -> bytes:
    creator = _CREATOR.encode("utf-16-le")
    return b"vhdxfile" + creator + bytes(512 - len(creator))


def _header(sequence: int, disk_id: uuid.UUID) -> bytes:
    """One header. Both carry the same GUIDs; the higher sequence number makes header 2
    current, and header 1 stays valid so a reader checking either finds a good one."""
    head = struct.pack(
        "<4sIQ16s16s16sHHIQ",
        b"head",
        0,  # checksum, filled in below
        sequence,
        uuid.uuid5(disk_id, "comb:vhdx:file-write").bytes_le,
        uuid.uuid5(disk_id, "comb:vhdx:data-write").bytes_le,
        bytes(16),  # LogGuid zero: the log is empty, nothing to replay
        0,  # LogVersion
        1,  # Version
        LOG_LENGTH_BYTES,
        LOG_OFFSET_BYTES,
    )
    return _with_checksum(bytearray(head) + bytearray(HEADER_STRUCT_BYTES - len(head)))


def _region_table(geo: Geometry) -> bytes:
    regions = [
        (BAT_REGION_GUID, BAT_OFFSET_BYTES, geo.bat_region_bytes),
        (METADATA_REGION_GUID, METADATA_OFFSET_BYTES, METADATA_LENGTH_BYTES),
    ]
    table = bytearray(struct.pack("<4sIII", b"regi", 0, len(regions), 0))
    for guid, offset, length in regions:
        table += struct.pack("<16sQII", guid.bytes_le, offset, length, _REGION_REQUIRED)
    table += bytes(REGION_TABLE_BYTES - len(table))
    return _with_checksum(table)


def _metadata(geo: Geometry, disk_id: uuid.UUID) -> bytes:
    """The metadata table (64 KiB) followed by its items, packed from offset 64 KiB."""
    disk_item = _META_IS_VIRTUAL_DISK | _META_IS_REQUIRED
    items = [
        # BlockSize, then LeaveBlockAllocated = 0 and HasParent = 0: dynamic, no parent.
        (FILE_PARAMETERS_GUID, struct.pack("<II", geo.block_bytes, 0), _META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", geo.disk_bytes), disk_item),
        (PAGE_83_DATA_GUID, disk_id.bytes_le, disk_item),
        (LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", LOGICAL_SECTOR_BYTES), disk_item),
        (PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", PHYSICAL_SECTOR_BYTES), disk_item),
    ]
    table = bytearray(struct.pack("<8sHH20x", b"metadata", 0, len(items)))
    data = bytearray()
    for guid, value, flags in items:
        offset = METADATA_TABLE_BYTES + len(data)
        table += struct.pack("<16sIII4x", guid.bytes_le, offset, len(value), flags)
        data += value
    return bytes(table + bytes(METADATA_TABLE_BYTES - len(table)) + data)


def _bat(geo: Geometry, where: dict[int, int]) -> bytes:
    """Every payload entry ZERO or FULLY_PRESENT with its file offset (a whole MiB, so the
    offset in bytes is already the FileOffsetMB field in bits 20-63); every sector bitmap
    entry NOT_PRESENT, as a dynamic disk requires."""
    bat = bytearray(struct.pack("<Q", PAYLOAD_BLOCK_ZERO) * geo.bat_entries)
    stride = geo.chunk_ratio + 1
    for sb in range(geo.chunk_ratio, geo.bat_entries, stride):
        struct.pack_into("<Q", bat, sb * BAT_ENTRY_BYTES, SB_BLOCK_NOT_PRESENT)
    for block, offset in where.items():
        entry = offset | PAYLOAD_BLOCK_FULLY_PRESENT
        struct.pack_into("<Q", bat, geo.bat_index(block) * BAT_ENTRY_BYTES, entry)
    return bytes(bat)


def _present_blocks(extents: list[tuple[int, int]], geo: Geometry) -> list[int]:
    """The payload blocks overlapping the disk's extents, in disk order."""
    blocks: list[int] = []
    for offset, length in extents:
        first = offset // geo.block_bytes
        last = (offset + length - 1) // geo.block_bytes
        start = max(first, blocks[-1] + 1) if blocks else first
        blocks.extend(range(start, last + 1))
    return blocks


def _clipped_extents(source: MappedSource) -> list[tuple[int, int]]:
    """The extents inside the disk, empty ones dropped (a defensive no-op for a good source)."""
    out = []
    for offset, length in source.extents():
        length = min(offset + length, source.size) - offset
        if length > 0:
            out.append((offset, length))
    return out


def _payload(extents: list[tuple[int, int]], geo: Geometry, where: dict[int, int]) -> list[Segment]:
    """The extents' bytes at their place in their blocks; a run stays one segment across
    blocks that lie back to back in the file. What a present block holds beyond the extents
    (and beyond the disk's end) is gap: zeros, left as holes."""
    out: list[Segment] = []
    for offset, length in extents:
        pos, end = offset, offset + length
        while pos < end:
            block = pos // geo.block_bytes
            stop = min(end, (block + 1) * geo.block_bytes)
            at = where[block] + pos - block * geo.block_bytes
            last = out[-1] if out else None
            if (
                isinstance(last, FromSource)
                and last.offset + last.length == at
                and last.source_offset + last.length == pos
            ):
                out[-1] = FromSource(last.offset, last.length + stop - pos, last.source_offset)
            else:
                out.append(FromSource(at, stop - pos, pos))
            pos = stop
    return out
