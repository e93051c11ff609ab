"""``restore --delta``: rewrite in place only the chunks of an existing output that differ.

Two passes over the point's manifest windows. Compare: the output is read segment by segment
on the restore threads; each data chunk of the point is hashed with the repository's chunk
hasher (keyed in an encrypted repository) and compared with its id, each zero chunk of the
point checked to be zeros (made zero, a hole in a file, where it is not). Rewrite: the chunks
that differ, and only those, are located, read from the packs and written by restore's own
planning and reading (``plan_reads``, ``execute_read``: coalesced, every chunk checked).

The output is modified in place (no temporary file: that is the point), so an interrupted delta
restore leaves a mix of old and restored chunks; running it again completes it (idempotent).
Memory: the manifest rows (as a full restore) and one segment per thread.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from catalog.errors import OutputError, UsageError
from catalog.repo import Repository
from catalog.store.chunks import chunk_id
from catalog.store.index import id_keys, ids_to_array, load_locations
from catalog.store.points import RecoveryPoint
from catalog.store.sealing import Sealer
from drive.formats.export import real_output
from stages.restore import execute_read, plan_reads
from stages.target import RestoreTarget, thread_buffer

from .restore import INFLIGHT_READS, RESTORE_THREADS, WINDOW_LEAVES, Progress, point_windows

# Bytes of the output read and compared per task (a whole number of chunks).
SEGMENT_BYTES = 8 * 1024 * 1024
_EMPTY = pa.table({"offset": pa.array([], pa.int64()), "chunk_id": pa.array([], pa.binary(32))})


@dataclass(frozen=True)
class DeltaResult:
    """What a delta restore did: bytes of the output compared, bytes written (data and zeros),
    and chunks rewritten (data chunks that differed, zero chunks that were not zero)."""

    bytes_checked: int
    bytes_written: int
    chunks_rewritten: int


@dataclass(frozen=True)
class _Compared:
    differ: pa.Table  # the window's rows (offset, chunk_id) whose chunk differs
    bytes_zeroed: int
    chunks_zeroed: int


def open_in_place(output: str, size: int) -> RestoreTarget:
    """The existing output a delta restore rewrites (a symlink is followed)."""
    if not output:
        raise OutputError("no restore output given")
    path = real_output(output)
    if not os.path.exists(path):
        raise UsageError(f"--delta needs an existing output: {output} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"{output} is a directory")
    return RestoreTarget(path, size, name=output, in_place=True)


def _compare(
    target: RestoreTarget,
    start: int,
    end: int,
    rows: pa.Table,
    chunk: int,
    sealer: Sealer,
) -> _Compared:
    """Compare the output's bytes [start, end) with the point (``rows``: its data chunks
    there, sorted by offset); zero at once what should be zero and is not."""
    length = end - start
    view = memoryview(thread_buffer("delta", length, SEGMENT_BYTES))[:length]
    target.read_into(start, view)
    offs = rows.column("offset").to_numpy()
    if len(offs) == 0 and not np.frombuffer(view, np.uint8).any():
        view.release()
        return _Compared(rows, 0, 0)  # a zero region that is zero: one test, not one per chunk
    ids = ids_to_array(rows.column("chunk_id"))
    differ: list[int] = []
    runs: list[list[int]] = []  # [start, end) of nonzero bytes where the point has zeros
    i = 0
    for pos in range(start, end, chunk):
        piece = view[pos - start : min(end, pos + chunk) - start]
        if i < len(offs) and offs[i] == pos:
            if chunk_id(piece, sealer) != bytes(ids[i]):
                differ.append(i)
            i += 1
        elif np.frombuffer(piece, np.uint8).any():
            if runs and runs[-1][1] == pos:
                runs[-1][1] = pos + len(piece)
            else:
                runs.append([pos, pos + len(piece)])
    view.release()
    for a, b in runs:
        target.clear(a, b - a)
    zeroed = sum(b - a for a, b in runs)
    return _Compared(rows.take(pa.array(differ, pa.int64())), zeroed, -(-zeroed // chunk))


def _segments(rows: pa.Table, start: int, end: int, chunk: int) -> list[tuple[int, int, pa.Table]]:
    """A window's range cut into segments, each with its rows."""
    step = max(chunk, SEGMENT_BYTES // chunk * chunk)
    rows = rows.sort_by("offset")
    offs = rows.column("offset").to_numpy()
    out = []
    for a in range(start, end, step):
        b = min(end, a + step)
        lo, hi = np.searchsorted(offs, [a, b])
        out.append((a, b, rows.slice(int(lo), int(hi - lo))))
    return out


def _compare_all(
    pool: ThreadPoolExecutor,
    target: RestoreTarget,
    point: RecoveryPoint,
    sealer: Sealer,
    progress: Progress | None,
    windows: list[tuple[int, pa.Table]],
) -> tuple[pa.Table, int, int]:
    """The compare pass: the rows whose chunk differs, bytes zeroed, chunks zeroed."""
    inflight: deque[Future[_Compared]] = deque()
    differ: list[pa.Table] = []
    zeroed = chunks_zeroed = 0

    def collect(fut: Future[_Compared]) -> None:
        nonlocal zeroed, chunks_zeroed
        got = fut.result()
        differ.append(got.differ)
        zeroed += got.bytes_zeroed
        chunks_zeroed += got.chunks_zeroed

    prev_end = 0
    for end, rows in [*windows, (point.size, _EMPTY)]:  # then the zero tail past the leaves
        end = min(end, point.size)
        for a, b, part in _segments(rows, prev_end, end, point.chunk_size):
            while len(inflight) >= RESTORE_THREADS:
                collect(inflight.popleft())
            inflight.append(pool.submit(_compare, target, a, b, part, point.chunk_size, sealer))
        prev_end = end
        if progress is not None:
            progress(prev_end, point.size)
    while inflight:
        collect(inflight.popleft())
    table = pa.concat_tables(differ) if differ else _EMPTY
    return table, zeroed, chunks_zeroed


def _rewrite(
    pool: ThreadPoolExecutor,
    repo: Repository,
    point: RecoveryPoint,
    differ: pa.Table,
    target: RestoreTarget,
) -> int:
    """The rewrite pass: read the differing chunks (only those) and write them."""
    if differ.num_rows == 0:
        return 0
    needed = np.unique(id_keys(ids_to_array(differ.column("chunk_id"))))
    locations = load_locations(repo.storage, needed)
    del needed
    where = f"recovery point {point.id}"
    step = WINDOW_LEAVES * point.leaf_chunks
    done = 0
    inflight: deque[Future[int]] = deque()
    for i in range(0, differ.num_rows, step):
        rows = differ.slice(i, step)
        for task in plan_reads(rows, locations, where, point.chunk_size, point.size):
            while len(inflight) >= INFLIGHT_READS:
                done += inflight.popleft().result()
            inflight.append(pool.submit(execute_read, repo.storage, task, target))
    while inflight:
        done += inflight.popleft().result()
    return done


def delta_restore(
    repo: Repository,
    point: RecoveryPoint,
    output: str,
    progress: Progress | None = None,
) -> DeltaResult:
    """Make the existing ``output`` byte-identical to ``point``, writing only what differs."""
    windows = point_windows(repo.manifest(point), point)
    target = open_in_place(output, point.size)
    ok = False
    try:
        with ThreadPoolExecutor(RESTORE_THREADS, thread_name_prefix="comb-restore") as pool:
            differ, zeroed, chunks_zeroed = _compare_all(
                pool, target, point, repo.sealer, progress, windows
            )
            written = _rewrite(pool, repo, point, differ, target)
        target.close(durable=True)
        ok = True
    finally:
        if not ok:
            target.close(durable=False)
    return DeltaResult(point.size, written + zeroed, differ.num_rows + chunks_zeroed)
