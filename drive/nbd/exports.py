"""The exports of recovery points: their names, and the loaded points shared by every NBD
connection.

Owns ``export_name`` (a point's canonical name, ``SOURCE@ID``), ``ServedPoint`` (a point's block
source and its allocation map) and ``SourceCache`` (loaded points, least recently used first
out). Must not parse point specs: a client's export name is looked up with
``catalog.store.points.resolve``, the grammar every command takes. Imports catalog and drive
only; never writes.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import OrderedDict

from catalog.read.point import DEFAULT_CACHE_CHUNKS, PointSource
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

# Loaded points kept open: each holds at most about 80 MiB of chunk maps and a 16 MiB chunk
# cache (catalog.read.point); the index segment tables are shared by all of them
# (catalog.read.lookup).
DEFAULT_MAX_SOURCES = 8


def export_name(point: RecoveryPoint) -> str:
    return f"{point.source}@{point.id}"


class ServedPoint:
    """One point being served: its block source (safe for concurrent reads) and its
    allocation map."""

    def __init__(self, source: PointSource) -> None:
        self.source = source
        self.point = source.point
        self.size = source.size
        self._map: tuple[list[int], list[int]] | None = None  # made at the first block status
        self._map_lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length) if length else b""

    def _runs(self) -> tuple[list[int], list[int]]:
        """The allocation map, worked out at the first block-status request, so a client's
        first read does not wait for the whole manifest."""
        with self._map_lock:
            if self._map is None:
                extents = self.source.extents()
                self._map = ([off for off, _ in extents], [off + n for off, n in extents])
            return self._map

    def segments(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering the range in order; at most ``limit`` runs
        (0: all). Zero chunks and holes are not data."""
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        starts, ends = self._runs()
        i = bisect_right(starts, offset) - 1
        at = offset
        while at < end and (not limit or len(out) < limit):
            if i >= 0 and at < ends[i]:
                stop, data = min(end, ends[i]), True
            else:
                nxt = starts[i + 1] if i + 1 < len(starts) else end
                stop, data = min(end, nxt), False
                i += 1
            out.append((at, stop - at, data))
            at = stop
        return out


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: ServedPoint | None = None


class SourceCache:
    """Loaded points shared by all connections, least recently used first out. A point is loaded
    once even when several clients connect at once; other points' loads do not wait for it."""

    def __init__(
        self,
        repo: Repository,
        max_sources: int = DEFAULT_MAX_SOURCES,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
    ) -> None:
        self._repo = repo
        self._max = max(1, max_sources)
        self._cache_chunks = max(1, cache_chunks)
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def get(self, point: RecoveryPoint) -> ServedPoint:
        with self._lock:
            slot = self._slots.get(point.id)
            if slot is None:
                slot = self._slots[point.id] = _Slot()
            self._slots.move_to_end(point.id)
            while len(self._slots) > self._max:
                self._slots.popitem(last=False)  # connections using it keep their reference
        with slot.lock:
            if slot.value is None:
                slot.value = ServedPoint(self._repo.reader(point, self._cache_chunks))
            return slot.value
