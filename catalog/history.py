"""The backup history as columns: every committed point in per-source order, and every change
row with the life of the content it put in place.

Built from point documents and change tables only (never from manifests), so its cost grows
with the history's change, not with points x disk size: 1,000 points of a 256 GiB disk with
0.5 % change each are about 25 million rows. Every change table is checked against its name
before it is parsed, and tables are read on threads (hashing and decoding release the GIL).

An **occurrence** is one change row seen as an interval: the content it put at its offset is
held by the points of its source from the row's point (``pos``) up to, not including, the next
point that changed that offset (``end``); content still in the latest point has ``end`` one past
the source's last point. Positions are source-major: the points of the first source (oldest
first), then the next source's, so one integer range names a run of one source's points.

This module owns no SQL and prints nothing: reports (``catalog.reports``) query its tables.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa

from .changes import read_changes
from .points import RecoveryPoint
from .storage import Storage

_LOAD_THREADS = 4


@dataclass
class History:
    """Points in source-major order, with what is known about each source's chain."""

    points: list[RecoveryPoint]  # source-major: by source, then time, then id
    sources: list[str]
    source_of: np.ndarray  # int32 per point: index into sources
    seq: np.ndarray  # int32 per point: position within its source (0 = oldest)
    base: np.ndarray  # int64 per source: position of its first point
    count: np.ndarray  # int64 per source: number of points
    complete: np.ndarray  # bool per source: every point has a change table of its parent
    storage: Storage
    _occ: pa.Table | None = field(default=None, repr=False)
    data_bytes: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def of(cls, storage: Storage, points: list[RecoveryPoint]) -> History:
        ordered = sorted(points, key=lambda p: (p.source, p.time, p.id))
        sources = sorted({p.source for p in ordered})
        index = {s: i for i, s in enumerate(sources)}
        source_of = np.array([index[p.source] for p in ordered], np.int32)
        count = np.bincount(source_of, minlength=len(sources)).astype(np.int64)
        base = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        seq = (np.arange(len(ordered)) - base[source_of]).astype(np.int32)
        complete = np.ones(len(sources), bool)
        for i, p in enumerate(ordered):
            prev = ordered[i - 1] if seq[i] > 0 else None
            chained = p.parent == (prev.id if prev is not None else None)
            if p.changes is None or not chained:
                complete[source_of[i]] = False
        return cls(ordered, sources, source_of, seq, base, count, complete, storage)

    def times(self) -> np.ndarray:
        """Commit times as datetime64[us] per point."""
        return np.array(
            [
                np.datetime64(datetime.fromisoformat(p.time).replace(tzinfo=None), "us")
                for p in self.points
            ],
            "datetime64[us]",
        )

    def occurrences(self) -> pa.Table:
        """Every change row as an occurrence (columns in ``OCCURRENCE_SCHEMA``); computed once."""
        if self._occ is None:
            self._occ = self._build()
        return self._occ

    def _load(self) -> list[pa.Table | None]:
        def one(p: RecoveryPoint) -> pa.Table | None:
            if p.changes is None:
                return None
            return read_changes(self.storage, p.changes)

        with ThreadPoolExecutor(_LOAD_THREADS) as pool:
            return list(pool.map(one, self.points))

    def _build(self) -> pa.Table:
        tables = self._load()
        n = len(self.points)
        sizes = np.array([0 if t is None else t.num_rows for t in tables], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(starts[-1])
        cols = _concat(tables)
        offset = cols["offset"]
        zero = cols["zero"]
        point = np.repeat(np.arange(n, dtype=np.int32), sizes)
        chunk = np.repeat(np.array([p.chunk_size for p in self.points], np.int64), sizes)
        size = np.repeat(np.array([p.size for p in self.points], np.int64), sizes)
        length = np.minimum(chunk, size - offset).astype(np.int32)
        end = np.empty(total, np.int64)
        prev_len = np.zeros(total, np.int32)  # data bytes the row's offset held before
        for s in range(len(self.sources)):
            first, k = int(self.base[s]), int(self.count[s])
            end[starts[first] : starts[first + k]] = first + k
            _link(
                offset[starts[first] : starts[first + k]] // chunk[starts[first]]
                if k
                else offset[:0],
                starts[first : first + k + 1] - starts[first],
                first,
                end[starts[first] : starts[first + k]],
                zero[starts[first] : starts[first + k]],
                length[starts[first] : starts[first + k]],
                prev_len[starts[first] : starts[first + k]],
            )
        now = np.where(zero, 0, length).astype(np.int64)
        delta = np.bincount(point, weights=now - prev_len, minlength=n)
        self.data_bytes = _running_by_source(delta.astype(np.int64), self.base, self.count)
        return pa.table(
            {
                "pos": pa.array(point),
                "end": pa.array(end),
                "offset": pa.array(offset),
                "length": pa.array(length),
                "chunk_key": cols["chunk_key"],
                "zero": pa.array(zero),
                "new": pa.array(cols["new"]),
                "stored_len": pa.array(cols["stored_len"]),
            }
        )


OCCURRENCE_COLUMNS = {
    "pos": "source-major position of the point that made the change",
    "end": "position of the next point of the source that changed this offset again "
    "(one past the source's last point while the content is still current)",
    "offset": "byte offset of the chunk on the disk",
    "length": "bytes of the chunk (the disk's last chunk may be short)",
    "chunk_key": "first 8 bytes of the new content's chunk id (null: now zeros)",
    "zero": "the region became zeros",
    "new": "this backup stored the chunk (it was in no earlier point)",
    "stored_len": "bytes this backup stored for the chunk (0 unless new)",
}


def _concat(tables: list[pa.Table | None]) -> dict[str, np.ndarray | pa.Array]:
    present = [t for t in tables if t is not None and t.num_rows]
    if not present:
        return {
            "offset": np.empty(0, np.int64),
            "zero": np.empty(0, bool),
            "new": np.empty(0, bool),
            "stored_len": np.empty(0, np.int32),
            "chunk_key": pa.array([], pa.int64()),
        }
    t = pa.concat_tables(present).combine_chunks()
    key = t.column("chunk_key").chunk(0) if t.column("chunk_key").num_chunks else pa.array([])
    return {
        "offset": t.column("offset").to_numpy(),
        "zero": key.is_null().to_numpy(zero_copy_only=False),
        "new": t.column("new").to_numpy(zero_copy_only=False),
        "stored_len": t.column("stored_len").to_numpy(),
        "chunk_key": key,
    }


def _link(
    chunk_no: np.ndarray,
    starts: np.ndarray,
    first: int,
    end: np.ndarray,
    zero: np.ndarray,
    length: np.ndarray,
    prev_len: np.ndarray,
) -> None:
    """One source: for each change row, the position of the next change at the same chunk
    (``end``, left as is where none), and the data bytes the row replaced (``prev_len``).
    One pass over the points, each a few vectorised steps over its own rows."""
    if not len(chunk_no):
        return
    last = np.full(int(chunk_no.max()) + 1, -1, np.int64)
    for i in range(len(starts) - 1):
        r0, r1 = int(starts[i]), int(starts[i + 1])
        if r0 == r1:
            continue
        c = chunk_no[r0:r1]
        prev = last[c]
        had = prev >= 0
        before = prev[had]
        end[before] = first + i
        prev_len[r0:r1][had] = np.where(zero[before], 0, length[before])
        last[c] = np.arange(r0, r1)


def _running_by_source(delta: np.ndarray, base: np.ndarray, count: np.ndarray) -> np.ndarray:
    out = np.empty_like(delta)
    for b, k in zip(base.tolist(), count.tolist(), strict=True):
        out[b : b + k] = np.cumsum(delta[b : b + k])
    return out


def held_by(occ: pa.Table, kept: np.ndarray) -> np.ndarray:
    """Per occurrence: whether some point in ``kept`` (bool per position) holds its content."""
    cum = np.concatenate([[0], np.cumsum(kept.astype(np.int64))])
    pos = occ.column("pos").to_numpy()
    end = occ.column("end").to_numpy()
    return (cum[end] - cum[pos]) > 0
