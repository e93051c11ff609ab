"""A recovery point as a block source: random reads of its full image, through its manifest
and the chunk index, every chunk checked against its BLAKE3 id as it is read.

Opening a point reads only its root (a few bytes per MiB of disk with data). The rest is loaded
by **span** (``SPAN_CHUNKS`` consecutive chunks, 64 MiB of disk at 64 KiB) when a read first
touches it: the span's leaves, then the pack locations of their chunks, looked up in the index
segments that hold them (``catalog.read.locator.Locator``; first the segment of the backup that
wrote each leaves file, known from its point document). Loaded spans are kept up to
``map_cache_bytes`` (about 61 bytes a data chunk), least recently used first out; segment
lookup tables are shared by every point of the process (``catalog.read.lookup.SHARED_SEGMENTS``).
So a first read costs one span, not the disk, apart from checking the metadata files it needs
against their names (a leaves file and an index segment, read and hashed whole: bench drive, a
16 GiB disk's first read takes ~20 ms more than a 1 GiB one's). ``extents()`` is worked out
when first asked, span by span from the leaves alone (no index). A small LRU of decoded chunks
serves neighbouring reads (formats read a chunk in pieces).
Imports catalog only (no Ray, no pipeline).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from catalog.errors import CorruptionError
from catalog.read.locator import Locator
from catalog.read.lookup import SHARED_SEGMENTS, SegmentCache, segment_name
from catalog.repo import Repository
from catalog.store.chunks import decode_chunk
from catalog.store.packs import pack_name
from catalog.store.points import RecoveryPoint, load_forgotten, load_points_tolerant

_HEX64 = re.compile(r"[0-9a-f]{64}")

DEFAULT_CACHE_CHUNKS = 256  # 16 MiB of 64 KiB chunks
DEFAULT_MAP_CACHE_BYTES = 64 << 20  # loaded spans: ~1.1M data chunks, 68 GiB at 64 KiB
# Chunks whose map loads together. A 64 MiB span loads in ~0.5 ms; one-leaf spans in 0.09 ms,
# 11x as much per byte, which random reads over a disk pay (4 GiB mixed image of bench drive:
# every span loaded, 33 ms against 372 ms).
SPAN_CHUNKS = 1024
READ_THREADS = max(4, 2 * (os.cpu_count() or 2))
_PARALLEL_CHUNKS = 8  # reads of at least this many chunks go to the threads
_READ_BYTES = 16 << 20  # one pack read at most (bench backup: restore's coalescing figure)
_GAP_BYTES = 64 << 10  # read through gaps this small rather than issue another read


@dataclass(frozen=True)
class _Map:
    """The data chunks of a run of the disk: ascending chunk numbers, ids and locations
    (``pack`` is a code into the source's pack names; -1 where no index segment names it)."""

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

    def between(self, first: int, last: int) -> _Map:
        """The chunks numbered ``first`` to ``last`` (inclusive)."""
        a, b = np.searchsorted(self.numbers, [first, last + 1]).tolist()
        return _Map(*(a_[a:b] for a_ in vars(self).values()))

    @staticmethod
    def concat(maps: list[_Map]) -> _Map:
        if len(maps) == 1:
            return maps[0]
        names = list(vars(maps[0]))
        return _Map(*(np.concatenate([getattr(m, n) for m in maps]) for n in names))


class PointSource:
    """``drive.formats.image.BlockSource`` over one committed recovery point; safe to read from
    several threads at once."""

    def __init__(
        self,
        repo: Repository,
        point: RecoveryPoint,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES,
        span_chunks: int = SPAN_CHUNKS,
        segments: SegmentCache = SHARED_SEGMENTS,
        block_lists: bool = True,
    ) -> None:
        """``block_lists``: check metadata files block by block where their points name block
        lists (``catalog.store.blocks``); False checks them whole (the benchmark's baseline)."""
        self.repo = repo
        self._use_block_lists = block_lists
        self.point = point
        self._chunk = point.chunk_size
        self._manifest = repo.manifest(point)  # the root only
        self._span_leaves = max(1, span_chunks // point.leaf_chunks)
        self._span_chunks = self._span_leaves * point.leaf_chunks
        self._locator = Locator(repo.storage, segments)
        own = segment_name(point.index_segment) if point.index_segment else None
        self._hints: dict[str, str | None] = {point.leaves: own} if point.leaves else {}
        self._by_time: list[str] | None = None
        # Block lists (catalog.store.blocks) named by the points that wrote leaves files/segments.
        self._leaf_blocks: dict[str, str | None] = {}
        self._note_blocks(point)
        self._manifest.block_list_of = self._leaves_block_list
        self._pack_names = self._locator.pack_names  # what a map's ``pack`` codes mean
        self._maps: OrderedDict[int, _Map] = OrderedDict()
        self._map_bytes = 0
        self._map_budget = map_cache_bytes
        self._extents: list[tuple[int, int]] | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._threads: ThreadPoolExecutor | None = None
        # Readers on several threads (NBD connections, FUSE requests) share one source: the
        # caches are guarded by ``_lock``; the manifest and the locator (not thread-safe) by
        # ``_load_lock``, so a span is loaded once; pack reads and decoding run in parallel.
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._extents_lock = threading.Lock()  # extents are worked out once

    @property
    def size(self) -> int:
        return self.point.size

    @property
    def granularity(self) -> int:
        return self._chunk

    @property
    def leaves_files_read(self) -> set[str]:
        """Ids of the leaves files opened so far (for tests and benchmarks)."""
        return set(self._manifest.files_opened)

    @property
    def segments_read(self) -> set[str]:
        """Names of the index segments searched so far (for tests and benchmarks)."""
        return set(self._locator.segments_used)

    def extents(self) -> list[tuple[int, int]]:
        """Runs of data chunks (zero chunks are holes), clipped to the disk's end. Worked out
        on first use from the leaves, span by span (the index is not needed)."""
        with self._extents_lock:
            if self._extents is None:
                self._extents = self._find_extents()
            return list(self._extents)

    def _find_extents(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        c = self._chunk
        spans = np.unique(self._manifest.leaf_nos // self._span_leaves).tolist()
        for s in spans:
            with self._load_lock:  # span by span: reads meanwhile wait for one span at most
                with self._lock:
                    cached = self._maps.get(s)
                n = cached.numbers if cached is not None else self._span_chunk_numbers(s)
            if not len(n):
                continue
            cuts = np.flatnonzero(np.diff(n) != 1) + 1
            starts = n[np.concatenate([[0], cuts])].tolist()
            ends = (n[np.concatenate([cuts - 1, [len(n) - 1]])] + 1).tolist()
            for lo, hi in zip(starts, ends, strict=True):
                if out and out[-1][0] + out[-1][1] == lo * c:
                    out[-1] = (out[-1][0], min(self.size, hi * c) - out[-1][0])
                else:
                    out.append((lo * c, min(self.size, hi * c) - lo * c))
        return out

    def _span_chunk_numbers(self, s: int) -> np.ndarray:
        lo = s * self._span_leaves
        return self._manifest.chunks(lo, lo + self._span_leaves, self.point.leaf_chunks)[0]

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        c = self._chunk
        numbers = range(offset // c, (offset + length - 1) // c + 1) if length else range(0)
        if len(numbers) >= _PARALLEL_CHUNKS:
            self._read_large(offset, length, out)
            return bytes(out)
        for number in numbers:
            data = self._chunk_data(number)
            if data is not None:
                lo, hi = max(offset, number * c), min(offset + length, (number + 1) * c)
                out[lo - offset : hi - offset] = data[lo - number * c : hi - number * c]
        return bytes(out)

    def _read_large(self, offset: int, length: int, out: bytearray) -> None:
        """Large reads (exports, sequential NBD reads): neighbouring chunks of a pack are read
        together (up to 16 MiB a read, as restore does) and decoded on threads (pack reads,
        zstd and BLAKE3 release the GIL). Not cached: they would only evict small reads'."""
        c = self._chunk
        m = self._rows(offset // c, (offset + length - 1) // c)
        self._check_indexed(m, np.arange(len(m.numbers)))
        order = np.lexsort((m.offset, m.pack))
        tasks: list[list[int]] = []
        end = -1
        for k in order.tolist():
            start, n = int(m.offset[k]), int(m.stored_len[k])
            first = tasks[-1][0] if tasks else -1
            if (
                not tasks
                or m.pack[k] != m.pack[first]
                or start > end + _GAP_BYTES
                or start + n - int(m.offset[first]) > _READ_BYTES
            ):
                tasks.append([])
            tasks[-1].append(k)
            end = max(end, start + n) if len(tasks[-1]) > 1 else start + n

        def run(task: list[int]) -> None:
            base = int(m.offset[task[0]])
            top = max(int(m.offset[k] + m.stored_len[k]) for k in task)
            name = pack_name(self._pack_names[int(m.pack[task[0]])])
            blob = self.repo.storage.read(name, base, top - base)
            for k in task:
                number = int(m.numbers[k])
                at = int(m.offset[k]) - base
                data = self._decode(m, k, blob[at : at + int(m.stored_len[k])])
                a, b = max(offset, number * c), min(offset + length, (number + 1) * c)
                out[a - offset : b - offset] = data[a - number * c : b - number * c]

        for _ in self._pool().map(run, tasks):
            pass

    def _rows(self, first: int, last: int) -> _Map:
        """The map of chunks ``first`` to ``last`` (inclusive), from the spans covering them."""
        spans = range(first // self._span_chunks, last // self._span_chunks + 1)
        return _Map.concat([self._span(s).between(first, last) for s in spans])

    def _span(self, s: int) -> _Map:
        with self._lock:
            m = self._maps.get(s)
            if m is not None:
                self._maps.move_to_end(s)
                return m
        with self._load_lock:
            with self._lock:
                m = self._maps.get(s)
            if m is None:
                m = self._load_span(s)
                with self._lock:
                    self._maps[s] = m
                    self._map_bytes += m.nbytes
                    while self._map_bytes > self._map_budget and len(self._maps) > 1:
                        self._map_bytes -= self._maps.popitem(last=False)[1].nbytes
        return m

    def _load_span(self, s: int) -> _Map:
        """Span ``s``'s leaves, and the locations of their chunks: first from the segments of
        the backups that wrote those leaves, then (dedup hits) from the others, newest first."""
        lo = s * self._span_leaves
        numbers, ids, files = self._manifest.chunks(
            lo, lo + self._span_leaves, self.point.leaf_chunks
        )
        first = list(dict.fromkeys(seg for seg in map(self._hint, files) if seg))
        near = (
            lo * self.point.leaf_chunks * self._chunk,
            (lo + self._span_leaves) * self.point.leaf_chunks * self._chunk,
        )
        f = self._locator.locate(ids, first, self._segments_by_time, near)
        return _Map(numbers, ids, f.pack, f.offset, f.stored_len, f.raw_len, f.codec)

    def _hint(self, leaves_id: str) -> str | None:
        if leaves_id not in self._hints:
            self._read_point_documents()
            self._hints.setdefault(leaves_id, None)  # its point is gone: search them all
        return self._hints[leaves_id]

    def _note_blocks(self, p: RecoveryPoint) -> None:
        """The block lists a point document names for the files its backup wrote."""
        blocks = p.blocks if isinstance(p.blocks, dict) and self._use_block_lists else {}
        lists = {k: v for k, v in blocks.items() if isinstance(v, str) and _HEX64.fullmatch(v)}
        if p.leaves and "leaves" in lists:
            self._leaf_blocks.setdefault(p.leaves, lists["leaves"])
        if p.index_segment and "index_segment" in lists:
            self._locator.block_lists.setdefault(
                segment_name(p.index_segment), lists["index_segment"]
            )

    def _leaves_block_list(self, leaves_id: str) -> str | None:
        if leaves_id not in self._leaf_blocks:
            self._read_point_documents()
            self._leaf_blocks.setdefault(leaves_id, None)  # its point is gone: checked whole
        return self._leaf_blocks[leaves_id]

    def _segments_by_time(self) -> list[str]:
        self._read_point_documents()
        return self._by_time or []

    def _read_point_documents(self) -> None:
        """Which backup wrote which leaves file and index segment, read once and only when
        needed: for leaves shared with earlier points, or chunks found elsewhere (dedup hits).
        Leaves files are older than the points that use them, so later points add nothing."""
        if self._by_time is not None:
            return
        points, _damaged = load_points_tolerant(self.repo.storage)
        forgotten, _damaged = load_forgotten(self.repo.storage, points)
        for p in [*points, *forgotten]:  # (a forgotten point's leaves may still be in use)
            self._note_blocks(p)
            if p.leaves:
                seg = segment_name(p.index_segment) if p.index_segment else None
                self._hints.setdefault(p.leaves, seg)
        newest = sorted(points, key=lambda p: p.time, reverse=True)
        self._by_time = [segment_name(p.index_segment) for p in newest if p.index_segment]

    def _check_indexed(self, m: _Map, rows: np.ndarray) -> None:
        """A chunk that no index segment names is corruption (the point is damaged)."""
        bad = rows[m.pack[rows] < 0]
        if len(bad):
            i = int(bad[0])
            raise CorruptionError(
                f"recovery point {self.point.id} at offset {int(m.numbers[i]) * self._chunk}: "
                f"chunk {m.ids[i].tobytes().hex()[:16]} is in no index segment"
            )

    def _decode(self, m: _Map, k: int, blob: bytes) -> bytes:
        where = f"recovery point {self.point.id} at offset {int(m.numbers[k]) * self._chunk}"
        return decode_chunk(
            blob,
            int(m.codec[k]),
            int(m.raw_len[k]),
            m.ids[k].tobytes(),
            where,
            self.repo.storage.keys,
        )

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="comb-drive")
            return self._threads

    def _chunk_data(self, number: int, cache: bool = True) -> bytes | None:
        """The plain bytes of chunk ``number``, or None for a zero chunk."""
        with self._lock:
            cached = self._cache.get(number)
            if cached is not None and cache:
                self._cache.move_to_end(number)
        if cached is not None:
            return cached
        m = self._span(number // self._span_chunks)
        k = int(np.searchsorted(m.numbers, number))
        if k == len(m.numbers) or m.numbers[k] != number:
            return None
        self._check_indexed(m, np.array([k]))
        name = pack_name(self._pack_names[int(m.pack[k])])
        blob = self.repo.storage.read(name, int(m.offset[k]), int(m.stored_len[k]))
        data = self._decode(m, k, blob)
        if cache:
            with self._lock:
                self._cache[number] = data
                if len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        return data
