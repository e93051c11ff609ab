"""Block lists: reading part of a large metadata file, checked, without reading all of it.

Every repository file is named by the BLAKE3 of its bytes, so checking a file against its name
means reading all of it. A served recovery point's first read needs one leaf of a leaves file
and a few rows of an index segment, but a full backup of a 2 TiB disk writes about 1 GiB of
each. So the backup that writes a leaves file or an index segment also writes its **block
list** (``<prefix>/<file id>.blocks``, FORMAT.md 7.1): the BLAKE3 of every 1 MiB block of the
file and, for a segment, the span of disk offsets at which the backup read the chunks of every
4,096 rows. The point document names the block list's own BLAKE3 (``blocks``), so a reader
that trusts the point document trusts the list, and through it each block it reads
(``VerifiedFile``); a segment's ranges tell which rows hold the chunks of a stretch of disk
without reading its id column.

This module prints nothing.
"""

from __future__ import annotations

import io
import struct
from collections import OrderedDict
from dataclasses import dataclass

import blake3
import numpy as np

from catalog.errors import CorruptionError
from catalog.store.storage import Storage

BLOCK_BYTES = 1 << 20
RANGE_ROWS = 4096  # rows of a segment per range of disk offsets
BLOCKS_MAGIC = b"COMBBLK1"
BLOCKS_SUFFIX = ".blocks"  # <prefix>/<file id>.blocks beside <prefix>/<file id>.parquet
BLOCKS_DOC_KIND = "blocks"  # associated data of a sealed block list (encrypted repositories)
NO_POSITION = -1  # a range none of whose rows has a known disk offset
_TRAILER = struct.Struct("<QIIQI8s")  # file bytes, block bytes, blocks, rows, range rows, magic
# Blocks kept per open file: enough for a read across a block boundary (readers keep the row
# groups they decode); a leaves file checked whole was held in memory entire.
_CACHED_BLOCKS = 2


def block_list_name(name: str) -> str:
    """The block list beside a ``.parquet`` file."""
    return name[: -len(".parquet")] + BLOCKS_SUFFIX


def parquet_of(block_list: str) -> str:
    """The ``.parquet`` file a block list belongs to."""
    return block_list[: -len(BLOCKS_SUFFIX)] + ".parquet"


class BlockHasher:
    """BLAKE3 of each ``BLOCK_BYTES`` block of a stream, as it is written."""

    def __init__(self, block_bytes: int | None = None) -> None:
        self.block_bytes = block_bytes or BLOCK_BYTES
        self._h = blake3.blake3()
        self._filled = 0
        self.size = 0
        self.hashes: list[bytes] = []

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.block_bytes - self._filled)
            self._h.update(data[:take])
            self._filled += take
            self.size += take
            data = data[take:]
            if self._filled == self.block_bytes:
                self.hashes.append(self._h.digest())
                self._h, self._filled = blake3.blake3(), 0

    def finish(self) -> list[bytes]:
        if self._filled:
            self.hashes.append(self._h.digest())
            self._h, self._filled = blake3.blake3(), 0
        return self.hashes


class RangeBuilder:
    """Per ``RANGE_ROWS`` rows of a segment, in row order: the lowest and highest disk offset
    at which the backup read the chunks of those rows. A backup stores chunks about in the
    order it reads them, so the rows a stretch of disk needs sit in a few ranges."""

    def __init__(self) -> None:
        self.rows = 0
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, positions: np.ndarray) -> None:
        """int64 disk offsets of the next rows (``NO_POSITION`` where not known)."""
        while len(positions):
            filled = self.rows % RANGE_ROWS
            if filled == 0:
                self._lo.append(NO_POSITION)
                self._hi.append(NO_POSITION)
            take = positions[: RANGE_ROWS - filled]
            known = take[take != NO_POSITION]
            if len(known):
                lo, hi = int(known.min()), int(known.max())
                self._lo[-1] = lo if self._lo[-1] == NO_POSITION else min(self._lo[-1], lo)
                self._hi[-1] = max(self._hi[-1], hi)
            self.rows += len(take)
            positions = positions[len(take) :]

    def finish(self) -> bytes:
        pairs = np.array([self._lo, self._hi], np.int64).T.reshape(-1)
        return pairs.astype("<i8").tobytes()


def encode(
    hashes: list[bytes], size: int, block_bytes: int, ranges: bytes = b"", rows: int = 0
) -> bytes:
    """A block list: position ranges (16 bytes each), block hashes, then the trailer."""
    trailer = _TRAILER.pack(size, block_bytes, len(hashes), rows, RANGE_ROWS, BLOCKS_MAGIC)
    return ranges + b"".join(hashes) + trailer


@dataclass(frozen=True)
class BlockList:
    size: int
    block_bytes: int
    hashes: list[bytes]
    rows: int  # rows the ranges cover (0: none)
    range_rows: int
    ranges: np.ndarray  # (k, 2) int64: lowest and highest disk offset of each range's rows

    @classmethod
    def parse(cls, data: bytes, where: str) -> BlockList:
        try:
            if len(data) < _TRAILER.size:
                raise ValueError("too short")
            size, block, n, rows, per, magic = _TRAILER.unpack(data[-_TRAILER.size :])
            if magic != BLOCKS_MAGIC or block < 1 or per < 1:
                raise ValueError("bad trailer")
            if n != -(-size // block):
                raise ValueError("block count does not match the size")
            end = len(data) - _TRAILER.size
            start = end - 32 * n
            k = -(-rows // per)
            if start != 16 * k:
                raise ValueError("sizes do not add up")
            hashes = [data[i : i + 32] for i in range(start, end, 32)]
            ranges = np.frombuffer(data, "<i8", 2 * k).reshape(k, 2).astype(np.int64)
        except (ValueError, struct.error) as err:
            raise CorruptionError(f"{where} is not a valid block list ({err})") from None
        return cls(size, block, hashes, rows, per, ranges)

    def rows_near(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Row ranges [first, end) holding chunks the backup read within disk bytes [lo, hi)."""
        r = self.ranges
        hit = np.flatnonzero((r[:, 0] != NO_POSITION) & (r[:, 0] < hi) & (r[:, 1] >= lo))
        per = self.range_rows
        return [(k * per, min((k + 1) * per, self.rows)) for k in hit.tolist()]


class VerifiedFile(io.RawIOBase):
    """A read-only view of a repository file whose every block is checked against its block
    list before any byte of it is returned (the last two blocks kept). A failed check raises
    CorruptionError (pyarrow passes it through to its caller)."""

    def __init__(self, storage: Storage, name: str, blocks: BlockList) -> None:
        super().__init__()
        self._storage, self._name = storage, name
        self._where = storage.local_path(name) or name
        self._blocks = blocks
        if storage.size(name) != blocks.size:
            raise CorruptionError(f"{self._where} is not the size its block list gives (damaged)")
        self._pos = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._blocks.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _block(self, b: int) -> bytes:
        got = self._cache.get(b)
        if got is not None:
            self._cache.move_to_end(b)
            return got
        size = self._blocks.block_bytes
        data = self._storage.read(self._name, b * size, min(size, self._blocks.size - b * size))
        self.bytes_read += len(data)
        if blake3.blake3(data).digest() != self._blocks.hashes[b]:
            raise CorruptionError(
                f"{self._where}: block {b} does not match its block list (damaged)"
            )
        self._cache[b] = data
        while len(self._cache) > _CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return data

    def read(self, n: int | None = -1) -> bytes:
        end = self._blocks.size if n is None or n < 0 else min(self._blocks.size, self._pos + n)
        size = self._blocks.block_bytes
        parts = []
        while self._pos < end:
            b = self._pos // size
            data = self._block(b)
            lo = self._pos - b * size
            hi = min(len(data), end - b * size)
            parts.append(data[lo:hi])
            self._pos += hi - lo
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)
