"""A recovery point as a block source (``catalog.read.source.MappedSource``): random reads of
its full image, through its manifest and the chunk index, every chunk checked against its
BLAKE3 id as it is read. ``catalog.repo.Repository.reader`` opens one.

Opening a point reads only its root (a few bytes per MiB of disk with data). The rest is loaded
by span when a read first touches it (``catalog.read.spans``); segment lookup tables are shared
by every point of the process (``catalog.read.lookup.SHARED_SEGMENTS``). So a first read costs
one span, not the disk, apart from checking the metadata files it needs against their names
(a leaves file and an index segment, read and hashed whole where no block list names them:
bench drive, a 16 GiB disk's first read takes ~20 ms more than a 1 GiB one's). A small LRU of
decoded chunks serves neighbouring reads (formats read a chunk in pieces); large reads are
coalesced into pack reads (``catalog.read.coalesce``) and decoded on threads.

Owns the reads and the chunk cache. Must not: write anything, or know who reads (a backup of
an overlay, an NBD client, an export: ``drive``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from catalog.errors import CorruptionError
from catalog.read.coalesce import coalesce
from catalog.read.source import read_bytes
from catalog.read.spans import ChunkMap, MapOptions, SpanMaps, number_runs
from catalog.store.chunks import decode_chunk
from catalog.store.packs import pack_name
from catalog.store.points import RecoveryPoint
from catalog.store.storage import Storage

DEFAULT_CACHE_CHUNKS = 256  # 16 MiB of 64 KiB chunks
READ_THREADS = max(4, 2 * (os.cpu_count() or 2))
_PARALLEL_CHUNKS = 8  # reads of at least this many chunks go to the threads


class PointSource:
    """One committed recovery point's image; safe to read from several threads at once."""

    def __init__(
        self,
        storage: Storage,
        point: RecoveryPoint,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        maps: MapOptions = MapOptions(),
    ) -> None:
        """``cache_chunks``: decoded chunks kept for neighbouring reads; ``maps``: how the
        point's chunk map loads (``catalog.read.spans``)."""
        self.point = point
        self._storage = storage
        self._chunk = point.chunk_size
        self._spans = SpanMaps(storage, point, maps)
        self._extents: list[tuple[int, int]] | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._threads: ThreadPoolExecutor | None = None
        # Readers on several threads (NBD connections, FUSE requests) share one source: the
        # chunk cache and the pool are guarded by ``_lock`` (the span maps guard themselves);
        # pack reads and decoding run in parallel.
        self._lock = threading.Lock()
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
        return self._spans.leaves_files_read

    @property
    def segments_read(self) -> set[str]:
        """Names of the index segments searched so far (for tests and benchmarks)."""
        return self._spans.segments_read

    def extents(self) -> list[tuple[int, int]]:
        """Runs of data chunks (zero chunks are holes), clipped to the disk's end. Worked out
        on first use from the leaves, span by span (the index is not needed)."""
        with self._extents_lock:
            if self._extents is None:
                self._extents = self._spans.extents()
            return list(self._extents)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length), short past the disk's end."""
        return read_bytes(self, offset, length)

    def read_into(self, buf: memoryview, offset: int) -> None:
        length = len(buf)
        if not length:
            return
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}-{offset + length} are not all on the disk")
        c = self._chunk
        numbers = range(offset // c, (offset + length - 1) // c + 1)
        if len(numbers) >= _PARALLEL_CHUNKS:
            self._read_large(offset, buf)
            return
        for number in numbers:
            data = self._chunk_data(number)
            lo, hi = max(offset, number * c), min(offset + length, (number + 1) * c)
            if data is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = memoryview(data)[lo - number * c : hi - number * c]

    def _read_large(self, offset: int, buf: memoryview) -> None:
        """Large reads (exports, sequential NBD reads): neighbouring chunks of a pack are read
        together (``catalog.read.coalesce``) and decoded on threads (pack reads, zstd and BLAKE3
        release the GIL). Not cached: they would only evict small reads'."""
        c, length = self._chunk, len(buf)
        first, last = offset // c, (offset + length - 1) // c
        m = self._spans.rows(first, last)
        self._check_indexed(m, np.arange(len(m.numbers)))
        self._zero_holes(m.numbers, first, last, offset, buf)
        order = np.lexsort((m.offset, m.pack))
        runs = coalesce(
            m.pack[order].tolist(), m.offset[order].tolist(), m.stored_len[order].tolist()
        )
        tasks = [order[a:b].tolist() for a, b in runs]

        def run(task: list[int]) -> None:
            base = int(m.offset[task[0]])
            top = max(int(m.offset[k] + m.stored_len[k]) for k in task)
            name = pack_name(self._spans.pack_names[int(m.pack[task[0]])])
            blob = self._storage.read(name, base, top - base)
            for k in task:
                number = int(m.numbers[k])
                at = int(m.offset[k]) - base
                data = self._decode(m, k, blob[at : at + int(m.stored_len[k])])
                a, b = max(offset, number * c), min(offset + length, (number + 1) * c)
                buf[a - offset : b - offset] = memoryview(data)[a - number * c : b - number * c]

        for _ in self._pool().map(run, tasks):
            pass

    def _zero_holes(
        self, numbers: np.ndarray, first: int, last: int, offset: int, buf: memoryview
    ) -> None:
        """Zeros where chunks ``first`` to ``last`` have no data (``numbers``: those that do)."""
        c, end = self._chunk, offset + len(buf)
        for lo, hi in number_runs(np.setdiff1d(np.arange(first, last + 1), numbers)):
            a, b = max(offset, lo * c), min(end, hi * c)
            buf[a - offset : b - offset] = bytes(b - a)

    def _check_indexed(self, m: ChunkMap, rows: np.ndarray) -> None:
        """A chunk that no index segment names is corruption (the point is damaged)."""
        bad = rows[m.pack[rows] < 0]
        if len(bad):
            i = int(bad[0])
            raise CorruptionError(
                f"recovery point {self.point.id} at offset {int(m.numbers[i]) * self._chunk}: "
                f"chunk {m.ids[i].tobytes().hex()[:16]} is in no index segment"
            )

    def _decode(self, m: ChunkMap, k: int, blob: bytes) -> bytes:
        where = f"recovery point {self.point.id} at offset {int(m.numbers[k]) * self._chunk}"
        return decode_chunk(
            blob,
            int(m.codec[k]),
            int(m.raw_len[k]),
            m.ids[k].tobytes(),
            where,
            self._storage.sealer,
        )

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="comb-drive")
            return self._threads

    def _chunk_data(self, number: int) -> bytes | None:
        """The plain bytes of chunk ``number``, or None for a zero chunk."""
        with self._lock:
            cached = self._cache.get(number)
            if cached is not None:
                self._cache.move_to_end(number)
        if cached is not None:
            return cached
        m = self._spans.span(number // self._spans.span_chunks)
        k = int(np.searchsorted(m.numbers, number))
        if k == len(m.numbers) or m.numbers[k] != number:
            return None
        self._check_indexed(m, np.array([k]))
        name = pack_name(self._spans.pack_names[int(m.pack[k])])
        blob = self._storage.read(name, int(m.offset[k]), int(m.stored_len[k]))
        data = self._decode(m, k, blob)
        with self._lock:
            self._cache[number] = data
            if len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data
