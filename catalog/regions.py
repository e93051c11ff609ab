"""The ``hot-regions`` aggregation over an encrypted catalog, in numpy.

On a plain catalog DuckDB scans the change tables in place (``catalog.reports.hot_regions``).
An encrypted catalog's change tables reach DuckDB only as a pyarrow dataset, which it scans
2-3 times more slowly (README "Known limits"). The report needs only two columns of the 23
million rows of a long history, the offset and the point, so here pyarrow reads just those and
numpy counts them per (point, region) and then per (source, region) with ``bincount``: the same
table, row for row, as the SQL (tests/catalog/test_regions.py compares the two).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .changes import CHANGES_SCHEMA
from .errors import QueryError
from .history import History

DENSE_BINS = 1 << 24  # (point, region) pairs counted with one bincount up to this many
SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("region_offset", pa.int64()),
        ("region_bytes", pa.int64()),
        ("changes", pa.int64()),
        ("points", pa.int64()),
        ("changed_bytes", pa.int64()),
        ("share", pa.float64()),
    ]
)


def hot_regions_table(
    h: History, chosen: list[int], buckets: list[int], limit: int | None
) -> pa.Table:
    """``chosen``: history positions that count, ``buckets``: each one's region size."""
    keys = h.storage.keys
    assert keys is not None, "plain catalogs are aggregated by DuckDB in place"
    files = [f for f in h.change_files() if f[0] in set(chosen)]
    if not files:
        return SCHEMA.empty_table()
    # Rows come file by file, in the order listed (a dataset keeps its fragments' order): each
    # file's rows are one slice, worked on in place (no row-sized temporaries: on 23 million
    # rows their page faults cost more than the arithmetic).
    offset = (
        keys.parquet_dataset([f[1] for f in files], CHANGES_SCHEMA, False)
        .to_table(columns=["offset"])
        .column("offset")
        .to_numpy()
    )
    file_pos = np.array([f[0] for f in files], np.int64)
    counts = np.array([f[2] for f in files], np.int64)
    if int(counts.sum()) != len(offset):
        raise QueryError("change tables changed while they were read")
    n_pos = len(h.points)
    bucket = np.zeros(n_pos, np.int64)
    bucket[chosen] = buckets
    size = np.array([p.size for p in h.points], np.int64)
    chunk = np.array([p.chunk_size for p in h.points], np.int64)
    fb = bucket[file_pos]
    n_regions = int(((size[file_pos] - 1) // fb).max()) + 1
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    key = np.empty_like(offset)
    partial_parts = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        p = int(file_pos[i])
        part = key[lo:hi]
        np.floor_divide(offset[lo:hi], bucket[p], out=part)
        part += p * n_regions
        if size[p] % chunk[p]:  # a partial last chunk: its row is short of a whole chunk
            partial_parts.append(lo + np.flatnonzero(offset[lo:hi] > size[p] - chunk[p]))
    partial = np.concatenate(partial_parts) if partial_parts else np.empty(0, np.int64)
    ppos = key[partial] // n_regions
    short = chunk[ppos] - (size[ppos] - offset[partial])
    if n_pos * n_regions <= DENSE_BINS:
        n = np.bincount(key, minlength=n_pos * n_regions)
        hit = np.flatnonzero(n)
        n = n[hit]
        lost = np.bincount(key[partial], weights=short, minlength=n_pos * n_regions)[hit]
    else:  # small regions on a large disk: only the (point, region) pairs that occur
        hit, inv = np.unique(key, return_inverse=True)
        n = np.bincount(inv)
        lost = np.bincount(inv[partial], weights=short, minlength=len(hit))
    hit_pos, hit_region = hit // n_regions, hit % n_regions
    nbytes = n * chunk[hit_pos] - lost.astype(np.int64)
    # Per (source, region size, region): regions of one source all have one size.
    src = np.asarray(h.source_of, np.int64)[hit_pos]
    key2 = src * n_regions + hit_region
    uniq, inverse = np.unique(key2, return_inverse=True)
    changes = np.bincount(inverse, weights=n).astype(np.int64)
    points = np.bincount(inverse).astype(np.int64)
    changed = np.bincount(inverse, weights=nbytes).astype(np.int64)
    u_src, u_region = uniq // n_regions, uniq % n_regions
    first_pos = np.zeros(len(uniq), np.int64)
    first_pos[inverse] = hit_pos
    size_of = bucket[first_pos]
    per_source = np.bincount(u_src, weights=changes, minlength=len(h.sources))
    share = changes / per_source[u_src]
    names = np.array(h.sources, object)[u_src]
    rank = np.argsort(np.argsort(np.array(h.sources, object)))[u_src]
    order = np.lexsort((u_region * size_of, rank, -changes))
    if limit:
        order = order[:limit]
    return pa.table(
        [
            pa.array(names[order].tolist(), pa.string()),
            pa.array((u_region * size_of)[order], pa.int64()),
            pa.array(size_of[order], pa.int64()),
            pa.array(changes[order], pa.int64()),
            pa.array(points[order], pa.int64()),
            pa.array(changed[order], pa.int64()),
            pa.array(share[order], pa.float64()),
        ],
        schema=SCHEMA,
    )
