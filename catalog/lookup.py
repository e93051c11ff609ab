"""Chunk locations by id, for random reads of recovery points (``drive.source``): which index
segment holds a chunk, and where its blob is, without loading the whole index.

Index rows are in no defined order (FORMAT.md section 7), so a segment's row-group statistics
cannot narrow a lookup. Instead each segment gets a **table** sorted by id when first needed
(``SegmentTable``, about 53 bytes a row), kept in a cache shared by every reader of the process
(``SHARED_SEGMENTS``, bounded in bytes); a large segment answers its first lookups by scanning
its id column while that table is built on a background thread, so a first read does not wait
for the sort. ``Locator`` searches the segments in an order the caller knows to be likely (the
backup that wrote a leaf stored most of its chunks) and reads a segment only while some wanted
id is still unfound. Every segment is checked against its name before it is parsed. Read-only:
nothing here is used by backups.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CombError
from .index import INDEX_PREFIX, INDEX_SCHEMA, id_keys, ids_to_array, segment_names
from .packs import pack_name
from .parquet_io import decryption, read_verified, unreadable
from .storage import Storage

_SEGMENT_CACHE_BYTES = 256 << 20  # segment tables kept, shared by every reader (~53 B a row)
_PROBE_ROWS = 65536  # larger segments answer first lookups by a scan while their table builds
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

    def lookup(self, storage: Storage, name: str, ids: np.ndarray) -> Hits:
        got = self._get(storage, name)
        hits = got.lookup(ids)
        if isinstance(got, _SegmentScan) and got.start_build():
            # Only now: the build must not compete with the lookup a first read waits for.
            threading.Thread(target=self._build, args=(got,), daemon=True).start()
        return hits

    def _get(self, storage: Storage, name: str) -> SegmentTable | _SegmentScan:
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
                data = read_verified(storage, name)
                dec = decryption(storage)
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
            self._add(scan.key, SegmentTable(scan.name, scan.data, scan.dec))
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


@dataclass(frozen=True)
class Found:
    """Locations of n chunk ids: ``pack`` is -1 where no index segment names the id."""

    pack: np.ndarray  # int32: an index into the locator's ``pack_names``
    offset: np.ndarray
    stored_len: np.ndarray
    raw_len: np.ndarray
    codec: np.ndarray


class Locator:
    """One location per chunk id, searched segment by segment in the caller's order of
    likelihood: a segment is read only while some wanted id is still unfound, so a lookup
    costs the segments that hold the ids, not the whole index. Like ``load_locations``, a copy
    whose pack exists is preferred. Not thread-safe (callers serialise)."""

    def __init__(self, storage: Storage, cache: SegmentCache = SHARED_SEGMENTS) -> None:
        self._storage = storage
        self._cache = cache
        self._listed: list[str] | None = None
        self._exists: dict[str, bool] = {}
        self.segments_used: set[str] = set()
        self.pack_names: list[str] = []  # what ``Found.pack`` codes mean; only grows
        self._pack_codes: dict[str, int] = {}

    def locate(self, ids: np.ndarray, first: list[str], rest: Callable[[], list[str]]) -> Found:
        """``first``: segment names to search before any other (e.g. the backup's own);
        ``rest()``: the order for the others, asked for only if ids remain unfound; segments
        in neither (and, at the end, any that appeared since) are searched last."""
        keys, inverse = np.unique(id_keys(ids), return_inverse=True)
        uniq = keys.view(np.uint8).reshape(-1, 32)
        n = len(keys)
        out = Found(
            np.full(n, -1, np.int32),
            np.zeros(n, np.int64),
            np.zeros(n, np.int32),
            np.zeros(n, np.int32),
            np.zeros(n, np.int8),
        )
        state = np.zeros(n, np.int8)  # 0 unfound, 1 found in a missing pack, 2 found
        tried: set[str] = set()
        for name in self._order(first, rest, tried, lambda: bool(np.any(state < 2))):
            if not self._segment_exists(name):
                continue  # named by a point document, but merged or removed since
            todo = np.flatnonzero(state < 2)
            self.segments_used.add(name)
            hits = self._cache.lookup(self._storage, name, uniq[todo])
            at = todo[hits.at]
            # Per pack, not per chunk: whether it exists, and its code.
            used = np.unique(hits.code).tolist()
            exists = np.zeros(len(hits.names), bool)
            codes = np.full(len(hits.names), -1, np.int32)
            for c in used:
                exists[c] = self._pack_exists(hits.names[c])
                codes[c] = self._pack_code(hits.names[c])
            ok = exists[hits.code]
            take = ok | (state[at] == 0)
            at = at[take]
            out.pack[at] = codes[hits.code[take]]
            for field in ("offset", "stored_len", "raw_len", "codec"):
                getattr(out, field)[at] = getattr(hits, field)[take]
            state[at] = np.where(ok[take], 2, 1)
        inverse = inverse.ravel()
        return Found(*(getattr(out, f)[inverse] for f in Found.__annotations__))

    def _order(
        self,
        first: list[str],
        rest: Callable[[], list[str]],
        tried: set[str],
        wanted: Callable[[], bool],
    ) -> Iterator[str]:
        def fresh(names: Iterable[str]) -> Iterator[str]:
            for name in names:
                if name not in tried and wanted():
                    tried.add(name)
                    yield name

        yield from fresh(first)
        if not wanted():
            return
        yield from fresh(rest())
        if self._listed is None:
            self._listed = segment_names(self._storage)
        yield from fresh(self._listed)
        if wanted():  # a segment written since the listing (a backup finished meanwhile)
            self._listed = segment_names(self._storage)
            yield from fresh(self._listed)

    def _pack_code(self, pack: str) -> int:
        code = self._pack_codes.get(pack)
        if code is None:
            code = self._pack_codes[pack] = len(self.pack_names)
            self.pack_names.append(pack)
        return code

    def _segment_exists(self, name: str) -> bool:
        if self._listed is not None and name in self._listed:
            return True
        known = self._exists.get(name)
        if known is None:
            known = self._exists[name] = self._storage.exists(name)
        return known

    def _pack_exists(self, pack: str) -> bool:
        name = pack_name(pack)
        known = self._exists.get(name)
        if known is None:
            known = self._exists[name] = self._storage.exists(name)
        return known


def segment_name(segment_id: str) -> str:
    return f"{INDEX_PREFIX}/{segment_id}.parquet"
