"""The change rows of a history as columns (read once from the change tables), and the row
walks that answer "what does only this point hold" and "what would forgetting these points
free" when the chunk lives (``catalog.analytics.lives.model``) are not available (a source
whose chain is incomplete: the figures are then not exact and reports leave them out, but the
views still show them).

This module prints nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from catalog.analytics.lives import model as lv_
from catalog.analytics.views import sealed_dataset
from catalog.errors import QueryError
from catalog.store.changes import CHANGES_SCHEMA
from catalog.store.sealing import Sealer

Sources = Iterable[tuple[int, int, np.ndarray]]  # per source: first position, count, bitmap


def lone(cols: Columns, sources: Sources) -> np.ndarray:
    """Per point: stored bytes of the chunks no other point holds."""
    chunk_no, starts = cols.chunk_no, cols.starts
    flag = np.zeros(len(chunk_no), bool)
    for first, k, bitmap in sources:
        for p in range(first, first + k):
            r0, r1 = int(starts[p]), int(starts[p + 1])
            if p == first + k - 1:
                flag[r0:r1] = True  # the latest point: its own content is held by it alone
                continue
            n0, n1 = int(starts[p + 1]), int(starts[p + 2])
            bitmap[chunk_no[n0:n1]] = True
            flag[r0:r1] = bitmap[chunk_no[r0:r1]]
            bitmap[chunk_no[n0:n1]] = False
    return freed_per_point(len(cols.starts) - 1, cols, flag, one_point=True)


def freed(cols: Columns, sources: Sources, forget: np.ndarray) -> np.ndarray:
    """Per point: stored bytes freed by forgetting the marked points, counted at the point
    whose backup stored each chunk."""
    chunk_no, starts = cols.chunk_no, cols.starts
    flag = np.zeros(len(chunk_no), bool)
    for first, k, bitmap in sources:
        touched: list[np.ndarray] = []
        open_tail = True  # no kept point after this one: what it holds goes
        for p in range(first + k - 1, first - 1, -1):
            r0, r1 = int(starts[p]), int(starts[p + 1])
            c = chunk_no[r0:r1]
            if not forget[p]:
                for t in touched:
                    bitmap[t] = False
                touched = [c]
                bitmap[c] = True
                open_tail = False
                continue
            flag[r0:r1] = True if open_tail else bitmap[c]
            bitmap[c] = True
            touched.append(c)
    return freed_per_point(len(cols.starts) - 1, cols, flag, one_point=False)


# Row kinds (one int8 per row): the region became zeros, a dedup hit, or a chunk stored here.
ZERO, HIT, NEW = 0, 1, 2


@dataclass(frozen=True)
class Columns:
    chunk_no: np.ndarray  # int32
    key: np.ndarray  # int64, 0 for zeros
    kind: np.ndarray  # int8: ZERO, HIT or NEW
    stored: np.ndarray  # int32
    starts: np.ndarray  # int64 per point + 1: its first row

    def rows(self, p: int) -> lv_.Rows:
        """The rows of position ``p`` (views)."""
        r0, r1 = int(self.starts[p]), int(self.starts[p + 1])
        return lv_.Rows(self.chunk_no[r0:r1], self.key[r0:r1], self.kind[r0:r1], self.stored[r0:r1])

    def pos(self, rows: np.ndarray) -> np.ndarray:
        """The position (point) of each given row."""
        return np.searchsorted(self.starts, rows, side="right") - 1


def freed_per_point(n: int, c: Columns, flag: np.ndarray, one_point: bool) -> np.ndarray:
    """Stored bytes of the chunks all of whose rows are flagged (and, with ``one_point``, all
    in one point), per point of the row that stored them (its ``new`` row).

    A chunk that was never a dedup hit has exactly one row, its ``new`` one. The chunks with
    dedup hits are few: their hit rows are grouped by key, and each candidate ``new`` row is
    checked against those groups (a bitmap first, so most rows cost one probe)."""
    hit = np.flatnonzero(c.kind == HIT)
    order = np.argsort(c.key[hit], kind="stable")
    hkey, hpos, hflag = c.key[hit][order], c.pos(hit)[order], flag[hit][order]
    firsts = np.flatnonzero(np.concatenate([[True], hkey[1:] != hkey[:-1]])) if len(hkey) else hit
    keys = hkey[firsts]
    ok = (c.kind == NEW) & flag
    if len(keys):
        fine = np.logical_and.reduceat(hflag, firsts)
        lo, hi = np.minimum.reduceat(hpos, firsts), np.maximum.reduceat(hpos, firsts)
        cand = np.flatnonzero(ok)
        at = lv_.KeyLookup(keys, is_sorted=True).find(c.key[cand])
        cand, at = cand[at >= 0], at[at >= 0]
        good = fine[at]
        if one_point:
            p = c.pos(cand)
            good &= (lo[at] == p) & (hi[at] == p)
        ok[cand[~good]] = False
    running = np.concatenate([[0], np.cumsum(np.where(ok, c.stored, 0), dtype=np.int64)])
    return (running[c.starts[1:]] - running[c.starts[:-1]]).astype(np.int64)


def read_columns(
    files: list[tuple[int, str, int]], points: int, chunk: int, sealer: Sealer
) -> Columns:
    """Every change row of the (checked) change tables ``files`` ((position, local path, rows),
    in position order) as columns, read once by DuckDB's parallel Parquet reader (decrypted by
    pyarrow in an encrypted repository, as ``catalog.analytics.views.parquet_from``)."""
    counts = np.zeros(points, np.int64)
    for i, _path, rows in files:
        counts[i] = rows
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if files:
        con = duckdb.connect(":memory:")
        if not sealer.encrypted:
            listing = ", ".join("'" + f[1].replace("'", "''") + "'" for f in files)
            source = f"read_parquet([{listing}])"
        else:
            paths = [f[1] for f in files]
            con.register(
                "_changes", sealed_dataset(sealer, paths, CHANGES_SCHEMA, False).to_table()
            )
            source = "_changes"
        # Insertion order is kept: rows come file by file, in the order listed.
        # Narrow columns (int32 chunk numbers, one int8 kind) halve what is copied out.
        t = con.sql(
            f'SELECT ("offset" // {int(chunk)})::INTEGER AS chunk_no, '
            "coalesce(chunk_key, 0) AS chunk_key, "
            "(CASE WHEN chunk_key IS NULL THEN 0 WHEN new THEN 2 ELSE 1 END)::TINYINT "
            f"AS kind, stored_len FROM {source}"
        ).to_arrow_table()
        con.close()
    else:
        t = pa.table(
            {
                "chunk_no": pa.array([], pa.int32()),
                "chunk_key": pa.array([], pa.int64()),
                "kind": pa.array([], pa.int8()),
                "stored_len": pa.array([], pa.int32()),
            }
        )
    if t.num_rows != int(starts[-1]):
        raise QueryError("change tables changed while they were read")
    return Columns(
        t.column("chunk_no").to_numpy(),
        t.column("chunk_key").to_numpy(),
        t.column("kind").to_numpy(),
        t.column("stored_len").to_numpy(),
        starts,
    )


def rows_of(t: pa.Table, chunk: int) -> lv_.Rows:
    """One change table's rows as the lives take them."""
    key = t.column("chunk_key")
    new = t.column("new").to_numpy(zero_copy_only=False)
    zero = key.is_null().to_numpy(zero_copy_only=False)
    return lv_.Rows(
        (t.column("offset").to_numpy() // chunk).astype(np.int32),
        key.fill_null(0).to_numpy().astype(np.int64),
        np.where(zero, ZERO, np.where(new, NEW, HIT)).astype(np.int8),
        t.column("stored_len").to_numpy().astype(np.int32),
    )
