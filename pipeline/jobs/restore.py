"""The restore job: stream the manifest in windows, read packs in large ranges, check, write.

Runs on threads in this process: restore writes one output file, and zstd, BLAKE3 and
pread/pwrite release the GIL. Memory is bounded by the window, whatever the disk size.
"""

from __future__ import annotations

import os
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, cast

import numpy as np
import pyarrow as pa

from catalog.errors import OutputError
from catalog.repo import Repository
from catalog.store.index import id_keys, ids_to_array, load_locations
from catalog.store.manifest import ManifestReader
from catalog.store.points import RecoveryPoint
from drive.formats.export import adopt_attributes, real_output
from stages.restore import execute_read, leaves_to_table, plan_reads
from stages.target import RestoreTarget

from ..malloc import keep_freed_memory

# Leaves per planning window: 256 x 1 MiB of disk; bounds memory and keeps reads sequential.
WINDOW_LEAVES = 256
# Threads overlap pack reads, decompression (GIL released) and writes.
RESTORE_THREADS = max(4, 2 * (os.cpu_count() or 2))
# Coalesced reads in flight (each at most catalog.read.coalesce.READ_BYTES, 8 MiB): bounds memory.
INFLIGHT_READS = 2 * RESTORE_THREADS

Progress = Callable[[int, int], None]


def iter_windows(
    manifest: ManifestReader, window: int = WINDOW_LEAVES
) -> Iterator[tuple[list[int], list]]:
    refs = manifest.refs()
    for i in range(0, len(refs), window):
        part = refs[i : i + window]
        yield [r.leaf_no for r in part], [manifest.leaf(r) for r in part]


def point_windows(
    manifest: ManifestReader, point: RecoveryPoint, window: int = WINDOW_LEAVES
) -> list[tuple[int, pa.Table]]:
    """One pass over the manifest: per window, its end (bytes) and its rows (offset, id).
    Compact Arrow rows (40 B per data chunk) replace the leaves, which are read only once."""
    out = []
    for leaf_nos, leaves in iter_windows(manifest, window):
        rows = leaves_to_table(leaf_nos, leaves, point.chunk_size, point.leaf_chunks)
        out.append(((leaf_nos[-1] + 1) * point.chunk_size * point.leaf_chunks, rows))
    return out


def restore_point(
    repo: Repository,
    point: RecoveryPoint,
    output: str,
    force: bool = False,
    progress: Progress | None = None,
    verify_only: bool = False,
) -> int:
    """Restore ``point`` into ``output`` (or only read and check it); returns data bytes."""
    keep_freed_memory()  # its threads decode batch after batch, as a backup's workers do
    windows = point_windows(repo.manifest(point), point)
    ids = [id_keys(ids_to_array(rows.column("chunk_id"))) for _, rows in windows]
    needed = np.unique(np.concatenate(ids)) if ids else np.empty(0, "S32")
    locations = load_locations(repo.storage, needed)
    del ids, needed
    target = None if verify_only else _open_target(output, point.size, force)
    output = target.name if target is not None else output
    done = 0
    ok = False
    where = f"recovery point {point.id}"
    try:
        with ThreadPoolExecutor(RESTORE_THREADS, thread_name_prefix="comb-restore") as pool:
            inflight: deque[Future[int]] = deque()
            prev_end = 0
            for end, rows in windows:
                if target is not None and target.is_block:
                    _zero_gaps(target, point, rows, prev_end, end)
                prev_end = end
                for task in plan_reads(rows, locations, where, point.chunk_size, point.size):
                    while len(inflight) >= INFLIGHT_READS:
                        done += inflight.popleft().result()
                    inflight.append(pool.submit(execute_read, repo.storage, task, target))
                if progress is not None:
                    progress(min(prev_end, point.size), point.size)
            while inflight:
                done += inflight.popleft().result()
        if target is not None and target.is_block:
            target.zero(prev_end, point.size - prev_end)
        if target is not None:
            if target.path != output:
                adopt_attributes(target.fd, output)
            target.close(durable=True)
            if target.path != output:
                _publish(target.path, output, force)
        ok = True
    finally:
        if target is not None and not ok:
            target.close(durable=False)
            if target.path != output:
                try:
                    os.unlink(target.path)
                except OSError:
                    pass
    return done


def _open_target(output: str, size: int, force: bool) -> RestoreTarget:
    """Where a restore writes: a block device in place; a file under a private temporary name
    beside it (published when complete). A symlink is followed, never replaced."""
    if not output:
        raise OutputError("no restore output given")
    output = real_output(output)
    if os.path.exists(output) and not force:
        raise OutputError(f"{output} exists (use --force to overwrite)")
    if os.path.exists(output) and not os.path.isfile(output):
        return RestoreTarget(output, size)
    # A private temporary name, created exclusively: two restores to one output never write
    # into the same file; the finished one is then published atomically.
    head, tail = os.path.split(os.path.abspath(output))
    tmp = os.path.join(head, f".{tail}.comb-partial-{os.getpid()}-{secrets.token_hex(4)}")
    return RestoreTarget(tmp, size, exclusive=True, name=output)


def _publish(tmp: str, final: str, force: bool) -> None:
    """Give the finished temporary file its final name: without --force, never replace a file
    that appeared meanwhile (link fails if the name exists); then make the name durable."""
    try:
        if force:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise OutputError(f"{final} exists (use --force to overwrite)") from None
            os.unlink(tmp)
        fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot publish {final}: {err.strerror}") from None


def _zero_gaps(
    target: RestoreTarget, point: RecoveryPoint, rows: pa.Table, start: int, end: int
) -> None:
    """On a block device, zero every chunk the manifest says is zero (a file stays sparse)."""
    pos = start
    for off in sorted(rows.column("offset").to_pylist()):
        target.zero(pos, off - pos)
        pos = min(point.size, off + point.chunk_size)
    target.zero(pos, min(end, point.size) - pos)


# Leaves per window when streaming (``restore_to_stream``): the data of one window is held in
# memory until it is written in order (32 MiB of disk with the default chunk and leaf sizes).
STREAM_WINDOW_LEAVES = 32
_ZEROS = bytes(1 << 20)


class _Pieces:
    """What ``execute_read`` writes to, when streaming: the window's pieces, kept in memory."""

    is_block = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.pieces: list[tuple[int, bytes]] = []

    def write_pieces(self, pieces: list[tuple[int, bytes]]) -> int:
        clipped = [(off, data[: max(0, self.size - off)]) for off, data in pieces]
        self.pieces.extend(clipped)  # one call: atomic between the reading threads
        return sum(len(d) for _, d in clipped)


def _write_zeros(out: BinaryIO, length: int) -> None:
    while length > 0:
        n = min(length, len(_ZEROS))
        out.write(_ZEROS[:n])
        length -= n


def restore_to_stream(
    repo: Repository, point: RecoveryPoint, out: BinaryIO, progress: Progress | None = None
) -> int:
    """Write ``point``'s whole image to ``out`` in order (zero regions as zeros: a pipe cannot
    have holes), every chunk checked; returns the data bytes written. Window by window: the
    window's ranges are read in parallel, then its bytes written in order."""
    windows = point_windows(repo.manifest(point), point, STREAM_WINDOW_LEAVES)
    ids = [id_keys(ids_to_array(rows.column("chunk_id"))) for _, rows in windows]
    needed = np.unique(np.concatenate(ids)) if ids else np.empty(0, "S32")
    locations = load_locations(repo.storage, needed)
    del ids, needed
    where = f"recovery point {point.id}"
    done = pos = 0
    with ThreadPoolExecutor(RESTORE_THREADS, thread_name_prefix="comb-restore") as pool:
        for end, rows in windows:
            sink = _Pieces(point.size)
            tasks = plan_reads(rows, locations, where, point.chunk_size, point.size)
            target = cast(RestoreTarget, sink)  # execute_read calls only write_pieces
            for fut in [pool.submit(execute_read, repo.storage, t, target) for t in tasks]:
                done += fut.result()
            for off, data in sorted(sink.pieces, key=lambda p: p[0]):
                _write_zeros(out, off - pos)
                out.write(data)
                pos = off + len(data)
            if progress is not None:
                progress(min(end, point.size), point.size)
    _write_zeros(out, point.size - pos)
    out.flush()
    return done
