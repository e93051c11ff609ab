"""A recovery point as a block source: random reads of its full image, through its manifest
and the chunk index, every chunk checked against its BLAKE3 id as it is read.

The point's data chunks (number and id) and their locations are loaded once: about 100 bytes per
64 KiB chunk of data in the point (1.6 MiB per GiB), bounded by the disk, not the repository.
A small LRU cache of decoded chunks serves neighbouring reads (formats read a chunk in pieces).
Imports catalog only (no Ray, no pipeline).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from catalog.chunks import decode_chunk
from catalog.errors import CorruptionError
from catalog.index import id_keys, ids_to_array, load_locations
from catalog.packs import pack_name
from catalog.points import RecoveryPoint
from catalog.repo import Repository

DEFAULT_CACHE_CHUNKS = 256  # 16 MiB of 64 KiB chunks
READ_THREADS = max(4, 2 * (os.cpu_count() or 2))
_PARALLEL_CHUNKS = 8  # reads of at least this many chunks go to the threads
_READ_BYTES = 16 << 20  # one pack read at most (bench backup: restore's coalescing figure)
_GAP_BYTES = 64 << 10  # read through gaps this small rather than issue another read


class PointSource:
    """``drive.image.BlockSource`` over one committed recovery point; safe to read from
    several threads at once."""

    def __init__(
        self, repo: Repository, point: RecoveryPoint, cache_chunks: int = DEFAULT_CACHE_CHUNKS
    ) -> None:
        self.repo = repo
        self.point = point
        self._chunk = point.chunk_size
        manifest = repo.manifest(point)
        numbers, ids = [], []
        for ref in manifest.refs():
            leaf = manifest.leaf(ref)
            numbers.append(ref.leaf_no * point.leaf_chunks + leaf.slots.astype(np.int64))
            ids.append(leaf.ids)
        self._numbers = np.concatenate(numbers) if numbers else np.empty(0, np.int64)
        self._ids = np.concatenate(ids) if ids else np.empty((0, 32), np.uint8)
        self._keys = id_keys(self._ids)
        locations = load_locations(repo.storage, np.unique(self._keys))
        loc_keys = id_keys(ids_to_array(locations.column("chunk_id")))
        order = np.argsort(loc_keys)
        self._loc_keys = loc_keys[order]
        self._loc = {
            name: locations.column(name).to_numpy(zero_copy_only=False)[order]
            for name in ("offset", "stored_len", "raw_len", "codec")
        }
        self._loc_pack = np.array(locations.column("pack").to_pylist(), object)[order]
        _, self._loc_pack_code = np.unique(self._loc_pack.astype(str), return_inverse=True)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._threads: ThreadPoolExecutor | None = None
        # Readers on several threads (NBD connections, FUSE requests) share one source: the
        # cache and the lazily made pool are guarded; reads themselves run in parallel.
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.point.size

    @property
    def granularity(self) -> int:
        return self._chunk

    def extents(self) -> list[tuple[int, int]]:
        """Runs of data chunks (zero chunks are holes), clipped to the disk's end."""
        n = self._numbers
        if not len(n):
            return []
        cuts = np.flatnonzero(np.diff(n) != 1) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(n)]])
        out = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            lo = int(n[s]) * self._chunk
            hi = min(self.size, (int(n[e - 1]) + 1) * self._chunk)
            out.append((lo, hi - lo))
        return out

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
        lo = int(np.searchsorted(self._numbers, offset // c))
        hi = int(np.searchsorted(self._numbers, (offset + length - 1) // c, side="right"))
        rows = np.arange(lo, hi)
        loc = self._locate(rows)
        order = np.lexsort((self._loc["offset"][loc], self._loc_pack_code[loc]))
        tasks: list[list[int]] = []
        end = -1
        for k in order.tolist():
            j = int(loc[k])
            start, n = int(self._loc["offset"][j]), int(self._loc["stored_len"][j])
            first = int(loc[tasks[-1][0]]) if tasks else -1
            if (
                not tasks
                or self._loc_pack_code[j] != self._loc_pack_code[first]
                or start > end + _GAP_BYTES
                or start + n - int(self._loc["offset"][first]) > _READ_BYTES
            ):
                tasks.append([])
            tasks[-1].append(k)
            end = max(end, start + n) if len(tasks[-1]) > 1 else start + n

        def run(task: list[int]) -> None:
            js = [int(loc[k]) for k in task]
            base = int(self._loc["offset"][js[0]])
            top = max(int(self._loc["offset"][j] + self._loc["stored_len"][j]) for j in js)
            blob = self.repo.storage.read(pack_name(str(self._loc_pack[js[0]])), base, top - base)
            for k, j in zip(task, js, strict=True):
                number = int(self._numbers[rows[k]])
                at = int(self._loc["offset"][j]) - base
                data = self._decode(rows[k], j, blob[at : at + int(self._loc["stored_len"][j])])
                a, b = max(offset, number * c), min(offset + length, (number + 1) * c)
                out[a - offset : b - offset] = data[a - number * c : b - number * c]

        for _ in self._pool().map(run, tasks):
            pass

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        """Index of each chunk's location; a chunk no index segment names is corruption."""
        keys = self._keys[rows]
        j = np.minimum(np.searchsorted(self._loc_keys, keys), max(len(self._loc_keys) - 1, 0))
        bad = (
            np.flatnonzero(self._loc_keys[j] != keys)
            if len(self._loc_keys)
            else np.arange(len(rows))
        )
        if len(bad):
            i = int(rows[bad[0]])
            raise CorruptionError(
                f"recovery point {self.point.id} at offset {int(self._numbers[i]) * self._chunk}: "
                f"chunk {self._ids[i].tobytes().hex()[:16]} is in no index segment"
            )
        return j

    def _decode(self, row: int, j: int, blob: bytes) -> bytes:
        number = int(self._numbers[row])
        where = f"recovery point {self.point.id} at offset {number * self._chunk}"
        return decode_chunk(
            blob,
            int(self._loc["codec"][j]),
            int(self._loc["raw_len"][j]),
            self._ids[row].tobytes(),
            where,
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
        i = int(np.searchsorted(self._numbers, number))
        if i == len(self._numbers) or self._numbers[i] != number:
            return None
        j = int(self._locate(np.array([i]))[0])
        blob = self.repo.storage.read(
            pack_name(str(self._loc_pack[j])),
            int(self._loc["offset"][j]),
            int(self._loc["stored_len"][j]),
        )
        data = self._decode(i, j, blob)
        if cache:
            with self._lock:
                self._cache[number] = data
                if len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        return data
