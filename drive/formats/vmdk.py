"""VMDK export generated on the fly: monolithicSparse and streamOptimized disks.

Owns the layout of VMware's hosted sparse extent ("Virtual Disk Format 5.0") as a
``VirtualImage``: the ``KDMV`` header, the embedded text descriptor, grain directories and grain
tables, and the grains. It must not know about packs or manifests, and a monolithicSparse image
must not read the disk's data before its grains are read.

monolithicSparse (``vmdk_image``), in 512-byte sectors::

    0                 header (SparseExtentHeader, 512 bytes)
    1                 embedded descriptor (DESCRIPTOR_SECTORS, NUL-padded)
    rgd               redundant grain directory, then its grain tables (4 sectors each)
    gd                grain directory, then its grain tables
    overhead          (rounded up to a grain) the grains, in disk order

Every grain overlapping ``source.extents()`` is allocated, so consecutive grains form one
``FromSource`` segment; the metadata is ``Literal`` bytes computed up front. Grain tables are
preallocated for the whole capacity, as VMware and qemu-img do, so the file stays writable by
both (qemu cannot allocate a missing table); a table with no grain is all zeros, so a hole.

streamOptimized (``vmdk_stream_image``): the header says the directory is at the end
(``gdOffset`` = GD_AT_END); after the descriptor come the non-zero grains, each a grain marker
(disk sector, compressed length) and a zlib stream (RFC 1950, not raw deflate) padded to a
sector; then each used grain table behind a metadata marker, the directory behind its marker,
a footer (the header with the real ``gdOffset``) behind its marker, and an end-of-stream marker.
The layout needs every compressed length, so building the image reads and compresses all the
disk's data once; reads compress each grain again (see ``CompressedGrains``).

Sizes that are not a multiple of 512: the capacity counts whole sectors, so it is the disk size
rounded up to 512 and the padding reads as zeros; readers see a disk up to 511 bytes longer.
"""

from __future__ import annotations

import bisect
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from catalog.errors import OutputError, SourceError
from catalog.read.source import MappedSource, read_bytes
from drive.formats.image import FromSource, Literal, Segment, VirtualImage

SECTOR_BYTES = 512
GRAIN_SECTORS = 128  # 64 KiB grains: VMware's default, and qemu-img's
GRAIN_BYTES = GRAIN_SECTORS * SECTOR_BYTES
GTES_PER_GT = 512  # the only value the spec (and qemu) accept
GT_SECTORS = GTES_PER_GT * 4 // SECTOR_BYTES
DESCRIPTOR_OFFSET_SECTORS = 1
# 10 KiB, as VMware lays it out: room for tools that rewrite the descriptor in place.
DESCRIPTOR_SECTORS = 20
# Grain and table offsets are 32-bit sector numbers: the file must end within 2 TiB.
MAX_FILE_SECTORS = 1 << 32

MAGIC = b"KDMV"
SPARSE_VERSION = 1
STREAM_VERSION = 3
FLAG_VALID_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_NONE, COMPRESS_DEFLATE = 0, 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
STREAM_OVERHEAD_SECTORS = GRAIN_SECTORS  # first grain at 64 KiB, as VMware writes them
STREAM_ZLIB_LEVEL = 6  # zlib's default
STREAM_CACHE_RECORDS = 64  # a record split between two reads is compressed once
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
NO_PARENT_CID = 0xFFFFFFFF

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, the four newline-detection characters,
# compressAlgorithm, padding to a sector.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
assert _HEADER.size == SECTOR_BYTES
assert array("I").itemsize == 4, "grain tables are arrays of uint32"
# Written in binary so that a transfer that rewrites line ends is detected (flag bit 0).
_NEWLINE_TEST = b"\n \r\n"
_GRAIN_MARKER = struct.Struct("<QI")  # the grain's first disk sector, its compressed length
_META_MARKER = struct.Struct("<QII")  # sectors that follow, 0, marker type; a whole sector
_ZERO_GRAIN = bytes(GRAIN_BYTES)


@dataclass(frozen=True)
class SparseLayout:
    """Where each metadata structure of a monolithicSparse extent lives, in sectors."""

    capacity_sectors: int
    gd_entries: int
    gd_sectors: int
    rgd_sector: int
    rgt_sector: int
    gd_sector: int
    gt_sector: int
    overhead_sectors: int

    @classmethod
    def for_size(cls, size_bytes: int) -> SparseLayout:
        capacity = _capacity_sectors(size_bytes)
        entries = -(-capacity // (GTES_PER_GT * GRAIN_SECTORS))
        gd_sectors = -(-entries * 4 // SECTOR_BYTES)
        tables = entries * GT_SECTORS
        rgd = DESCRIPTOR_OFFSET_SECTORS + DESCRIPTOR_SECTORS
        gd = rgd + gd_sectors + tables
        end = gd + gd_sectors + tables
        overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
        return cls(
            capacity, entries, gd_sectors, rgd, rgd + gd_sectors, gd, gd + gd_sectors, overhead
        )


def vmdk_image(
    source: MappedSource,
    *,
    filename: str = "disk.vmdk",
    adapter_type: str = "lsilogic",
    cid: int | None = None,
) -> VirtualImage:
    """The disk as a monolithicSparse VMDK. ``filename`` is the extent's name in the embedded
    descriptor (informational for a monolithic file); ``cid`` is the content id, by default a
    CRC-32 of the size and allocation map so that the same disk always yields the same bytes
    (a caller that knows the content's identity, e.g. a recovery point id, should derive the
    CID from it instead: a child disk checks its parent by CID)."""
    layout = SparseLayout.for_size(source.size)
    runs = grain_runs(source)
    end = layout.overhead_sectors + sum(hi - lo for lo, hi in runs) * GRAIN_SECTORS
    _check_fits(source.size, end)
    cid = _default_cid(source.size, runs) if cid is None else cid
    descriptor = vmdk_descriptor(
        "monolithicSparse", layout.capacity_sectors, filename, adapter_type, cid
    )
    header = _pack_header(
        SPARSE_VERSION,
        FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GRAIN_TABLE,
        layout.capacity_sectors,
        (layout.rgd_sector, layout.gd_sector, layout.overhead_sectors),
        COMPRESS_NONE,
    )
    segs: list[Segment] = [Literal(0, header + descriptor)]
    for gd, gt in ((layout.rgd_sector, layout.rgt_sector), (layout.gd_sector, layout.gt_sector)):
        entries = array("I", range(gt, gt + layout.gd_entries * GT_SECTORS, GT_SECTORS))
        if entries:
            segs.append(Literal(gd * SECTOR_BYTES, _le_bytes(entries)))
    grain_segs, tables = _place_grains(source.size, layout, runs)
    for index in sorted(tables):
        data = _le_bytes(tables[index])
        # The same bytes object backs both copies: the redundant tables cost no memory.
        segs.append(Literal((layout.rgt_sector + index * GT_SECTORS) * SECTOR_BYTES, data))
        segs.append(Literal((layout.gt_sector + index * GT_SECTORS) * SECTOR_BYTES, data))
    return VirtualImage(end * SECTOR_BYTES, segs + grain_segs, source)


def _place_grains(
    size_bytes: int, layout: SparseLayout, runs: list[tuple[int, int]]
) -> tuple[list[Segment], dict[int, array[int]]]:
    """The grains' segments (one per run: consecutive grains are contiguous in the file too)
    and the grain tables that have an allocated grain, by grain-directory index."""
    segs: list[Segment] = []
    tables: dict[int, array[int]] = {}
    sector = layout.overhead_sectors
    for lo, hi in runs:
        # A grain partly past the disk's end: the rest of it is a gap, read as zeros.
        length = min(hi * GRAIN_BYTES, size_bytes) - lo * GRAIN_BYTES
        segs.append(FromSource(sector * SECTOR_BYTES, length, lo * GRAIN_BYTES))
        grain = lo
        while grain < hi:
            index, first = divmod(grain, GTES_PER_GT)
            n = min(hi - grain, GTES_PER_GT - first)
            table = tables.get(index) or tables.setdefault(index, _empty_table())
            at = sector + (grain - lo) * GRAIN_SECTORS
            table[first : first + n] = array("I", range(at, at + n * GRAIN_SECTORS, GRAIN_SECTORS))
            grain += n
        sector += (hi - lo) * GRAIN_SECTORS
    return segs, tables


def vmdk_stream_image(
    source: MappedSource,
    *,
    filename: str = "disk.vmdk",
    adapter_type: str = "lsilogic",
    cid: int | None = None,
    zlib_level: int = STREAM_ZLIB_LEVEL,
) -> VirtualImage:
    """The disk as a streamOptimized VMDK (for OVF/OVA import): reads and compresses all the
    disk's data now, to lay the file out; all-zero grains are left unallocated. Options as for
    ``vmdk_image``."""
    capacity = _capacity_sectors(source.size)
    runs = grain_runs(source)
    cid = _default_cid(source.size, runs) if cid is None else cid
    descriptor = vmdk_descriptor("streamOptimized", capacity, filename, adapter_type, cid)
    grains = CompressedGrains(source, runs, STREAM_OVERHEAD_SECTORS * SECTOR_BYTES, zlib_level)
    tables: dict[int, array[int]] = {}
    for grain, start in zip(grains.grains, grains.starts, strict=True):
        index, entry = divmod(grain, GTES_PER_GT)
        table = tables.get(index) or tables.setdefault(index, _empty_table())
        table[entry] = start // SECTOR_BYTES
    gd_entries = -(-capacity // (GTES_PER_GT * GRAIN_SECTORS))
    gd_sectors = -(-gd_entries * 4 // SECTOR_BYTES)
    gd = array("I", bytes(gd_entries * 4))
    meta = bytearray()
    sector = grains.size // SECTOR_BYTES
    for index in sorted(tables):
        gd[index] = sector + 1  # the table follows its marker
        meta += _marker(GT_SECTORS, MARKER_GT) + _le_bytes(tables[index])
        sector += 1 + GT_SECTORS
    meta += _marker(gd_sectors, MARKER_GD) + _le_bytes(gd).ljust(gd_sectors * SECTOR_BYTES, b"\0")
    end = sector + 1 + gd_sectors + 3
    _check_fits(source.size, end)
    flags = FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS

    def header(gd_sector: int) -> bytes:
        where = (0, gd_sector, STREAM_OVERHEAD_SECTORS)
        return _pack_header(STREAM_VERSION, flags, capacity, where, COMPRESS_DEFLATE)

    meta += _marker(1, MARKER_FOOTER) + header(sector + 1) + _marker(0, MARKER_EOS)
    segs: list[Segment] = [Literal(0, header(GD_AT_END) + descriptor)]
    if grains.grains:
        segs.append(FromSource(grains.start, grains.size - grains.start, grains.start))
    segs.append(Literal(grains.size, bytes(meta)))
    return VirtualImage(end * SECTOR_BYTES, segs, grains)


class CompressedGrains:
    """The grain records of a streamOptimized file, as a block source addressed by offsets in
    the image: each non-zero grain overlapping the extents as a grain marker and its zlib
    stream, padded to a sector, back to back from ``start``.

    Built by compressing every grain once to learn its length (the layout needs them all);
    a read compresses a grain again, which zlib reproduces byte for byte for the same input
    and level. A record that comes out another length (the source changed under us) raises
    rather than shifting every later offset."""

    def __init__(
        self, source: MappedSource, runs: list[tuple[int, int]], start: int, level: int
    ) -> None:
        self._source, self._level, self.start = source, level, start
        self.grains, self.starts, self._lengths = array("Q"), array("Q"), array("I")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # random reads (NBD, FUSE) may come from several threads
        pos = start
        for lo, hi in runs:
            for grain in range(lo, hi):
                data = self._grain(grain)
                if data == _ZERO_GRAIN:
                    continue  # unallocated reads as zeros: no need to store it
                n = len(zlib.compress(data, level))
                self.grains.append(grain)
                self.starts.append(pos)
                self._lengths.append(n)
                pos += -(-(_GRAIN_MARKER.size + n) // SECTOR_BYTES) * SECTOR_BYTES
        self._end = pos

    @property
    def size(self) -> int:
        return self._end

    @property
    def granularity(self) -> int:
        return SECTOR_BYTES  # records are sector-aligned; the image never asks

    def extents(self) -> list[tuple[int, int]]:
        return [(self.start, self._end - self.start)] if self._end > self.start else []

    def read_into(self, buf: memoryview, offset: int) -> None:
        length = len(buf)
        buf[:] = bytes(length)
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while i < len(self.starts) and self.starts[i] < offset + length:
            record, at = self._record(i), self.starts[i]
            lo, hi = max(at, offset), min(at + len(record), offset + length)
            if lo < hi:
                buf[lo - offset : hi - offset] = record[lo - at : hi - at]
            i += 1

    def _grain(self, grain: int) -> bytes:
        """A whole grain, zero-padded past the disk's end (readers inflate whole grains)."""
        offset = grain * GRAIN_BYTES
        data = read_bytes(self._source, offset, min(GRAIN_BYTES, self._source.size - offset))
        return data.ljust(GRAIN_BYTES, b"\0")

    def _record(self, i: int) -> bytes:
        with self._lock:
            record = self._cache.get(i)
            if record is not None:
                self._cache.move_to_end(i)
                return record
        grain = self.grains[i]
        packed = zlib.compress(self._grain(grain), self._level)
        if len(packed) != self._lengths[i]:
            raise SourceError(
                f"the disk's grain at offset {grain * GRAIN_BYTES} compressed to "
                f"{len(packed)} bytes, not {self._lengths[i]}: the source changed while exported"
            )
        record = _GRAIN_MARKER.pack(grain * GRAIN_SECTORS, len(packed)) + packed
        record = record.ljust(-(-len(record) // SECTOR_BYTES) * SECTOR_BYTES, b"\0")
        with self._lock:
            self._cache[i] = record
            if len(self._cache) > STREAM_CACHE_RECORDS:
                self._cache.popitem(last=False)
        return record


def grain_runs(source: MappedSource) -> list[tuple[int, int]]:
    """[first, end) grain indexes of the grains overlapping the disk's extents, merged."""
    runs: list[tuple[int, int]] = []
    for offset, length in source.extents():
        stop = min(offset + length, source.size)
        if stop <= offset:
            continue
        lo, hi = offset // GRAIN_BYTES, -(-stop // GRAIN_BYTES)
        if runs and runs[-1][1] >= lo:
            prev_lo, prev_hi = runs.pop()
            lo, hi = prev_lo, max(hi, prev_hi)
        runs.append((lo, hi))
    return runs


def vmdk_descriptor(
    create_type: str, capacity_sectors: int, filename: str, adapter_type: str, cid: int
) -> bytes:
    """The embedded descriptor, NUL-padded to ``DESCRIPTOR_SECTORS``."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    if any(c in filename for c in '"\r\n\0'):
        raise ValueError(f"extent file name {filename!r} cannot be written in a descriptor")
    heads = 16 if adapter_type == "ide" else 255
    sectors_per_track = 63
    # Geometry is informational for SCSI; IDE's BIOS geometry tops out at 16383 cylinders.
    max_cylinders = 16383 if adapter_type == "ide" else 65535
    cylinders = max(1, min(max_cylinders, capacity_sectors // (heads * sectors_per_track)))
    text = (
        "# Disk DescriptorFile\nversion=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\nparentCID={NO_PARENT_CID:08x}\n"
        f'createType="{create_type}"\n\n'
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "{filename}"\n\n'
        "# The Disk Data Base\n#DDB\n\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{sectors_per_track}"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
    ).encode()
    room = DESCRIPTOR_SECTORS * SECTOR_BYTES
    if len(text) > room:
        raise ValueError(f"descriptor of {len(text)} bytes exceeds its {room} bytes")
    return text.ljust(room, b"\0")


def _pack_header(
    version: int, flags: int, capacity: int, where: tuple[int, int, int], compress: int
) -> bytes:
    """The SparseExtentHeader; ``where`` is (rgdOffset, gdOffset, overHead) in sectors."""
    return _HEADER.pack(
        *(MAGIC, version, flags, capacity, GRAIN_SECTORS, DESCRIPTOR_OFFSET_SECTORS),
        *(DESCRIPTOR_SECTORS, GTES_PER_GT, *where),
        *(0, _NEWLINE_TEST, compress),  # 0: cleanly closed
    )


def _marker(sectors: int, kind: int) -> bytes:
    """A metadata marker: a whole sector saying what (and how many sectors) follows."""
    return _META_MARKER.pack(sectors, 0, kind).ljust(SECTOR_BYTES, b"\0")


def _empty_table() -> array[int]:
    return array("I", bytes(GTES_PER_GT * 4))


def _capacity_sectors(size_bytes: int) -> int:
    return -(-size_bytes // SECTOR_BYTES)


def _check_fits(size_bytes: int, end_sectors: int) -> None:
    if end_sectors > MAX_FILE_SECTORS:
        raise OutputError(
            f"a VMDK of this {size_bytes}-byte disk would be {end_sectors * SECTOR_BYTES} "
            "bytes: a hosted sparse extent addresses at most 2 TiB of file"
        )


def _le_bytes(values: array[int]) -> bytes:
    """A table of uint32 as little-endian bytes (``array`` is host-endian)."""
    if sys.byteorder == "big":
        values = array("I", values)
        values.byteswap()
    return values.tobytes()


def _default_cid(size_bytes: int, runs: list[tuple[int, int]]) -> int:
    crc = zlib.crc32(size_bytes.to_bytes(8, "little"))
    for lo, hi in runs:
        crc = zlib.crc32(lo.to_bytes(8, "little") + hi.to_bytes(8, "little"), crc)
    # 0xffffffff means "no parent" in parentCID: never use it as an id.
    return crc if crc != NO_PARENT_CID else 0
