"""The backup stages: reader -> chunker -> deduplicator -> compressor -> writer.

Each is a small Ray-free class over Arrow tables. They are meant to be fused in one worker
(thread or actor) so that bulk bytes are read, hashed, compressed and written in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from catalog.store.chunks import encode_chunks
from catalog.store.index import array_to_ids, ids_to_array, sealed_to_table
from catalog.store.locations import storage_at
from catalog.store.packs import DEFAULT_PACK_TARGET_BYTES, PackWriter
from catalog.store.parity import ParityGeometry
from catalog.store.sealing import PLAIN, Sealer
from stages.base import Ports, Stage
from stages.schemas import (
    CHUNKS,
    COMPRESSED,
    DEDUPED,
    EXTENTS,
    INDEX_PORT,
    INDEX_ROWS,
    MAIN_PORT,
    RAW,
    WRITTEN,
)
from stages.sources.image import Source, SourceHandle

ZERO_ID = bytes(32)


def _single(col: pa.ChunkedArray) -> pa.Array:
    """One contiguous array without copying when the column already is one chunk."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, memoryview]:
    """(offsets, data) of a large_binary array, zero-copy."""
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int64, len(arr) + 1, arr.offset * 8)
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")  # type: ignore[arg-type]
    return offs, data


def _large_binary(n: int, offsets: np.ndarray, data: pa.Buffer) -> pa.Array:
    return pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets.astype(np.int64)), data]
    )


class Reader(Stage):
    """Reads chunk-aligned extents of the source into one reused buffer (no copy afterwards)."""

    name = "reader"
    input_schema = EXTENTS
    output_schema = RAW

    def __init__(self, source: Source, max_batch_bytes: int) -> None:
        self.source = source
        self.max_batch_bytes = max_batch_bytes
        self._src: SourceHandle | None = None
        self._buf: np.ndarray | None = None
        self.bytes_read = 0

    def setup(self) -> None:
        self._src = self.source.open()
        self._buf = np.empty(self.max_batch_bytes, np.uint8)

    def process(self, batch: pa.Table) -> Ports:
        assert self._src is not None and self._buf is not None
        offs = batch.column("offset").to_numpy()
        lens = batch.column("length").to_numpy()
        total = int(lens.sum())
        if total > len(self._buf):
            self._buf = np.empty(total, np.uint8)
        view = memoryview(self._buf)  # type: ignore[arg-type]
        parts = []
        pos = 0
        for off, length in zip(offs.tolist(), lens.tolist(), strict=True):
            parts.append((view[pos : pos + length], off))
            pos += length
        read_many = getattr(self._src, "read_many", None)
        if read_many is not None and len(parts) > 1:
            read_many(parts)  # a remote source overlaps the requests (latency, not bandwidth)
        else:
            for part, off in parts:
                self._src.read_into(part, off)
        self.bytes_read += total
        starts = np.zeros(len(offs) + 1, np.int64)
        np.cumsum(lens, out=starts[1:])
        data = _large_binary(len(offs), starts, pa.py_buffer(self._buf[:total]))
        return {MAIN_PORT: pa.table([pa.array(offs, pa.int64()), data], schema=RAW)}

    def teardown(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None
        self._buf = None


class Chunker(Stage):
    """Cuts fixed, aligned chunks; recognises all-zero chunks; hashes the others (BLAKE3)."""

    name = "chunker"
    input_schema = RAW
    output_schema = CHUNKS

    def __init__(self, chunk_size: int, sealer: Sealer = PLAIN) -> None:
        self.chunk_size = chunk_size
        self.sealer = sealer  # an encrypted repository's chunk ids are keyed BLAKE3
        self._cpu = {"zero check": 0.0, "hash": 0.0}

    def cpu_parts(self) -> dict[str, float]:
        return dict(self._cpu)

    def process(self, batch: pa.Table) -> Ports:
        c = self.chunk_size
        col = _single(batch.column("data"))
        bufs = col.buffers()
        row_starts = np.frombuffer(bufs[1], np.int64, len(col) + 1, col.offset * 8)
        raw = np.frombuffer(bufs[2], np.uint8)
        offsets: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for off, a, b in zip(
            batch.column("offset").to_numpy().tolist(),
            row_starts[:-1].tolist(),
            row_starts[1:].tolist(),
            strict=True,
        ):
            n = b - a
            k = np.arange(0, n, c, dtype=np.int64)
            starts.append(a + k)
            offsets.append(off + k)
            lengths.append(np.minimum(c, n - k))
        st = np.concatenate(starts) if starts else np.empty(0, np.int64)
        ln = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        of = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        t0 = time.thread_time()
        zero = self._zero_mask(raw, st, ln)
        t1 = time.thread_time()
        self._cpu["zero check"] += t1 - t0
        ids = np.zeros((len(st), 32), np.uint8)
        todo = np.flatnonzero(~zero)
        if len(todo):
            # Per-chunk Python work is kept to one call: plain ints, one join, one assignment.
            mv = memoryview(bufs[2])  # type: ignore[arg-type]
            hasher = self.sealer.chunk_hasher
            digests = b"".join(
                hasher(mv[s : s + n]).digest()
                for s, n in zip(st[todo].tolist(), ln[todo].tolist(), strict=True)
            )
            ids[todo] = np.frombuffer(digests, np.uint8).reshape(len(todo), 32)
        self._cpu["hash"] += time.thread_time() - t1
        ends = np.append(st, st[-1] + ln[-1] if len(st) else 0)
        table = pa.table(
            [
                pa.array(of, pa.int64()),
                pa.array(ln.astype(np.int32), pa.int32()),
                array_to_ids(ids),
                pa.array(zero, pa.bool_()),
                _large_binary(len(st), ends, bufs[2]),
            ],
            schema=CHUNKS,
        )
        return {MAIN_PORT: table}

    def _zero_mask(self, raw: np.ndarray, st: np.ndarray, ln: np.ndarray) -> np.ndarray:
        """True where a chunk is all zeros; full-size chunks vectorised, memory-speed."""
        zero = np.zeros(len(st), bool)
        c = self.chunk_size
        full = ln == c
        if full.any() and c % 8 == 0:
            # Chunks of one batch are contiguous in the buffer: view them as (n, c/8) words.
            idx = np.flatnonzero(full)
            first = int(st[idx[0]])
            contiguous = np.array_equal(st[idx], first + (idx - idx[0]) * c)
            if contiguous:
                words = raw[first : first + len(idx) * c].view(np.uint64).reshape(len(idx), c // 8)
                zero[idx] = ~words.any(axis=1)
            else:
                for i in idx.tolist():
                    s = int(st[i])
                    zero[i] = not raw[s : s + c].view(np.uint64).any()
        for i in np.flatnonzero(~full).tolist():
            s = int(st[i])
            zero[i] = not raw[s : s + int(ln[i])].any()
        return zero


class IndexClient(Protocol):
    """The dedup decision: which of these ids must this caller store (and claims them)."""

    def claim(self, ids: np.ndarray) -> np.ndarray: ...


class Deduplicator(Stage):
    """Asks the dedup index which non-zero chunks are new; only ids cross to the index."""

    name = "deduplicator"
    input_schema = CHUNKS
    output_schema = DEDUPED

    def __init__(self, index: IndexClient) -> None:
        self.index = index

    def process(self, batch: pa.Table) -> Ports:
        zero = batch.column("zero").to_numpy(zero_copy_only=False)
        new = np.zeros(batch.num_rows, bool)
        todo = np.flatnonzero(~zero)
        if len(todo):
            ids = ids_to_array(batch.column("chunk_id"))[todo]
            new[todo] = self.index.claim(np.ascontiguousarray(ids))
        cols = batch.columns
        table = pa.table([*cols[:4], pa.array(new, pa.bool_()), cols[4]], schema=DEDUPED)
        return {MAIN_PORT: table}


class Compressor(Stage):
    """zstd per new chunk (raw when that does not help), then AES-256-GCM sealing with the chunk
    id as associated data when the repository is encrypted."""

    name = "compressor"
    input_schema = DEDUPED
    output_schema = COMPRESSED

    def __init__(self, level: int, sealer: Sealer = PLAIN) -> None:
        self.level = level
        self.sealer = sealer
        self._cpu = {"compress": 0.0, "seal": 0.0}

    def cpu_parts(self) -> dict[str, float]:
        return dict(self._cpu)

    def process(self, batch: pa.Table) -> Ports:
        new = batch.column("new").to_numpy(zero_copy_only=False)
        codecs = [0] * batch.num_rows
        blobs: list[bytes | memoryview | None] = [None] * batch.num_rows
        if new.any():
            offs, raw = _binary_parts(_single(batch.column("data")))
            idx = np.flatnonzero(new)
            todo = idx.tolist()
            t0 = time.thread_time()
            done = encode_chunks(raw, offs[idx], offs[idx + 1] - offs[idx], self.level)
            for i, codec, blob in zip(todo, *done, strict=True):
                codecs[i], blobs[i] = codec, blob
            self._cpu["compress"] += time.thread_time() - t0
        cols = batch.columns
        column = _blob_column(blobs, self.sealer, batch.column("chunk_id"), self._cpu)
        table = pa.table([*cols[:5], pa.array(codecs, pa.int8()), column], schema=COMPRESSED)
        return {MAIN_PORT: table}


def _blob_column(
    blobs: list[bytes | memoryview | None],
    sealer: Sealer = PLAIN,
    ids: pa.ChunkedArray | None = None,
    cpu: dict[str, float] | None = None,
) -> pa.Array:
    """A large_binary column from blobs (None = null): plain ones joined in one call; in an
    encrypted repository each is sealed straight into its place (no sealed copy to join)."""
    extra = sealer.overhead
    lengths = np.fromiter((0 if b is None else len(b) + extra for b in blobs), np.int64, len(blobs))
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.fromiter((b is not None for b in blobs), bool, len(blobs))
    if sealer.encrypted and valid.any():
        t0 = time.thread_time()
        assert ids is not None
        cids = ids_to_array(ids)
        out = np.empty(int(offsets[-1]), np.uint8)
        view = memoryview(out)
        seal_into = sealer.seal_blob_into
        at = offsets.tolist()
        for i, blob in enumerate(blobs):
            if blob is not None:
                seal_into(blob, cids[i].tobytes(), view[at[i] : at[i + 1]])
        data = pa.py_buffer(out)
        if cpu is not None:
            cpu["seal"] += time.thread_time() - t0
    else:
        data = pa.py_buffer(b"".join(b for b in blobs if b is not None))
    mask = pa.array(valid).buffers()[1] if not valid.all() else None
    return pa.Array.from_buffers(
        pa.large_binary(),
        len(blobs),
        [mask, pa.py_buffer(offsets), data],
        int(len(blobs) - valid.sum()),
    )


@dataclass(frozen=True)
class PackTarget:
    """Where a writer puts its packs (a local repository path for now)."""

    repo_path: str
    pack_target_bytes: int = DEFAULT_PACK_TARGET_BYTES
    sealer: Sealer = PLAIN
    parity: ParityGeometry | None = None  # the repository's (config.json "parity")


class Writer(Stage):
    """Appends new chunks to this worker's own packs; emits index rows as packs seal."""

    name = "writer"
    input_schema = COMPRESSED
    output_schema = WRITTEN
    side_schemas = {INDEX_PORT: INDEX_ROWS}

    def __init__(self, target: PackTarget) -> None:
        self.target = target
        self._packs: PackWriter | None = None

    def setup(self) -> None:
        storage = storage_at(self.target.repo_path, self.target.sealer)
        self._packs = PackWriter(storage, self.target.pack_target_bytes, self.target.parity)

    def process(self, batch: pa.Table) -> Ports:
        assert self._packs is not None
        new = batch.column("new").to_numpy(zero_copy_only=False)
        stored = np.zeros(batch.num_rows, np.int32)
        out: Ports = {}
        idx = np.flatnonzero(new)
        if len(idx):
            boffs, bdata = _binary_parts(_single(batch.column("blob")))
            ids_arr = ids_to_array(batch.column("chunk_id"))
            lengths = batch.column("length").to_numpy()
            codecs = batch.column("codec").to_numpy()
            rows = idx.tolist()
            stored[idx] = (boffs[idx + 1] - boffs[idx]).astype(np.int32)
            sealed = self._packs.add_many(
                [ids_arr[i].tobytes() for i in rows],
                [bdata[boffs[i] : boffs[i + 1]] for i in rows],
                [int(lengths[i]) for i in rows],
                [int(codecs[i]) for i in rows],
            )
            if sealed:
                out[INDEX_PORT] = sealed_to_table(sealed)
        cols = batch.columns
        out[MAIN_PORT] = pa.table([*cols[:5], pa.array(stored, pa.int32())], schema=WRITTEN)
        return out

    def cpu_parts(self) -> dict[str, float]:
        return {"parity": self._packs.parity_cpu_s if self._packs is not None else 0.0}

    def flush(self) -> Ports:
        assert self._packs is not None
        sealed = self._packs.close()
        return {INDEX_PORT: sealed_to_table(sealed)} if sealed else {}

    def teardown(self) -> None:
        if self._packs is not None:
            self._packs.abort()
            self._packs = None


def backup_stages(
    source: Source,
    chunk_size: int,
    max_batch_bytes: int,
    index: IndexClient,
    zstd_level: int,
    target: PackTarget,
) -> list[Stage]:
    """The backup stage graph, in order."""
    return [
        Reader(source, max_batch_bytes),
        Chunker(chunk_size, target.sealer),
        Deduplicator(index),
        Compressor(zstd_level, target.sealer),
        Writer(target),
    ]
