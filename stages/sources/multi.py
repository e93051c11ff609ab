"""Several disks of one engine run as one source: disk i's offsets travel as ``i << DISK_SHIFT |
offset`` (256 TiB per disk), so one dedup index and one set of workers serve them all, and the
work items of the disks interleave (the disks are read in parallel; ``pipeline.jobs.runner``).

Owns that address space. Must not: plan what is read, or know the repository.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from stages.sources.image import Source, SourceHandle

DISK_SHIFT = 48


# Sources a worker keeps open at once (the least recently read is closed first): a job of
# hundreds of sources must not hold workers x sources file descriptors.
MAX_OPEN = 16


@dataclass(frozen=True)
class MultiSource:
    """The sources of several disks as one address space (see ``DISK_SHIFT``)."""

    sources: tuple[Source, ...]

    def open(self) -> _OpenMulti:
        return _OpenMulti(self.sources)

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.sources)


class _OpenMulti:
    """Each source is opened at its first read (so one that cannot be opened fails its own
    reads, not the worker's start), and at most ``MAX_OPEN`` stay open."""

    def __init__(self, sources: tuple[Source, ...]) -> None:
        self.sources = sources
        self.handles: OrderedDict[int, SourceHandle] = OrderedDict()
        self.size = len(sources) << DISK_SHIFT

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(start, end - start)] if end > start else []

    def read_into(self, buf: memoryview, offset: int) -> None:
        disk = offset >> DISK_SHIFT
        handle = self.handles.get(disk)
        if handle is None:
            handle = self.sources[disk].open()
            self.handles[disk] = handle
            if len(self.handles) > MAX_OPEN:
                self.handles.popitem(last=False)[1].close()
        self.handles.move_to_end(disk)
        handle.read_into(buf, offset & ((1 << DISK_SHIFT) - 1))

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self.handles.clear()
