"""The chunk index: chunk id -> (pack, offset, stored length, raw length, codec).

Stored as immutable Parquet segments under ``index/``, one per backup (named by content). The
repository's index is the union of all segments; a chunk may appear more than once (two
concurrent backups may both store it) and any copy is valid.

``DedupIndex`` is the in-memory membership structure a backup consults: sorted 16-byte id
prefixes in one numpy array (16 bytes per chunk), plus this job's own new ids. The full 32-byte
id is what manifests and the index record; a 128-bit prefix collision would make the new chunk
look stored, and the restore/verify id check would then report it (never silent).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CorruptionError, RepositoryError
from catalog.store import blocks
from catalog.store.blocks import NO_POSITION, RangeBuilder
from catalog.store.condemned import condemned_packs
from catalog.store.packs import SealedPack
from catalog.store.parquet_io import ParquetStreamWriter, read_parquet
from catalog.store.storage import Storage

INDEX_PREFIX = "index"
_REPAIR_HINT = "`comb repair index` rebuilds the index from the packs"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("chunk_id", pa.binary(32), nullable=False),
        pa.field("pack", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("stored_len", pa.int32(), nullable=False),
        pa.field("raw_len", pa.int32(), nullable=False),
        pa.field("codec", pa.int8(), nullable=False),
    ]
)
DEDUP_KEY_BYTES = 16


def sealed_to_table(sealed: Iterable[SealedPack]) -> pa.Table:
    ids: list[bytes] = []
    packs: list[str] = []
    offs: list[int] = []
    slens: list[int] = []
    rlens: list[int] = []
    codecs: list[int] = []
    for sp in sealed:
        ids += sp.chunk_ids
        packs += [sp.pack_id] * len(sp.chunk_ids)
        offs += sp.offsets
        slens += sp.stored_lens
        rlens += sp.raw_lens
        codecs += sp.codecs
    return pa.table(
        [
            pa.array(ids, pa.binary(32)),
            pa.array(packs, pa.string()),
            pa.array(offs, pa.int64()),
            pa.array(slens, pa.int32()),
            pa.array(rlens, pa.int32()),
            pa.array(codecs, pa.int8()),
        ],
        schema=INDEX_SCHEMA,
    )


class IndexSegmentWriter:
    """Streams the index rows of one backup into one new segment."""

    def __init__(self, storage: Storage) -> None:
        self._writer = ParquetStreamWriter(
            storage,
            INDEX_SCHEMA,
            # Row groups of at most a position range's rows (pyarrow also cuts one at every
            # write): a reader near a stretch of disk reads about the rows of its ranges.
            row_group_rows=blocks.RANGE_ROWS,
            delta_columns=("offset", "stored_len", "raw_len", "codec"),
            dictionary_columns=("pack",),
            block_list=True,
        )
        self._ranges = RangeBuilder()
        self.packs: set[str] = set()  # the packs the rows name
        # Chunks this backup read and will store, not yet in a row: their disk offsets, until
        # their pack is sealed (so at most the chunks of the packs being filled).
        self._pending_keys = np.empty(0, np.uint64)
        self._pending_ids = np.empty((0, 32), np.uint8)
        self._pending_at = np.empty(0, np.int64)

    def read_at(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        """The disk offsets at which the backup read chunks it stores ((n, 32) ids): noted
        for the rows ``add`` gets later, for the segment's block list (``catalog.store.blocks``)."""
        self._pending_ids = np.concatenate([self._pending_ids, ids])
        self._pending_at = np.concatenate([self._pending_at, offsets.astype(np.int64)])
        self._pending_keys = np.ascontiguousarray(self._pending_ids[:, :8]).view("<u8").ravel()

    def add(self, table: pa.Table) -> None:
        table = table.cast(INDEX_SCHEMA)
        self._writer.write(table)
        if not table.num_rows:
            return
        self.packs.update(pc.unique(table.column("pack")).to_pylist())
        ids = ids_to_array(table.column("chunk_id"))
        at = np.full(len(ids), NO_POSITION, np.int64)
        if len(self._pending_keys):
            keys = np.ascontiguousarray(ids[:, :8]).view("<u8").ravel()
            order = np.argsort(self._pending_keys, kind="stable")
            pos = np.minimum(np.searchsorted(self._pending_keys[order], keys), len(order) - 1)
            cand = order[pos]
            same = np.all(self._pending_ids[cand] == ids, axis=1)
            at[same] = self._pending_at[cand[same]]
            keep = np.ones(len(self._pending_keys), bool)
            keep[cand[same]] = False
            self._pending_ids = self._pending_ids[keep]
            self._pending_at = self._pending_at[keep]
            self._pending_keys = self._pending_keys[keep]
        self._ranges.add(at)

    @property
    def blocks_id(self) -> str | None:
        """The committed segment's block list (``catalog.store.blocks``)."""
        return self._writer.blocks_id

    @property
    def rows(self) -> int:
        return self._writer.rows

    def commit(self) -> tuple[str | None, int]:
        if self._writer.rows == 0:
            self._writer.abort()
            return None, 0
        return self._writer.commit(INDEX_PREFIX, self._ranges.finish(), self._ranges.rows)

    def abort(self) -> None:
        self._writer.abort()


def segment_names(storage: Storage) -> list[str]:
    return [n for n in storage.list(INDEX_PREFIX) if n.endswith(".parquet")]


def read_segments(storage: Storage, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """Every index segment (name, table), read. A segment a prune removed between the listing
    and the read is passed over and the listing taken again: a segment it rewrote was
    committed before the old one went, so the new listing holds its kept rows."""
    done: set[str] = set()
    for _ in range(8):
        vanished = False
        for name in segment_names(storage):
            if name in done:
                continue
            with repair_hint():
                try:
                    table = read_parquet(storage, name, columns)
                except RepositoryError:
                    if storage.exists(name):
                        raise
                    vanished = True
                    continue
            done.add(name)
            yield name, table
        if not vanished:
            return
    raise RepositoryError("the index segments keep changing while they are read; try again")


@contextmanager
def repair_hint() -> Iterator[None]:
    """A damaged or missing index segment names the way out (it stops every backup and every
    restore that needs it, and ``repair index`` rebuilds it from the packs)."""
    try:
        yield
    except (CorruptionError, RepositoryError) as err:
        if f"{INDEX_PREFIX}/" not in err.message or _REPAIR_HINT in err.message:
            raise
        raise type(err)(f"{err.message}; {_REPAIR_HINT}") from None


def load_index(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """All index rows of all segments (one row per stored copy)."""
    # Only the known columns: a later compat feature may add columns old readers ignore.
    wanted = columns if columns is not None else INDEX_SCHEMA.names
    tables = [t for _name, t in read_segments(storage, wanted)]
    if not tables:
        schema = (
            INDEX_SCHEMA if columns is None else pa.schema([INDEX_SCHEMA.field(c) for c in columns])
        )
        return schema.empty_table()
    return pa.concat_tables(tables)


def _keys(ids: np.ndarray) -> np.ndarray:
    """16-byte prefixes of an (n, 32) uint8 array, as a sortable 'S16' array."""
    return np.ascontiguousarray(ids[:, :DEDUP_KEY_BYTES]).view(f"S{DEDUP_KEY_BYTES}").ravel()


def ids_to_array(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_binary(32) Arrow column as an (n, 32) uint8 numpy array (one copy)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    n = len(ids)
    if n == 0:
        return np.empty((0, 32), np.uint8)
    buf = ids.buffers()[1]
    start = ids.offset * 32
    return np.frombuffer(buf, np.uint8, n * 32, start).reshape(n, 32)


def array_to_ids(ids: np.ndarray) -> pa.Array:
    """An (n, 32) uint8 numpy array as a fixed_size_binary(32) Arrow array (``ids_to_array``
    the other way)."""
    ids = np.ascontiguousarray(ids, np.uint8)
    return pa.Array.from_buffers(pa.binary(32), len(ids), [None, pa.py_buffer(ids)])


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """Each id's index shard, of ``shards``: its first two bytes, big-endian, modulo ``shards``
    (ids are keyed hashes: the shards hold about as many chunks each)."""
    return (ids[:, 0].astype(np.int64) << 8 | ids[:, 1]) % shards


class DedupIndex:
    """Which chunks are stored already: sorted arrays of 16-byte id prefixes (16 B/chunk).

    ``claim`` is the dedup decision: it answers, for each id, whether the caller must store it,
    and marks those ids as claimed, so two workers never both store one chunk. Thread-safe.
    Ids claimed during this job go to a small set, which is folded into sorted arrays (merged
    log-structured, so few arrays) once it holds ``SET_LIMIT`` ids: memory stays 16 B/chunk.
    """

    SET_LIMIT = 65536

    def __init__(self, keys: np.ndarray | None = None) -> None:
        empty = np.empty(0, f"S{DEDUP_KEY_BYTES}")
        self._levels: list[np.ndarray] = [np.sort(keys)] if keys is not None and len(keys) else []
        self._empty = empty
        self._new: set[bytes] = set()
        self._lock = threading.Lock()

    @staticmethod
    def load(storage: Storage, shard: int = 0, shards: int = 1) -> DedupIndex:
        """The stored chunks whose pack exists (``present_rows``: in a local directory; on
        object storage every row): a chunk whose pack was lost is stored again by the next
        backup that sees it, instead of new points referring to missing data. Packs a
        running prune condemned count as lost (``catalog.store.condemned``): the caller's
        session must exist before this is called (FORMAT.md 13). With ``shards`` > 1, only
        the chunks of shard ``shard`` (``shard_of``)."""
        doomed = condemned_packs(storage)  # first: a record goes only after its packs
        if shards > 1:  # each segment's share only: a shard never holds the whole table
            mine = [
                t.filter(pa.array(shard_of(ids_to_array(t.column("chunk_id")), shards) == shard))
                for _, t in read_segments(storage, ["chunk_id", "pack"])
            ]
            empty = pa.schema([INDEX_SCHEMA.field(c) for c in ("chunk_id", "pack")]).empty_table()
            table = present_rows(storage, pa.concat_tables(mine) if mine else empty)
        else:
            table = present_rows(storage, load_index(storage, ["chunk_id", "pack"]))
        if doomed and table.num_rows:
            value_set = pa.array(sorted(doomed), pa.string())
            table = table.filter(pc.invert(pc.is_in(table.column("pack"), value_set=value_set)))
        arr = ids_to_array(table.column("chunk_id"))
        return DedupIndex(np.unique(_keys(arr)) if len(arr) else None)

    def __len__(self) -> int:
        return sum(len(a) for a in self._levels) + len(self._new)

    @property
    def resident_bytes(self) -> int:
        """Bytes held by the sorted arrays (the set of recent claims is at most SET_LIMIT)."""
        return int(sum(a.nbytes for a in self._levels))

    def _known(self, keys: np.ndarray) -> np.ndarray:
        known = np.zeros(len(keys), bool)
        for level in self._levels:
            pos = np.searchsorted(level, keys)
            pos[pos == len(level)] = 0
            known |= level[pos] == keys
        return known

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """For an (n, 32) uint8 array of ids: True where the chunk is stored (claims none)."""
        if len(ids) == 0:
            return np.zeros(0, bool)
        with self._lock:
            return self._known(_keys(np.ascontiguousarray(ids)))

    def claim(self, ids: np.ndarray) -> np.ndarray:
        """For an (n, 32) uint8 array of ids: a bool array, True where the caller must store."""
        if len(ids) == 0:
            return np.zeros(0, bool)
        keys = _keys(ids)
        out = np.zeros(len(keys), bool)
        with self._lock:
            known = self._known(keys)
            for i in np.flatnonzero(~known).tolist():
                k = keys[i].tobytes()
                if k not in self._new:
                    self._new.add(k)
                    out[i] = True
            if len(self._new) >= self.SET_LIMIT:
                self._fold()
        return out

    def _fold(self) -> None:
        """Move the set into a sorted array; merge arrays of similar size (log-structured)."""
        fresh = np.sort(np.array(list(self._new), dtype=f"S{DEDUP_KEY_BYTES}"))
        self._new = set()
        self._levels.append(fresh)
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            top = self._levels.pop()
            below = self._levels.pop()
            self._levels.append(np.sort(np.concatenate([below, top])))


def packs_present(storage: Storage) -> set[str]:
    return {
        n.rsplit("/", 1)[-1][: -len(".pack")] for n in storage.list("packs") if n.endswith(".pack")
    }


def present_rows(storage: Storage, table: pa.Table, listed: bool = False) -> pa.Table:
    """Only the index rows whose pack file exists, in a local directory. On object storage
    every row: listing ``packs/`` there costs a request per 1,000 packs at every backup, and
    no pack goes missing but by a prune, whose condemnation records and segments (rewritten
    before it removes a pack) already leave it out, or by damage, which ``verify`` and
    ``scrub`` report and ``repair index`` mends (its chunks are then stored again).
    ``listed``: list them on every storage (a prune, which lists them anyway)."""
    if table.num_rows == 0 or (storage.local_path("packs") is None and not listed):
        return table
    present = pa.array(sorted(packs_present(storage)), pa.string())
    return table.filter(pc.is_in(table.column("pack"), value_set=present))


def _prefer_present(storage: Storage, table: pa.Table) -> pa.Table:
    """Rows of existing packs first, so the location chosen for a chunk is a readable copy
    when there is one (a chunk stored again after its pack was lost). Nothing to choose, and
    nothing listed, when every chunk has one row."""
    if table.num_rows == 0 or pc.count_distinct(table.column("chunk_id")).as_py() == len(table):
        return table
    present = pa.array(sorted(packs_present(storage)), pa.string())
    missing = pc.invert(pc.is_in(table.column("pack"), value_set=present))
    order = np.argsort(missing.to_numpy(zero_copy_only=False), kind="stable")
    return table.take(pa.array(order))


def id_keys(ids: np.ndarray) -> np.ndarray:
    """Full 32-byte ids of an (n, 32) uint8 array as a sortable 'S32' array."""
    return np.ascontiguousarray(ids).view("S32").ravel()


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Vectorised membership of ``keys`` in a sorted key array."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return np.asarray(sorted_keys[pos] == keys)


def load_locations(storage: Storage, needed: np.ndarray | None = None) -> pa.Table:
    """One location per chunk id (the first stored copy), for reads.

    With ``needed`` (sorted unique 'S32' ids), only those chunks are kept while the segments
    stream by, so memory follows what is read, not the repository's size.
    """
    parts = []
    for _name, seg in read_segments(storage, INDEX_SCHEMA.names):
        if needed is not None:
            keep = contains(needed, id_keys(ids_to_array(seg.column("chunk_id"))))
            seg = seg.filter(pa.array(keep))
        parts.append(seg)
    table = pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table()
    table = _prefer_present(storage, table)
    if table.num_rows == 0:
        return table
    cols = [c for c in INDEX_SCHEMA.names if c != "chunk_id"]
    grouped = table.group_by("chunk_id", use_threads=False).aggregate([(c, "first") for c in cols])
    names = {f"{c}_first": c for c in cols}
    grouped = grouped.rename_columns([names.get(n, n) for n in grouped.column_names])
    return grouped.select(INDEX_SCHEMA.names)


def blob_rows(rows: pa.Table | dict[str, list[Any]]) -> Iterator[tuple[Any, Any, Any, Any, Any]]:
    """(chunk id, offset, stored length, raw length, codec) of index rows, as Python values."""
    cols = rows if isinstance(rows, dict) else rows.to_pydict()
    return zip(
        cols["chunk_id"],
        cols["offset"],
        cols["stored_len"],
        cols["raw_len"],
        cols["codec"],
        strict=True,
    )
