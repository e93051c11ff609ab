"""Disk images generated on the fly: a format's file as a list of segments.

A format (raw, VHD, VHDX, VMDK, qcow2) never copies the disk: it lays its file out as an
ordered list of non-overlapping **segments**, each either literal bytes (headers, tables,
footers: computed up front from the disk's allocation map, small) or a range of the block
source (the disk's data, read when the segment is read). Offsets not covered by any segment
read as zeros, so sparse regions stay sparse in every format that can express them. The same
``VirtualImage`` serves a streamed export (segments in order; gaps become holes) and, later,
random reads by the NBD server and the FUSE drive.

Owns ``VirtualImage`` and its segments. Must not: import anything of comb but the block-source
protocol (``catalog.read.source.MappedSource``): formats see only a size and the allocated
extents, never packs or manifests.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from catalog.read.source import MappedSource, read_bytes


@dataclass(frozen=True)
class Literal:
    """Bytes of the format itself (a header, a table), at ``offset`` in the image."""

    offset: int
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class FromSource:
    """``length`` bytes of the disk from ``source_offset``, placed at ``offset`` in the image."""

    offset: int
    length: int
    source_offset: int


Segment = Literal | FromSource


@dataclass
class VirtualImage:
    """A format's whole file: ``size`` bytes, the segments in offset order, zeros elsewhere."""

    size: int
    segments: list[Segment]
    source: MappedSource
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.segments.sort(key=lambda s: s.offset)
        self._starts = [s.offset for s in self.segments]
        end = 0
        for s in self.segments:
            if s.offset < end or s.length < 0:
                raise ValueError(f"segment at {s.offset} overlaps the one before it")
            end = s.offset + s.length
        if end > self.size:
            raise ValueError(f"segments end at {end}, past the image size {self.size}")

    def read(self, offset: int, length: int) -> bytes:
        """Random access: bytes [offset, offset + length) of the image (short at its end)."""
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.segments) and length:
            s = self.segments[i]
            lo, hi = max(s.offset, offset), min(s.offset + s.length, offset + length)
            if s.offset >= offset + length:
                break
            if lo < hi:
                out[lo - offset : hi - offset] = self._piece(s, lo - s.offset, hi - lo)
            i += 1
        return bytes(out)

    def pieces(self, max_bytes: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) in order, for a streamed export: gaps are left out (holes)."""
        for s in self.segments:
            for at in range(0, s.length, max_bytes):
                n = min(max_bytes, s.length - at)
                yield s.offset + at, self._piece(s, at, n)

    def _piece(self, s: Segment, at: int, n: int) -> bytes:
        if isinstance(s, Literal):
            return s.data[at : at + n]
        return read_bytes(self.source, s.source_offset + at, n)


def raw_image(source: MappedSource) -> VirtualImage:
    """The disk itself: its data extents in place, holes elsewhere."""
    segs: list[Segment] = [FromSource(o, n, o) for o, n in source.extents()]
    return VirtualImage(source.size, segs, source)
