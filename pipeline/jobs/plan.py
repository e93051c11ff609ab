"""Planning a backup: which byte ranges to read, cut into work items. Pure functions."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from catalog.errors import ChangeListError, describe_os_error
from stages.schemas import EXTENTS

Range = tuple[int, int]  # (start, end), end exclusive
# A change list is read whole; 1 GiB holds ~25 M extents (a fully changed 1.5 PiB disk at
# 64 KiB). Anything larger, or endless (/dev/zero), is refused before it is read.
MAX_CHANGE_LIST_BYTES = 1 << 30


def align(ranges: list[Range], chunk: int, size: int) -> list[Range]:
    """Expand ranges to chunk boundaries, clamp to size, sort and merge."""
    out: list[Range] = []
    for start, end in sorted((s - s % chunk, min(size, -(-e // chunk) * chunk)) for s, e in ranges):
        if start >= end:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def clip(runs: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) runs cut to [start, end) (a source's ``data_extents``)."""
    out = []
    for o, n in runs:
        lo, hi = max(o, start), min(o + n, end)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """Intersection of two sorted, merged range lists."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """Ranges of ``a`` not in ``b`` (both sorted and merged)."""
    out: list[Range] = []
    j = 0
    for start, end in a:
        pos = start
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def total(ranges: list[Range]) -> int:
    return sum(e - s for s, e in ranges)


def parse_changed_extents(path: str, size: int) -> list[Range]:
    """Read a changed-extents JSON file: an array of {"offset": int, "length": int} in bytes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ChangeListError(f"changed-extents file {path} is not a regular file")
        if st.st_size > MAX_CHANGE_LIST_BYTES:
            raise ChangeListError(
                f"changed-extents file {path} is larger than {MAX_CHANGE_LIST_BYTES} bytes"
            )
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(MAX_CHANGE_LIST_BYTES + 1))
    except OSError as err:
        raise ChangeListError(
            f"cannot read changed-extents file {path}: {describe_os_error(err)}"
        ) from None
    except ValueError as err:
        raise ChangeListError(f"changed-extents file {path} is not valid JSON ({err})") from None
    if not isinstance(doc, list):
        raise ChangeListError(f"changed-extents file {path} must hold a JSON array of extents")
    out: list[Range] = []
    for i, ext in enumerate(doc):
        if not isinstance(ext, dict) or set(ext) != {"offset", "length"}:
            raise ChangeListError(
                f"changed-extents file {path}: item {i} must be an object with exactly "
                '"offset" and "length"'
            )
        off, length = ext["offset"], ext["length"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, length)):
            raise ChangeListError(f"changed-extents file {path}: item {i} has non-integer values")
        if off < 0 or length < 0:
            raise ChangeListError(f"changed-extents file {path}: item {i} is negative")
        if off + length > size:
            raise ChangeListError(
                f"changed-extents file {path}: item {i} ({off}+{length}) is beyond the end of "
                f"the source ({size} bytes)"
            )
        if length:
            out.append((off, off + length))
    return out


@dataclass(frozen=True)
class WorkItem:
    """A batch of chunk-aligned ranges for one worker call; ``end`` bounds what it covers."""

    seq: int
    ranges: list[Range]
    end: int

    @property
    def bytes(self) -> int:
        return total(self.ranges)

    def table(self) -> pa.Table:
        return pa.table(
            [
                pa.array([s for s, _ in self.ranges], pa.int64()),
                pa.array([e - s for s, e in self.ranges], pa.int64()),
            ],
            schema=EXTENTS,
        )


def work_items(ranges: list[Range], batch_bytes: int, chunk: int) -> Iterator[WorkItem]:
    """Cut aligned ranges into items of at most ``batch_bytes`` (a multiple of the chunk)."""
    batch_bytes = max(chunk, batch_bytes - batch_bytes % chunk)
    cur: list[Range] = []
    cur_bytes = 0
    seq = 0
    for start, end in ranges:
        pos = start
        while pos < end:
            take = min(end - pos, batch_bytes - cur_bytes)
            cur.append((pos, pos + take))
            cur_bytes += take
            pos += take
            if cur_bytes >= batch_bytes:
                yield WorkItem(seq, cur, cur[-1][1])
                seq += 1
                cur, cur_bytes = [], 0
    if cur:
        yield WorkItem(seq, cur, cur[-1][1])


def shifted(item: WorkItem, base: int) -> pa.Table:
    """An item's table with its ranges moved by ``base`` (a disk's place in a run's address
    space, ``stages.sources.multi``)."""
    if not base:
        return item.table()
    return WorkItem(item.seq, [(s + base, e + base) for s, e in item.ranges], item.end).table()


def unshifted(written: pa.Table, base: int) -> pa.Table:
    """Result rows moved back to their disk's own offsets."""
    if not base:
        return written
    offs = written.column("offset").to_numpy() - base
    return written.set_column(0, "offset", pa.array(offs, pa.int64()))
