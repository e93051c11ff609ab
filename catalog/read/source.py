"""The block-source protocol: a disk as a size and its bytes by offset, the one interface between
whatever holds a disk and whatever reads it whole or in pieces.

A backup reads its source through it (``stages.sources``: image files, block devices, vSphere
datastore disks, overlays), and the virtual drive serves recovery points through it
(``catalog.read.point.PointSource``, overlays over it, and the disk image formats of
``drive.formats``, which also need ``MappedSource``'s allocation map).

Owns the protocols and ``read_bytes``. Must not: import anything of comb, hold state, or know
where a source's bytes come from.
"""

from __future__ import annotations

from typing import Protocol


class BlockSource(Protocol):
    """A disk: its size and its bytes."""

    @property
    def size(self) -> int: ...

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with bytes [offset, offset + len(buf)) of the disk, which lie within
        ``size``; never short: a source that cannot deliver them raises (a ``CombError``)."""
        ...


class MappedSource(BlockSource, Protocol):
    """A block source that knows where its data is: what a disk image format needs."""

    def extents(self) -> list[tuple[int, int]]:
        """Sorted, non-overlapping (offset, length) runs that may hold data; everything else
        reads as zeros. Runs are aligned to ``granularity`` except the disk's end."""
        ...

    @property
    def granularity(self) -> int:
        """The unit of allocation in bytes (the chunk size; a power of two, >= 4096)."""
        ...


def read_bytes(source: BlockSource, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of ``source``, short past its end."""
    length = max(0, min(length, source.size - offset))
    buf = bytearray(length)
    if length:
        source.read_into(memoryview(buf), offset)
    return bytes(buf)
