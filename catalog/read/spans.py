"""The chunk map of a recovery point, loaded by **span** (``SPAN_CHUNKS`` consecutive chunks,
64 MiB of disk at 64 KiB) when a read first touches it: the span's leaves, then the pack
locations of their chunks, looked up in the index segments that hold them
(``catalog.read.locator.Locator``; first the segment of the backup that wrote each leaves file,
``catalog.read.provenance``). Loaded spans are kept up to ``map_cache_bytes`` (about 61 bytes a
data chunk), least recently used first out. The allocation map (``extents``) is worked out from
the leaves alone (no index), span by span.

Owns the map and its cache. Must not: read packs or decode chunks (``catalog.read.point``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from catalog.read.locator import Locator
from catalog.read.lookup import SHARED_SEGMENTS, SegmentCache
from catalog.read.provenance import Provenance
from catalog.store.manifest import ManifestReader
from catalog.store.points import RecoveryPoint
from catalog.store.storage import Storage

DEFAULT_MAP_CACHE_BYTES = 64 << 20  # loaded spans: ~1.1M data chunks, 68 GiB at 64 KiB
# Chunks whose map loads together. A 64 MiB span loads in ~0.5 ms; one-leaf spans in 0.09 ms,
# 11x as much per byte, which random reads over a disk pay (4 GiB mixed image of bench drive:
# every span loaded, 33 ms against 372 ms).
SPAN_CHUNKS = 1024


@dataclass(frozen=True)
class MapOptions:
    """How a point's chunk map loads, and how much of it is kept."""

    map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES
    span_chunks: int = SPAN_CHUNKS  # chunks whose map loads together
    segments: SegmentCache = SHARED_SEGMENTS  # index segment tables (shared by every point)
    # Check metadata files block by block where their points name block lists
    # (catalog.store.blocks); False checks them whole (the benchmark's baseline).
    block_lists: bool = True


@dataclass(frozen=True)
class ChunkMap:
    """The data chunks of a run of the disk: ascending chunk numbers, ids and locations
    (``pack`` is a code into ``SpanMaps.pack_names``; -1 where no index segment names it)."""

    numbers: np.ndarray
    ids: np.ndarray
    pack: np.ndarray
    offset: np.ndarray
    stored_len: np.ndarray
    raw_len: np.ndarray
    codec: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values())

    def between(self, first: int, last: int) -> ChunkMap:
        """The chunks numbered ``first`` to ``last`` (inclusive)."""
        a, b = np.searchsorted(self.numbers, [first, last + 1]).tolist()
        return ChunkMap(*(a_[a:b] for a_ in vars(self).values()))

    @staticmethod
    def concat(maps: list[ChunkMap]) -> ChunkMap:
        if len(maps) == 1:
            return maps[0]
        names = list(vars(maps[0]))
        return ChunkMap(*(np.concatenate([getattr(m, n) for m in maps]) for n in names))


def number_runs(numbers: np.ndarray) -> list[tuple[int, int]]:
    """The runs [lo, hi) of consecutive numbers in an ascending array."""
    if not len(numbers):
        return []
    cuts = np.flatnonzero(np.diff(numbers) != 1) + 1
    starts = numbers[np.concatenate([[0], cuts])].tolist()
    ends = (numbers[np.concatenate([cuts - 1, [len(numbers) - 1]])] + 1).tolist()
    return list(zip(starts, ends, strict=True))


class SpanMaps:
    """One point's chunk map, span by span; safe to use from several threads at once."""

    def __init__(
        self, storage: Storage, point: RecoveryPoint, options: MapOptions = MapOptions()
    ) -> None:
        self._point = point
        self._chunk = point.chunk_size
        self._provenance = Provenance(storage, point, options.block_lists)
        self._manifest = ManifestReader(  # the root only
            storage, point.root, point.leaves, self._provenance.leaves_blocks
        )
        self._locator = Locator(storage, options.segments, self._provenance.segment_blocks)
        self._span_leaves = max(1, options.span_chunks // point.leaf_chunks)
        self.span_chunks = self._span_leaves * point.leaf_chunks
        self.pack_names = self._locator.pack_names  # what a map's ``pack`` codes mean
        self._maps: OrderedDict[int, ChunkMap] = OrderedDict()
        self._map_bytes = 0
        self._map_budget = options.map_cache_bytes
        # ``_lock`` guards the cache; ``_load_lock`` the manifest, the provenance and the
        # locator (not thread-safe), so a span is loaded once.
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def leaves_files_read(self) -> set[str]:
        return set(self._manifest.files_opened)

    @property
    def segments_read(self) -> set[str]:
        return set(self._locator.segments_used)

    def rows(self, first: int, last: int) -> ChunkMap:
        """The map of chunks ``first`` to ``last`` (inclusive), from the spans covering them."""
        spans = range(first // self.span_chunks, last // self.span_chunks + 1)
        return ChunkMap.concat([self.span(s).between(first, last) for s in spans])

    def span(self, s: int) -> ChunkMap:
        m = self._cached(s)
        if m is not None:
            return m
        with self._load_lock:
            m = self._cached(s)  # (loaded meanwhile by another thread)
            if m is None:
                m = self._load(s)
                with self._lock:
                    self._maps[s] = m
                    self._map_bytes += m.nbytes
                    while self._map_bytes > self._map_budget and len(self._maps) > 1:
                        self._map_bytes -= self._maps.popitem(last=False)[1].nbytes
        return m

    def _cached(self, s: int) -> ChunkMap | None:
        with self._lock:
            m = self._maps.get(s)
            if m is not None:
                self._maps.move_to_end(s)
            return m

    def _load(self, s: int) -> ChunkMap:
        """Span ``s``'s leaves, and the locations of their chunks: first from the segments of
        the backups that wrote those leaves, then (dedup hits) from the others, newest first."""
        lo = s * self._span_leaves
        leaf_chunks = self._point.leaf_chunks
        numbers, ids, files = self._manifest.chunks(lo, lo + self._span_leaves, leaf_chunks)
        segment_of = self._provenance.segment_of
        first = list(dict.fromkeys(seg for seg in map(segment_of, files) if seg))
        near = (
            lo * leaf_chunks * self._chunk,
            (lo + self._span_leaves) * leaf_chunks * self._chunk,
        )
        f = self._locator.locate(ids, first, self._provenance.segments_by_time, near)
        return ChunkMap(numbers, ids, f.pack, f.offset, f.stored_len, f.raw_len, f.codec)

    def extents(self) -> list[tuple[int, int]]:
        """Runs of data chunks (zero chunks are holes), clipped to the disk's end, span by span
        from the leaves (the index is not needed)."""
        out: list[tuple[int, int]] = []
        c, size = self._chunk, self._point.size
        for s in np.unique(self._manifest.leaf_nos // self._span_leaves).tolist():
            with self._load_lock:  # span by span: reads meanwhile wait for one span at most
                with self._lock:
                    cached = self._maps.get(s)
                n = cached.numbers if cached is not None else self._chunk_numbers(s)
            for lo, hi in number_runs(n):
                if out and out[-1][0] + out[-1][1] == lo * c:
                    out[-1] = (out[-1][0], min(size, hi * c) - out[-1][0])
                else:
                    out.append((lo * c, min(size, hi * c) - lo * c))
        return out

    def _chunk_numbers(self, s: int) -> np.ndarray:
        lo = s * self._span_leaves
        return self._manifest.chunks(lo, lo + self._span_leaves, self._point.leaf_chunks)[0]
