"""Several disks of one engine run as one source: disk i's offsets travel as ``i << DISK_SHIFT |
offset`` (256 TiB per disk), so one dedup index and one set of workers serve them all, and the
work items of the disks interleave (the disks are read in parallel; ``pipeline.jobs.runner``).

Owns that address space. Must not: plan what is read, or know the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.sources.image import Source, SourceHandle

DISK_SHIFT = 48


@dataclass(frozen=True)
class MultiSource:
    """The sources of several disks as one address space (see ``DISK_SHIFT``)."""

    sources: tuple[Source, ...]

    def open(self) -> _OpenMulti:
        return _OpenMulti([s.open() for s in self.sources])

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.sources)


class _OpenMulti:
    def __init__(self, handles: list[SourceHandle]) -> None:
        self.handles = handles
        self.size = len(handles) << DISK_SHIFT

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(start, end - start)] if end > start else []

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.handles[offset >> DISK_SHIFT].read_into(buf, offset & ((1 << DISK_SHIFT) - 1))

    def close(self) -> None:
        for h in self.handles:
            h.close()
