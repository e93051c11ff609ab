"""What a copy between repositories that share chunk ids need not read (``init
--copy-keys-from``): the chunks of the original the target holds already.

Where the same data has the same id in both repositories, the original's manifest names each
chunk's id in the target too. A chunk whose id the target's index holds (in a pack no prune has
condemned: ``DedupIndex.load``) is then neither fetched, opened, decompressed nor hashed: its
manifest row is taken from the original's manifest (``KnownChunks.rows``) and fed to the
target's manifest assembler with the rows of what was read (``pipeline.jobs.runner``). The
target's own index is read once per copy, under the copy's backup session, so a prune that
condemns later waits for the copy (FORMAT.md 13).

Owns the split of a copy's reads into read and known chunks. Must not: decide which points are
copied or run the engine (``pipeline.jobs.copy``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from catalog.store.index import DedupIndex, array_to_ids
from catalog.store.manifest import ManifestReader
from catalog.store.points import RecoveryPoint
from stages.schemas import WRITTEN

from .plan import Range, subtract

# Chunks of the original's manifest looked at per step (bounded memory: their rows only).
WINDOW_CHUNKS = 65536


def _windows(ranges: list[Range], chunk: int, leaf_chunks: int) -> list[tuple[int, int]]:
    """The leaf numbers [lo, hi) that ``ranges`` touch, merged and cut into steps of at most
    ``WINDOW_CHUNKS`` chunks."""
    leaf_bytes = chunk * leaf_chunks
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        lo, hi = start // leaf_bytes, -(-end // leaf_bytes)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    step = max(1, WINDOW_CHUNKS // leaf_chunks)
    return [(a, min(hi, a + step)) for lo, hi in out for a in range(lo, hi, step)]


def _inside(nums: np.ndarray, ranges: list[Range], chunk: int) -> np.ndarray:
    """True where chunk number ``nums[i]`` starts inside one of the sorted ``ranges``."""
    starts = np.array([s for s, _ in ranges], np.int64)
    ends = np.array([e for _, e in ranges], np.int64)
    offs = nums * chunk
    pos = np.searchsorted(starts, offs, "right") - 1
    ok = pos >= 0
    ok[ok] = offs[ok] < ends[pos[ok]]
    return ok


def _runs(nums: np.ndarray, chunk: int, size: int) -> list[Range]:
    """Sorted chunk numbers as merged byte ranges (the last chunk may end at ``size``)."""
    if not len(nums):
        return []
    cut = np.flatnonzero(np.diff(nums) != 1) + 1
    firsts = np.concatenate([[0], cut])
    lasts = np.concatenate([cut - 1, [len(nums) - 1]])
    return [
        (int(nums[a]) * chunk, min(size, (int(nums[b]) + 1) * chunk))
        for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True)
    ]


def split_known(
    point: RecoveryPoint, manifest: ManifestReader, read: list[Range], held: DedupIndex
) -> tuple[list[Range], list[Range]]:
    """(what to read, what the target holds) of the chunk-aligned ``read`` ranges of
    ``point``, judged by the ids in its manifest."""
    chunk, leaf_chunks = point.chunk_size, point.leaf_chunks
    known: list[Range] = []
    for lo, hi in _windows(read, chunk, leaf_chunks):
        nums, ids, _files = manifest.chunks(lo, hi, leaf_chunks)
        sel = _inside(nums, read, chunk) if len(nums) else np.zeros(0, bool)
        nums, ids = nums[sel], ids[sel]
        if len(nums):
            runs = _runs(nums[held.holds(ids)], chunk, point.size)
            if known and runs and runs[0][0] == known[-1][1]:
                known[-1] = (known[-1][0], runs.pop(0)[1])
            known.extend(runs)
    return subtract(read, known), known


class KnownChunks:
    """The manifest rows of a point's known chunks, by disk range (``DiskJob.known``)."""

    def __init__(self, point: RecoveryPoint, manifest: ManifestReader, known: list[Range]) -> None:
        self._point = point
        self._manifest = manifest
        self._known = known
        self._next = 0  # the first known range not yet given out (calls go up the disk)

    def rows(self, start: int, end: int) -> Iterator[tuple[pa.Table, int]]:
        """WRITTEN rows (stored here already: not new) of the known chunks in [start, end),
        a window of leaves at a time (bounded memory), each with the offset it completes."""
        ranges: list[Range] = []
        while self._next < len(self._known) and self._known[self._next][0] < end:
            s, e = self._known[self._next]
            if e <= end:
                self._next += 1
            else:  # (``end`` is chunk-aligned: the rest is given on the next call)
                self._known[self._next] = (end, e)
                e = end
            if e > start:
                ranges.append((max(s, start), e))
        return self._windows(ranges, end)

    def _windows(self, ranges: list[Range], end: int) -> Iterator[tuple[pa.Table, int]]:
        chunk, leaf_chunks = self._point.chunk_size, self._point.leaf_chunks
        for lo, hi in _windows(ranges, chunk, leaf_chunks):
            nums, ids, _files = self._manifest.chunks(lo, hi, leaf_chunks)
            sel = _inside(nums, ranges, chunk) if len(nums) else np.zeros(0, bool)
            yield self._table(nums[sel], ids[sel]), min(end, hi * chunk * leaf_chunks)

    def _table(self, nums: np.ndarray, ids: np.ndarray) -> pa.Table:
        chunk = self._point.chunk_size
        offs = nums * chunk
        lengths = np.minimum(chunk, self._point.size - offs).astype(np.int32)
        n = len(nums)
        return pa.table(
            [
                pa.array(offs, pa.int64()),
                pa.array(lengths, pa.int32()),
                array_to_ids(ids),
                pa.array(np.zeros(n, bool), pa.bool_()),
                pa.array(np.zeros(n, bool), pa.bool_()),
                pa.array(np.zeros(n, np.int32), pa.int32()),
            ],
            schema=WRITTEN,
        )
