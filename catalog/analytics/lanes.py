"""Lanes: one source's points cut into runs where each point's parent is the point before it,
so the history arithmetic (``catalog.analytics.lives.model``, ``catalog.analytics.walk``) can treat
a branched source as several straight ones.

A source's points form a tree through their parents. A backup's parent is the last point read
from the same device; an overlay's backup's is the overlay's base; two backups of one source
that ran at the same time share a parent. So a source branches, and both branches are valid
histories. The oldest child of a point continues its lane; every later child starts a lane of
its own (a branch). A branch lane starts from its parent's content: its first point's rows, for
the arithmetic, are the content the parent held (the last row per chunk number of the parent's
lane up to the parent, zeros left out), as dedup hits because the branch did not store them,
with the point's own change rows on top. Every lane then reads as a history from an empty disk.

Lane names stay the same as points are added (a new point only extends a lane or starts one),
so the lives cache, which is keyed by name, stays valid: the lane of a source's oldest first
backup is named after the source, every other lane after the source and its first point.

A lane is not whole when its first point's parent is neither absent (a first backup) nor one
of the source's points (a damaged or lost document): its first change table is then relative
to content nobody knows. This module reads nothing and prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalog.analytics.lives.model import Rows
from catalog.analytics.walk import HIT, ZERO, Columns
from catalog.store.points import RecoveryPoint


@dataclass(frozen=True)
class Lane:
    name: str  # the source's name for its main lane, else "<source>@<first point id>"
    source: str
    points: list[RecoveryPoint]  # each the parent of the next
    parent: str | None  # the point a branch starts from (None: from an empty disk)
    whole: bool  # the first point's change table is relative to ``parent`` (or to nothing)


def lanes_of(source: str, mine: list[RecoveryPoint]) -> list[Lane]:
    """The lanes of one source's points, every lane after the lane of its parent."""
    by_time = sorted(mine, key=lambda p: (p.time, p.id))
    ids = {p.id for p in mine}
    children: dict[str | None, list[RecoveryPoint]] = {}
    for p in by_time:
        children.setdefault(p.parent if p.parent in ids else None, []).append(p)
    starts = list(children.get(None, []))
    lanes: list[Lane] = []
    seen: set[str] = set()
    i = 0
    while i < len(starts):
        first = starts[i]
        i += 1
        run = [first]
        while kids := children.get(run[-1].id):
            starts.extend(kids[1:])
            run.append(kids[0])
        seen.update(p.id for p in run)
        main = not lanes and first.parent is None
        name = source if main else f"{source}@{first.id}"
        branch = first.parent if first.parent in ids else None
        lanes.append(Lane(name, source, run, branch, first.parent is None or branch is not None))
    # Points no first backup leads to (only a forged cycle of parents): one broken lane each.
    for p in by_time:
        if p.id not in seen:
            lanes.append(Lane(f"{source}@{p.id}", source, [p], None, False))
    return lanes


def branch_rows(before: Rows, own: Rows) -> Rows:
    """A branch's first point as rows from an empty disk: ``before`` are the rows of its
    parent's lane up to the parent (in order, as the arithmetic sees them), ``own`` its own
    change rows."""
    n = len(before.chunk_no)
    _, first = np.unique(before.chunk_no[::-1], return_index=True)
    last = n - 1 - first  # per chunk number (ascending): the row that put its content there
    last = last[before.kind[last] != ZERO]
    last = last[~np.isin(before.chunk_no[last], own.chunk_no)]
    chunk_no = np.concatenate([before.chunk_no[last], own.chunk_no]).astype(np.int32)
    order = np.argsort(chunk_no, kind="stable")
    return Rows(
        chunk_no[order],
        np.concatenate([before.key[last], own.key]).astype(np.int64)[order],
        np.concatenate([np.full(len(last), HIT, np.int8), own.kind]).astype(np.int8)[order],
        np.concatenate([np.zeros(len(last), np.int32), own.stored]).astype(np.int32)[order],
    )


def lane_columns(cols: Columns, lanes: list[Lane], points: list[RecoveryPoint]) -> Columns:
    """The change rows of lane-major ``points`` as the arithmetic sees them: a branch's first
    point holds its parent's content too (``branch_rows``). ``cols`` itself when no lane is a
    branch."""
    if all(ln.parent is None for ln in lanes):
        return cols
    at = {p.id: i for i, p in enumerate(points)}
    first_of: list[int] = []  # per position: the position of its lane's first point
    for ln in lanes:
        first_of += [len(first_of)] * len(ln.points)
    branch = {at[ln.points[0].id]: at[ln.parent] for ln in lanes if ln.parent is not None}
    parts: list[Rows] = []
    for i in range(len(points)):
        rows = cols.rows(i)
        if i in branch:
            q = branch[i]  # in an earlier lane, so its rows are in ``parts`` already
            rows = branch_rows(_joined(parts[first_of[q] : q + 1]), rows)
        parts.append(rows)
    whole = _joined(parts)
    counts = [len(r.chunk_no) for r in parts]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    return Columns(whole.chunk_no, whole.key, whole.kind, whole.stored, starts)


def _joined(parts: list[Rows]) -> Rows:
    def cat(name: str, dtype: type) -> np.ndarray:
        return np.concatenate([np.zeros(0, dtype), *(getattr(r, name) for r in parts)])

    return Rows(
        cat("chunk_no", np.int32),
        cat("key", np.int64),
        cat("kind", np.int8),
        cat("stored", np.int32),
    )
