"""Where two recovery points differ, chunk by chunk (``comb diff``), from their manifests.

Leaves the two points share (the same leaves file and ordinal: the later backup kept the earlier
one's leaf) are equal without being read, so the cost grows with what changed between them, not
with the disk's size.

Owns the comparison. Must not: read chunk data.
"""

from __future__ import annotations

import numpy as np

from catalog.store.manifest import ManifestReader
from catalog.store.points import RecoveryPoint


def _slots(reader: ManifestReader, leaf_no: int) -> dict[int, bytes]:
    leaf = reader.leaf_at(leaf_no)
    return {int(s): leaf.ids[i].tobytes() for i, s in enumerate(leaf.slots.tolist())}


def changed_runs(
    a: RecoveryPoint, ma: ManifestReader, b: RecoveryPoint, mb: ManifestReader
) -> list[tuple[int, int]]:
    """Byte runs (offset, length) where ``b``'s disk differs from ``a``'s (data replaced, data
    that became zeros or zeros that became data, and what one disk has past the other's end)."""
    size = max(a.size, b.size)
    if (a.chunk_size, a.leaf_chunks) != (b.chunk_size, b.leaf_chunks):
        return [(0, size)] if size else []
    chunk, per_leaf = a.chunk_size, a.leaf_chunks
    leaf_nos = np.union1d(ma.leaf_nos, mb.leaf_nos).tolist()
    changed: list[int] = []
    for leaf_no in leaf_nos:
        if ma.ref_at(leaf_no) == mb.ref_at(leaf_no):
            continue  # the same stored leaf: equal
        old, new = _slots(ma, leaf_no), _slots(mb, leaf_no)
        base = leaf_no * per_leaf
        changed += [base + s for s in sorted(old.keys() | new.keys()) if old.get(s) != new.get(s)]
    runs: list[tuple[int, int]] = []
    for number in changed:
        start = number * chunk
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + chunk)
        else:
            runs.append((start, chunk))
    small = min(a.size, b.size)
    if small < size:  # the grown (or shrunk) tail differs as a whole
        runs = [(o, n) for o, n in runs if o < small]
        if runs and runs[-1][0] + runs[-1][1] >= small:
            runs[-1] = (runs[-1][0], size - runs[-1][0])
        else:
            runs.append((small, size - small))
    return [(o, min(n, size - o)) for o, n in runs if o < size]
