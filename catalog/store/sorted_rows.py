"""Tables kept sorted by a key of string or binary columns (a file catalog's listings, by volume
and path): rows merged into a large sorted table, and rows dropped from it, in one pass and one
copy, with no sort of the whole.

The key of a row is its key columns' bytes joined by NUL, which orders rows as the tuple of
columns does (NUL sorts before every other byte, and no key column holds one).

Owns the merge. Must not: know what the rows mean.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def keys(table: pa.Table, columns: list[str]) -> pa.Array:
    """Each row's key (binary)."""
    if not table.num_rows:
        return pa.array([], pa.binary())
    parts = [table.column(c).combine_chunks().cast(pa.binary()) for c in columns]
    return pc.binary_join_element_wise(*parts, b"\0") if len(parts) > 1 else parts[0]


def is_sorted(table: pa.Table, columns: list[str]) -> bool:
    k = keys(table, columns)
    return len(k) < 2 or bool(pc.all(pc.less_equal(k[:-1], k[1:])).as_py())


def merge(
    base: pa.Table,
    extra: pa.Table,
    columns: list[str],
    base_keys: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> pa.Table:
    """``base`` (sorted; its keys as an object array when the caller has them) without the rows
    ``keep`` is False for, with ``extra``'s rows (any order, none with a key of a kept row) in
    their places: the new rows are sorted, then one take puts every row where it goes."""
    if keep is None:
        keep = np.ones(base.num_rows, bool)
    if not extra.num_rows and keep.all():
        return base
    if base_keys is None:
        base_keys = np.asarray(keys(base, columns).to_numpy(zero_copy_only=False), dtype=object)
    extra = extra.sort_by([(c, "ascending") for c in columns])
    added = np.asarray(keys(extra, columns).to_numpy(zero_copy_only=False), dtype=object)
    kept = np.nonzero(keep)[0]
    at = np.searchsorted(base_keys[kept], added) + np.arange(len(added))
    order = np.empty(len(kept) + len(added), np.int64)
    mine = np.ones(len(order), bool)
    mine[at] = False
    order[mine] = kept
    order[at] = base.num_rows + np.arange(len(added))
    both = pa.concat_tables([base, extra.select(base.schema.names).cast(base.schema)])
    return both.take(pa.array(order))
