"""The ``hot-regions`` aggregation over an encrypted catalog, in numpy.

On a plain catalog DuckDB scans the change tables in place
(``catalog.analytics.reports.hot_regions``).
An encrypted catalog's change tables reach DuckDB only as a pyarrow dataset, which it scans
2-3 times more slowly (README "Known limits"). The report needs only two columns of the 23
million rows of a long history, the offset and the point, so here pyarrow reads just those and
numpy counts them per (point, region), file by file on a few threads (pyarrow's dataset
scanner took twice as long), and then per (source, region) with ``bincount``: the same table,
row for row, as the SQL (tests/catalog/test_regions.py compares the two).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.analytics.history import History
from catalog.store.changes import changes_name
from catalog.store.parquet_io import unreadable

# A table's regions are counted with np.unique (only those hit) rather than a bincount over
# every region up to its last when there are more than this many regions per row.
SPARSE_ABOVE = 4
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
    assert h.storage.sealer.encrypted, "plain catalogs are aggregated by DuckDB in place"
    n_pos = len(h.points)
    bucket = np.zeros(n_pos, np.int64)
    bucket[chosen] = buckets
    size = np.array([p.size for p in h.points], np.int64)
    chunk = np.array([p.chunk_size for p in h.points], np.int64)
    dec = h.storage.sealer.parquet_decryption()

    def count(p: int, data: bytes) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """One (checked) change table: its regions with changes, the changes and the bytes a
        short last chunk lacks. Each file on its own: no row-sized array is ever made (on 23
        million rows their page faults cost more than the arithmetic)."""
        try:
            table = pq.ParquetFile(pa.BufferReader(data), decryption_properties=dec).read(
                columns=["offset"], use_threads=False
            )
        except (pa.ArrowException, OSError) as err:
            raise unreadable(changes_name(str(h.points[p].changes)), err, True) from None
        offset = table.column(0).to_numpy()
        region = offset // bucket[p]
        if len(region) and int(region[-1]) > SPARSE_ABOVE * len(region):  # (rows ascend)
            hit, inverse, n = np.unique(region, return_inverse=True, return_counts=True)
        else:
            n = np.bincount(region)
            hit = np.flatnonzero(n)
            inverse, n = None, n[hit]
        lost: np.ndarray = np.zeros(len(hit))
        short = offset > size[p] - chunk[p]
        if size[p] % chunk[p] and short.any():  # a partial last chunk: short of a whole one
            at = inverse[short] if inverse is not None else np.searchsorted(hit, region[short])
            lack = chunk[p] - (size[p] - offset[short])
            lost = np.bincount(at, weights=lack, minlength=len(hit))
        return p, hit, n, lost

    parts = h.each_change_table(chosen, count)
    if not parts:
        return SCHEMA.empty_table()
    hit_pos = np.concatenate([np.full(len(c[1]), c[0], np.int64) for c in parts])
    hit_region = np.concatenate([c[1] for c in parts]).astype(np.int64)
    n = np.concatenate([c[2] for c in parts]).astype(np.int64)
    lost = np.concatenate([c[3] for c in parts])
    n_regions = int(np.max(hit_region)) + 1 if len(hit_region) else 1
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
