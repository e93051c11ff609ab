"""The loop of one engine run (``pipeline.jobs.runner`` sets it up and commits): work items in
flight, a few per worker (backpressure), results taken in submission order into each disk's
manifest, leaf by leaf, and the chunks stored into the run's index segment.

Several disks share the run through one address space (``DISK_SHIFT``, ``plan.shifted``):
their items interleave; a disk placed where no Ray node is, or whose source cannot be read,
fails alone when the caller asks for that. Each disk also keeps what it read (``Tally``) and
the Ray nodes that read it.

Owns the loop and the per-disk state. Must not: plan, open the engine or commit (``runner``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.errors import SourceReadError
from catalog.store.assemble import ManifestAssembler
from catalog.store.changes import ChangeTableWriter
from catalog.store.index import IndexSegmentWriter, ids_to_array
from catalog.store.manifest import ManifestReader, ManifestWriter
from catalog.store.points import RecoveryPoint
from catalog.store.storage import Storage
from stages.base import Ports
from stages.schemas import INDEX_PORT, MAIN_PORT
from stages.sources.image import Source

from ..engines import Engine
from .checkpoint import Checkpoints
from .plan import Range, WorkItem, shifted, unshifted

Progress = Callable[[int, int], None]

# Work items in flight per worker: one running, one queued, so no worker waits on the driver.
INFLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class BackupPlan:
    """What one disk's backup reads, its parent, and any aligned changed ranges."""

    source_name: str
    size: int
    parent: RecoveryPoint | None
    mode: str
    read: list[Range]
    changed: list[Range] | None


@dataclass
class Tally:
    """Statistics of one disk's backup, summed from the writer's small result tables."""

    read: int = 0
    new: int = 0
    stored: int = 0
    zero: int = 0
    chunks: int = 0
    chunks_new: int = 0

    def add(self, item_bytes: int, written: pa.Table) -> None:
        lengths = written.column("length").to_numpy()
        new = written.column("new").to_numpy(zero_copy_only=False)
        zero = written.column("zero").to_numpy(zero_copy_only=False)
        self.read += item_bytes
        self.new += int(lengths[new].sum())
        self.stored += int(written.column("stored_len").to_numpy().sum())
        self.zero += int(lengths[zero].sum())
        self.chunks += written.num_rows
        self.chunks_new += int(new.sum())


@dataclass
class DiskJob:
    """One disk of a run: its plan, its source, and the point fields its caller adds once the
    data is in (``fields`` sees the change table writer: which audited chunks changed)."""

    plan: BackupPlan
    source: Source
    source_path: str
    make_changes: Callable[[Storage], ChangeTableWriter] = ChangeTableWriter
    fields: Callable[[ChangeTableWriter], dict[str, Any]] | None = None
    # Rows of stored chunks the plan does not read, by range [start, end) in disk order, a
    # window at a time with the offset each completes (``pipeline.jobs.copy_known``).
    known: Callable[[int, int], Iterator[tuple[pa.Table, int]]] | None = None
    node: str | None = None  # read only on the Ray nodes this names (``pipeline.ray_placement``)


@dataclass
class Disk:
    job: DiskJob
    base: int
    items: list[WorkItem]
    manifest: ManifestWriter
    changes: ChangeTableWriter
    assembler: ManifestAssembler
    parent_manifest: ManifestReader | None
    tally: Tally = field(default_factory=Tally)
    fed: int = 0  # where the known rows given to the assembler end (``DiskJob.known``)
    failed: SourceReadError | None = None  # its source could not be read (then no point)
    nodes: dict[str, str] = field(default_factory=dict)  # Ray nodes that read it: id -> address

    def fail(self, err: SourceReadError, item: WorkItem) -> int:
        """Note the source as unreadable (its first error); the bytes it now leaves unread."""
        if self.failed is not None:
            return 0
        self.failed = err
        return sum(i.bytes for i in self.items[item.seq :])

    def feed_known(self, upto: int) -> None:
        """Give the assembler the known rows before ``upto`` not given yet, a window at a time,
        each followed by its watermark (so memory holds a window, not the disk)."""
        if self.job.known is None or upto <= self.fed:
            return
        for rows, done in self.job.known(self.fed, upto):
            self.tally.add(0, rows)
            self.assembler.feed(rows)
            self.assembler.advance(done)
        self.fed = upto

    def feed_read(self, item: WorkItem, written: pa.Table) -> None:
        """An item's rows, range by range, each after the known rows before it (no known
        chunk lies inside a range read: ``pipeline.jobs.copy_known``)."""
        if self.job.known is None:
            self.assembler.feed(written)
            return
        offs = written.column("offset").to_numpy()
        for start, end in item.ranges:
            self.feed_known(start)
            lo, hi = np.searchsorted(offs, [start, end]).tolist()
            self.assembler.feed(written.slice(lo, hi - lo))
            self.fed = max(self.fed, end)


def _interleave(disks: list[Disk]) -> list[tuple[Disk, WorkItem]]:
    """Work items of all disks, round robin, each disk's in its own disk order."""
    out: list[tuple[Disk, WorkItem]] = []
    for i in range(max((len(d.items) for d in disks), default=0)):
        out.extend((d, d.items[i]) for d in disks if i < len(d.items))
    return out


def _fail_unplaced(engine: Engine, disks: list[Disk], alone: bool) -> None:
    """The disks placed where no node is (``Engine.unplaced``) fail before any read (alone: the
    others go on)."""
    for disk in disks:
        why = engine.unplaced.get(disk.job.node or "")
        if why is not None and disk.items:
            if not alone:
                raise SourceReadError(f"{disk.job.source_path}: {why}")
            disk.fail(SourceReadError(why), disk.items[0])


def _take(
    disk: Disk, item: WorkItem, ports: Ports, index_seg: IndexSegmentWriter,
    checkpoints: Checkpoints,
) -> bool:  # fmt: skip
    """An item's results: the chunks stored (for the index, whatever becomes of the disk), then
    its rows into the disk's manifest; False when the disk failed meanwhile."""
    items = disk.items
    nxt = items[item.seq + 1].ranges[0][0] if item.seq + 1 < len(items) else None
    upto = disk.job.plan.size if nxt is None else nxt
    written = unshifted(ports[MAIN_PORT], disk.base)
    stored = written.filter(written.column("new"))
    if stored.num_rows:  # where the chunks its rows will name were read (catalog.store.blocks)
        index_seg.read_at(
            ids_to_array(stored.column("chunk_id")), stored.column("offset").to_numpy()
        )
    if INDEX_PORT in ports:
        index_seg.add(ports[INDEX_PORT])
        checkpoints.add(ports[INDEX_PORT])
    if disk.failed is not None:
        return False
    disk.tally.add(item.bytes, written)
    disk.feed_read(item, written)
    disk.feed_known(upto)
    disk.assembler.advance(upto)
    return True


def drive(
    engine: Engine,
    disks: list[Disk],
    index_seg: IndexSegmentWriter,
    progress: Progress | None,
    checkpoints: Checkpoints,
    alone: bool = False,
) -> None:
    """Keep at most ``INFLIGHT_PER_WORKER`` items per worker in flight (backpressure); take the
    results in submission order, so each disk's manifest streams out leaf by leaf. ``alone``:
    a disk whose source cannot be read fails alone (``Disk.failed``), the others go on."""
    _fail_unplaced(engine, disks, alone)
    order = [(d, i) for d, i in _interleave(disks) if d.failed is None]
    to_read = sum(item.bytes for _, item in order)
    done = 0
    if progress is not None:
        progress(0, to_read)  # the engine is up: the bar stops saying it is starting
    window: deque[tuple[Disk, WorkItem, object]] = deque()
    pos = 0
    while pos < len(order) or window:
        while pos < len(order) and len(window) < engine.width * INFLIGHT_PER_WORKER:
            disk, item = order[pos]
            pos += 1
            if disk.failed is None:
                handle = engine.submit(shifted(item, disk.base), disk.job.node)
                window.append((disk, item, handle))
        if not window:
            continue
        disk, item, handle = window.popleft()
        where = engine.node_of(handle)
        if where is not None:
            disk.nodes[where[0]] = where[1]
        try:
            ports = engine.result(handle)
        except SourceReadError as err:
            if not alone:
                raise
            to_read -= disk.fail(err, item)  # (no row of that item was stored)
            if progress is not None:
                progress(done, to_read)
            continue
        if _take(disk, item, ports, index_seg, checkpoints):
            done += item.bytes
            if progress is not None:
                progress(done, to_read)
    for ports in engine.finish():
        if INDEX_PORT in ports:
            index_seg.add(ports[INDEX_PORT])
            checkpoints.add(ports[INDEX_PORT])
    for disk in disks:
        if disk.failed is None:
            disk.feed_known(disk.job.plan.size)  # (all of it when nothing was read)
            disk.assembler.finish()
