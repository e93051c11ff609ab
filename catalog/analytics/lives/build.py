"""Chunk lives (``catalog.analytics.lives.model``) built from every change row at once.

``Lives.extend`` adds points one by one, keeping each source's content at its latest point;
that is what a new point costs, but for a whole history of 1,000 points it took 3–4 s. With
every row at hand the order of points no longer has to be walked with all that state: one pass
from the newest point back gives each row its end (the next point of the source that changed
that chunk again), and everything else is a grouping of rows by where they sit. The result is
the same ``Lives`` (the same sums, groups and latest content), so it is cached and extended
exactly like one built point by point (tests/catalog/test_lives.py compares both).

This module prints nothing.
"""

from __future__ import annotations

import numpy as np

from catalog.analytics.lives.model import (
    _GROUP_HIT,
    _GROUP_NEW,
    _HIT,
    _NEW,
    _SIMPLE,
    _ZERO,
    KeyLookup,
    Lives,
    _Held,
    _sorted_unique,
)


def build(
    chunk_size: int,
    points: list[tuple[str, str]],
    chunk_no: np.ndarray,
    key: np.ndarray,
    kind: np.ndarray,
    stored: np.ndarray,
    starts: np.ndarray,
) -> Lives:
    """The lives of ``points`` ((source, change table id), each source's in chain order),
    whose change rows are the columns, point ``i`` owning rows ``starts[i]:starts[i + 1]``."""
    lv = Lives(chunk_size)
    n = len(points)
    src = np.zeros(n, np.int32)
    seq = np.zeros(n, np.int32)
    for i, (name, changes_id) in enumerate(points):
        s = lv.source_index(name)
        src[i], seq[i] = s, len(lv.chains[s])
        lv.chains[s].append(changes_id)
    counts = np.diff(starts)
    # Each source's chunk numbers get a range of their own in one slot space.
    top = np.zeros(len(lv.sources), np.int64)
    full = counts > 0
    if full.any():
        most = np.maximum.reduceat(chunk_no, starts[:-1][full])
        np.maximum.at(top, src[full], most.astype(np.int64) + 1)
    slot0 = np.concatenate([[0], np.cumsum(top)]).astype(np.int64)
    # Ends: newest point first, each row takes the seq of the last later row at its slot.
    end = np.empty(len(chunk_no), np.int32)
    later = np.full(int(slot0[-1]), -1, np.int32)
    for p in np.flatnonzero(full)[::-1].tolist():
        r0, r1 = int(starts[p]), int(starts[p + 1])
        slot = chunk_no[r0:r1] + slot0[src[p]]
        end[r0:r1] = later[slot]
        later[slot] = seq[p]
    del later

    def point_of(rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(starts, rows, side="right") - 1

    # Chunks with dedup hits: every life, grouped by key. (Few rows: indices, not masks.)
    hit = np.flatnonzero(kind == _HIT)
    hit_keys = _sorted_unique([key[hit]])
    if len(hit_keys):
        lv.group_keys.append(key=hit_keys)
    lookup = KeyLookup(hit_keys, is_sorted=True)
    simple = kind == _NEW
    new_rows, new_groups = lookup.members(key, simple)
    hit_groups = np.searchsorted(hit_keys, key[hit]).astype(np.int32)
    rows = {_GROUP_NEW: (new_rows, new_groups), _GROUP_HIT: (hit, hit_groups)}
    for lives, code in ((lv.gnew, _GROUP_NEW), (lv.ghit, _GROUP_HIT)):
        r, g = rows[code]
        if len(r):
            p = point_of(r)
            cols = {"stored": stored[r]} if code == _GROUP_NEW else {}
            lives.append(src=src[p], birth=seq[p], end=end[r], group=g, **cols)

    # One-life chunks (stored here, never a dedup hit) that ended: summed per (source,
    # birth, end), one point at a time.
    simple[new_rows] = False
    for p in np.flatnonzero(full).tolist():
        r0, r1 = int(starts[p]), int(starts[p + 1])
        m = simple[r0:r1] & (end[r0:r1] >= 0)
        if not m.any():
            continue
        # (float sums of int32 sizes are exact far beyond any point's total)
        sums = np.bincount(end[r0:r1][m], stored[r0:r1][m]).astype(np.int64)
        ends = np.flatnonzero(sums).astype(np.int32)
        lv.pairs.append(
            src=np.full(len(ends), src[p], np.int32),
            birth=np.full(len(ends), seq[p], np.int32),
            end=ends,
            bytes=sums[ends],
        )

    # Each source's content at its latest point: the rows nothing later overwrote.
    total = int(slot0[-1])
    h_birth = np.full(total, -1, np.int32)
    h_key = np.zeros(total, np.int64)
    h_stored = np.zeros(total, np.int32)
    h_kind = np.zeros(total, np.int8)
    h_ref = np.zeros(total, np.int32)
    last = np.flatnonzero(end < 0)
    p = point_of(last)
    slot = chunk_no[last] + slot0[src[p]]
    h_key[slot] = key[last]
    h_birth[slot] = np.where(kind[last] != _ZERO, seq[p], -1)
    one = simple[last]
    h_kind[slot[one]] = _SIMPLE
    h_stored[slot[one]] = stored[last[one]]
    for code, (r, _g) in rows.items():
        ref = np.flatnonzero(end[r] < 0)  # the place among the group lives of the latest rows
        where = chunk_no[r[ref]] + slot0[src[point_of(r[ref])]]
        h_kind[where] = code
        h_ref[where] = ref
    for s in range(len(lv.sources)):
        a, b = int(slot0[s]), int(slot0[s + 1])
        lv.held[s] = _Held(
            h_birth[a:b].copy(),
            h_key[a:b].copy(),
            h_stored[a:b].copy(),
            h_kind[a:b].copy(),
            h_ref[a:b].copy(),
        )
    lv._sum_open()
    return lv
