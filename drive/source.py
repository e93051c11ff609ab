"""A recovery point as a block source: random reads of its full image, through its manifest
and the chunk index, every chunk checked against its BLAKE3 id as it is read.

The point's data chunks (number and id) and their locations are loaded once: about 100 bytes per
64 KiB chunk of data in the point (1.6 MiB per GiB), bounded by the disk, not the repository.
A small LRU cache of decoded chunks serves neighbouring reads (formats read a chunk in pieces).
Imports catalog only (no Ray, no pipeline).
"""

from __future__ import annotations

import os
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


class PointSource:
    """``drive.image.BlockSource`` over one committed recovery point."""

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
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._threads: ThreadPoolExecutor | None = None

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
        # Large reads (exports, sequential NBD reads) fetch their chunks on threads: pack
        # reads, zstd and BLAKE3 release the GIL.
        if len(numbers) >= _PARALLEL_CHUNKS:
            datas = list(self._pool().map(self._fetch, numbers))
        else:
            datas = [self._chunk_data(n) for n in numbers]
        for number, data in zip(numbers, datas, strict=True):
            if data is not None:
                lo, hi = max(offset, number * c), min(offset + length, (number + 1) * c)
                out[lo - offset : hi - offset] = data[lo - number * c : hi - number * c]
        return bytes(out)

    def _pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="comb-drive")
        return self._threads

    def _fetch(self, number: int) -> bytes | None:
        """A chunk for a large read: not cached (it would only evict what small reads use)."""
        return self._chunk_data(number, cache=False)

    def _chunk_data(self, number: int, cache: bool = True) -> bytes | None:
        """The plain bytes of chunk ``number``, or None for a zero chunk."""
        cached = self._cache.get(number)
        if cached is not None:
            if cache:
                self._cache.move_to_end(number)
            return cached
        i = int(np.searchsorted(self._numbers, number))
        if i == len(self._numbers) or self._numbers[i] != number:
            return None
        cid = self._ids[i].tobytes()
        key = self._keys[i]
        j = int(np.searchsorted(self._loc_keys, key))
        where = f"recovery point {self.point.id} at offset {number * self._chunk}"
        if j == len(self._loc_keys) or self._loc_keys[j] != key:
            raise CorruptionError(f"{where}: chunk {cid.hex()[:16]} is in no index segment")
        blob = self.repo.storage.read(
            pack_name(str(self._loc_pack[j])),
            int(self._loc["offset"][j]),
            int(self._loc["stored_len"][j]),
        )
        data = decode_chunk(
            blob, int(self._loc["codec"][j]), int(self._loc["raw_len"][j]), cid, where
        )
        if cache:
            self._cache[number] = data
            if len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data
