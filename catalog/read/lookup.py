"""Chunk locations by id, per index segment, for random reads of recovery points
(``catalog.read.point``, through ``catalog.read.locator``), without loading the whole index.

Index rows are in no defined order (FORMAT.md section 7), so a segment's row-group statistics
cannot narrow a lookup by id. Instead each segment gets a **table** sorted by id when first
needed (``SegmentTable``, about 53 bytes a row), kept in a cache shared by every reader of the
process (``SHARED_SEGMENTS``, bounded in bytes); a large segment answers its first lookups
while that table is built on a background thread, so a first read does not wait for the sort:
with a block list (``catalog.store.blocks``, FORMAT.md 7.1) from the row groups of the rows its
backup read near the stretch of disk wanted, each block checked as it is read; without one,
by a scan of its id column, the segment checked whole against its name first. Read-only:
nothing here is used by backups.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import CombError, CorruptionError
from catalog.store.blocks import BlockList
from catalog.store.index import INDEX_PREFIX, INDEX_SCHEMA, ids_to_array, repair_hint
from catalog.store.parquet_io import (
    load_block_list,
    open_parquet,
    read_verified,
    unreadable,
)
from catalog.store.storage import Storage

_SEGMENT_CACHE_BYTES = 256 << 20  # segment tables kept, shared by every reader (~53 B a row)
_PROBE_ROWS = 65536  # larger segments answer first lookups by a scan while their table builds
# Segments larger than this, with a block list, answer first lookups from the rows near the
# stretch of disk wanted (catalog.store.blocks); smaller ones are read whole (one or two blocks).
_FILTERED_BYTES = 2 << 20
_FILTER_BITS = 1 << 20  # the scan's prefilter: a bitmap of the wanted ids' low 20 bits
_LOCATION_COLUMNS = ["pack", "offset", "stored_len", "raw_len", "codec"]


@dataclass(frozen=True)
class Hits:
    """Where some of the wanted ids are: ``at`` indexes the wanted ids, the rest are columns."""

    at: np.ndarray
    code: np.ndarray  # int32: the pack, as an index into ``names``
    names: np.ndarray  # object: pack ids (64 hex)
    offset: np.ndarray
    stored_len: np.ndarray
    raw_len: np.ndarray
    codec: np.ndarray


def _open_segment(name: str, data: bytes, dec: Any = None) -> pq.ParquetFile:
    """``dec``: pyarrow decryption properties in an encrypted repository."""
    try:
        return pq.ParquetFile(
            pa.BufferReader(data),
            read_dictionary=["pack"],
            page_checksum_verification=True,
            decryption_properties=dec,
        )
    except (pa.ArrowException, OSError) as err:
        raise unreadable(name, err, dec is not None) from None


def _read(name: str, read: Callable[..., pa.Table], *args: object) -> pa.Table:
    try:
        return read(*args)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(name, err) from None


def _hits(at: np.ndarray, t: pa.Table, rows: np.ndarray) -> Hits:
    """Hits from the location columns of ``t`` at ``rows``."""
    packs = t.column("pack").unify_dictionaries().combine_chunks()
    names = np.array(packs.dictionary.to_pylist(), object)
    codes = packs.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    cols = [t.column(c).to_numpy()[rows] for c in _LOCATION_COLUMNS[1:]]
    return Hits(at, codes[rows], names, *cols)


def _merged(parts: list[Hits]) -> Hits:
    """One Hits of several (each row group has its own pack dictionary)."""
    if len(parts) == 1:
        return parts[0]
    names = list(dict.fromkeys(n for h in parts for n in h.names.tolist()))
    where = {n: i for i, n in enumerate(names)}
    codes = [np.array([where[n] for n in h.names.tolist()], np.int32)[h.code] for h in parts]
    cols = [np.concatenate([getattr(h, f) for h in parts]) for f in _LOCATION_COLUMNS[1:]]
    at = np.concatenate([h.at for h in parts])
    return Hits(at, np.concatenate(codes), np.array(names, object), *cols)


class SegmentTable:
    """One index segment's rows sorted by chunk id, for lookups by id (about 53 bytes a row:
    the id as four 64-bit words, pack, offset and lengths)."""

    def __init__(self, name: str, data: bytes, dec: Any = None) -> None:
        """``data``: the segment's bytes, already checked against its name."""
        table = _read(name, _open_segment(name, data, dec).read, INDEX_SCHEMA.names)
        words = ids_to_array(table.column("chunk_id")).view("<u8")
        order = np.argsort(words[:, 0])
        self.first = np.ascontiguousarray(words[order, 0])
        self.rest = np.ascontiguousarray(words[order, 1:])
        self._cols = _hits(order, table, order)

    @property
    def nbytes(self) -> int:
        c = self._cols
        arrays = (self.first, self.rest, c.code, c.offset, c.stored_len, c.raw_len, c.codec)
        return sum(a.nbytes for a in arrays)

    def lookup(self, ids: np.ndarray) -> Hits:
        """Which of the (unique) ids of an (n, 32) uint8 array this segment holds, and where."""
        words = np.ascontiguousarray(ids).view("<u8")
        lo = np.searchsorted(self.first, words[:, 0], "left")
        hi = np.searchsorted(self.first, words[:, 0], "right")
        rows = np.full(len(words), -1, np.int64)
        one = np.flatnonzero(hi - lo == 1)
        same = np.all(self.rest[lo[one]] == words[one, 1:], axis=1)
        rows[one[same]] = lo[one[same]]
        for i in np.flatnonzero(hi - lo > 1).tolist():  # equal first words: rare, compare all
            match = np.flatnonzero(np.all(self.rest[lo[i] : hi[i]] == words[i, 1:], axis=1))
            if len(match):
                rows[i] = lo[i] + int(match[0])
        at = np.flatnonzero(rows >= 0)
        r, c = rows[at], self._cols
        cols = (c.offset[r], c.stored_len[r], c.raw_len[r], c.codec[r])
        return Hits(at, c.code[r], c.names, *cols)


class _SegmentScan:
    """A large segment before its table is built: lookups scan its id column (one vectorised
    pass) and read only the row groups that hold what was found."""

    def __init__(self, key: str, name: str, data: bytes, dec: Any = None) -> None:
        self.key, self.name, self.data, self.dec = key, name, data, dec
        self._pf = _open_segment(name, data, dec)
        self._building = False
        md = self._pf.metadata
        sizes = [md.row_group(rg).num_rows for rg in range(md.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        self._ids: np.ndarray | None = None
        self._lock = threading.Lock()  # the ParquetFile and the lazily read id column

    def start_build(self) -> bool:
        """True once: for the caller that is to start building this segment's table."""
        with self._lock:
            first, self._building = not self._building, True
            return first

    def table(self) -> SegmentTable:
        return SegmentTable(self.name, self.data, self.dec)

    def lookup(self, ids: np.ndarray) -> Hits:
        with self._lock:
            if self._ids is None:
                col = _read(self.name, self._pf.read, ["chunk_id"])
                self._ids = ids_to_array(col.column("chunk_id"))
            have = self._ids
            key = np.ascontiguousarray(ids).view("<u8")[:, 0]
            order = np.argsort(key)
            if len(np.unique(key)) < len(key):  # equal first words among the wanted: rare
                found = [np.flatnonzero(np.all(have == w, axis=1))[:1] for w in ids]
                at = np.array([i for i, f in enumerate(found) if len(f)], np.int64)
                rows = np.array([int(f[0]) for f in found if len(f)], np.int64)
            else:
                first = np.ascontiguousarray(have[:, :8]).view("<u8").ravel()
                # A bitmap of the wanted ids' low bits leaves few rows for the binary search.
                bits = np.zeros(_FILTER_BITS, bool)
                bits[key & np.uint64(_FILTER_BITS - 1)] = True
                rows = np.flatnonzero(bits[first & np.uint64(_FILTER_BITS - 1)])
                pos = np.minimum(np.searchsorted(key[order], first[rows]), len(key) - 1)
                match = key[order][pos] == first[rows]
                rows, want = rows[match], order[pos[match]]
                same = np.all(have[rows] == ids[want], axis=1)
                rows, at = rows[same], want[same]
            groups = np.searchsorted(self._starts, rows, "right") - 1
            parts = []
            for rg in np.unique(groups).tolist():
                sel = np.flatnonzero(groups == rg)
                t = _read(self.name, self._pf.read_row_group, rg, _LOCATION_COLUMNS)
                parts.append(_hits(at[sel], t, rows[sel] - self._starts[rg]))
        if not parts:
            empty = np.empty(0, np.int64)
            return Hits(empty, empty.astype(np.int32), np.empty(0, object), *[empty] * 4)
        return _merged(parts)


class _SegmentFiltered(_SegmentScan):
    """A segment with a block list (``catalog.store.blocks``) before its table is built. A lookup
    ``near`` a stretch of disk reads only the row groups of the rows the backup read within
    it, each block checked as it is read: a first read costs about the same whatever the size
    of the backup that wrote the segment (only its footer and block list grow with it). Other
    lookups read and check it whole and scan its id column, like any large segment."""

    @classmethod
    def of(cls, key: str, name: str, storage: Storage, blocks_id: str) -> _SegmentFiltered | None:
        """None when the block list is missing or damaged: the segment is then read whole."""
        try:
            blocks = load_block_list(storage, name, blocks_id)
        except CombError:
            return None
        return cls(key, name, storage, blocks)

    def __init__(self, key: str, name: str, storage: Storage, blocks: BlockList) -> None:
        self.key, self.name, self.dec = key, name, storage.sealer.parquet_decryption()
        self._storage = storage
        self._blocks = blocks
        self._pf = open_parquet(storage, name, blocks, ["pack"])
        self._building = False
        md = self._pf.metadata
        if md.num_rows != self._blocks.rows:
            raise CorruptionError(f"{name}: its block list covers {self._blocks.rows} rows")
        sizes = [md.row_group(rg).num_rows for rg in range(md.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        self._lock = threading.Lock()
        self._whole: _SegmentScan | None = None

    def table(self) -> SegmentTable:
        whole = self._whole  # (the bytes already read and checked, if a full search did)
        data = whole.data if whole is not None else read_verified(self._storage, self.name)
        return SegmentTable(self.name, data, self.dec)

    def lookup(self, ids: np.ndarray, near: tuple[int, int] | None = None) -> Hits:
        if near is None:
            with self._lock:
                if self._whole is None:
                    data = read_verified(self._storage, self.name)
                    self._whole = _SegmentScan(self.key, self.name, data, self.dec)
            return self._whole.lookup(ids)
        with self._lock:
            groups: set[int] = set()
            for lo, hi in self._blocks.rows_near(*near):
                a = int(np.searchsorted(self._starts, lo, "right")) - 1
                b = int(np.searchsorted(self._starts, hi, "left"))
                groups.update(range(a, b))
            parts = []
            for rg in sorted(groups):
                t = _read(self.name, self._pf.read_row_group, rg, ["chunk_id", *_LOCATION_COLUMNS])
                rows, at = _matches(ids_to_array(t.column("chunk_id")), ids)
                if len(rows):
                    parts.append(_hits(at, t, rows))
        return _merged(parts) if parts else _no_hits()


def _matches(have: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``have``, indices into ``ids``) of the ids found in ``have``."""
    hk = np.ascontiguousarray(have[:, :8]).view("<u8").ravel()
    wk = np.ascontiguousarray(ids[:, :8]).view("<u8").ravel()
    order = np.argsort(wk, kind="stable")
    pos = np.minimum(np.searchsorted(wk[order], hk), len(order) - 1)
    cand = order[pos]
    same = np.all(ids[cand] == have, axis=1)
    rows = np.flatnonzero(same)
    at = cand[rows]
    _, first = np.unique(at, return_index=True)  # (an id twice in a segment: any row will do)
    return rows[first], at[first]


def _no_hits() -> Hits:
    empty = np.empty(0, np.int64)
    return Hits(empty, empty.astype(np.int32), np.empty(0, object), *[empty] * 4)


class SegmentCache:
    """Lookup tables of index segments, least recently used first out past ``budget_bytes``
    (the newest is always kept). Segments are immutable and named by content, so the readers
    of every point share them. A small segment's table is built at its first lookup; a large
    one answers by scanning while its table is built on a background thread
    (``background=False``: built at once), so a first read does not wait for a sort of the
    whole segment. Every segment is checked against its name before it is parsed."""

    def __init__(self, budget_bytes: int = _SEGMENT_CACHE_BYTES, background: bool = True) -> None:
        self.budget_bytes = budget_bytes
        self._background = background
        self._tables: OrderedDict[str, SegmentTable] = OrderedDict()
        self._scans: dict[str, _SegmentScan] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def lookup(
        self,
        storage: Storage,
        name: str,
        ids: np.ndarray,
        blocks_id: str | None = None,
        near: tuple[int, int] | None = None,
    ) -> Hits:
        """``blocks_id``: the segment's block list, if a point document names it; ``near``:
        disk bytes [lo, hi) the ids were read from: a large segment with a block list whose
        table is not built yet then searches only the rows its backup read there (others
        search everything: they are small, or their table is built)."""
        with repair_hint():
            got = self._get(storage, name, blocks_id)
            hits = got.lookup(ids, near) if isinstance(got, _SegmentFiltered) else got.lookup(ids)
        # A table is built for a segment searched in full or found useful, not for every
        # segment a near search merely looked at.
        wanted = near is None or len(hits.at) > 0
        if isinstance(got, _SegmentScan) and wanted and got.start_build():
            # Only now: the build must not compete with the lookup a first read waits for.
            threading.Thread(target=self._build, args=(got,), daemon=True).start()
        return hits

    def _get(
        self, storage: Storage, name: str, blocks_id: str | None = None
    ) -> SegmentTable | _SegmentScan:
        key = storage.local_path(name) or f"{id(storage)}:{name}"
        with self._lock:
            got = self._ready(key)
            if got is not None:
                return got
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one thread reads and checks the segment; others wait for it
            with self._lock:
                got = self._ready(key)
            if got is not None:
                return got
            try:
                filtered = None
                if blocks_id is not None and self._background:
                    if storage.size(name) > _FILTERED_BYTES:
                        filtered = _SegmentFiltered.of(key, name, storage, blocks_id)
                if filtered is not None:
                    with self._lock:
                        self._scans[key] = filtered
                    return filtered
                data = read_verified(storage, name)
                dec = storage.sealer.parquet_decryption()
                rows = _open_segment(name, data, dec).metadata.num_rows
                if rows <= _PROBE_ROWS or not self._background:
                    table = SegmentTable(name, data, dec)
                    self._add(key, table)
                    return table
                scan = _SegmentScan(key, name, data, dec)
                with self._lock:
                    self._scans[key] = scan
                return scan
            finally:
                with self._lock:
                    self._opening.pop(key, None)

    def _ready(self, key: str) -> SegmentTable | _SegmentScan | None:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        return self._scans.get(key)

    def _build(self, scan: _SegmentScan) -> None:
        try:
            self._add(scan.key, scan.table())
        except CombError:
            pass  # lookups go on scanning, and report the damage themselves
        finally:
            with self._lock:
                self._scans.pop(scan.key, None)

    def _add(self, key: str, table: SegmentTable) -> None:
        with self._lock:
            self._tables[key] = table
            self._bytes += table.nbytes
            while self._bytes > self.budget_bytes and len(self._tables) > 1:
                _, old = self._tables.popitem(last=False)
                self._bytes -= old.nbytes

    def wait(self, timeout_s: float = 60.0) -> None:
        """Until no table is being built (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._scans:
                    return
            time.sleep(0.01)


SHARED_SEGMENTS = SegmentCache()


def segment_name(segment_id: str) -> str:
    return f"{INDEX_PREFIX}/{segment_id}.parquet"
