"""One engine run of a backup: one or more disks read by the same workers, a point per disk.

Commit order (FORMAT.md "Commit protocol"): packs (sealed and fsynced by the workers) -> index
segment -> leaves -> root -> point document by atomic rename. A failure anywhere before the
rename leaves only unreferenced files; no recovery point appears. Several disks share the
engine through one address space (``DISK_SHIFT``): one dedup index and one set of workers
serve them all, their work items interleave, and one whose source cannot be read can fail
alone. What to read is each job's plan (``BackupPlan``: ``pipeline.jobs.backup`` for images,
devices and overlays, ``pipeline.jobs.vsphere_backup`` for a VM's disks).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.errors import CorruptionError, RepositoryError, SourceReadError
from catalog.maint.gc import remove_dead_temporary
from catalog.repo import Repository
from catalog.store import condemned
from catalog.store.assemble import ManifestAssembler
from catalog.store.changes import ChangeTableWriter
from catalog.store.format import RepoConfig
from catalog.store.index import IndexSegmentWriter, ids_to_array
from catalog.store.locks import Lock
from catalog.store.manifest import ManifestReader, ManifestWriter, manifest_data_bytes
from catalog.store.packs import DEFAULT_PACK_TARGET_BYTES
from catalog.store.points import PointStats, RecoveryPoint, commit_point
from catalog.store.storage import Storage
from stages.backup import IndexClient, PackTarget, backup_stages
from stages.base import Fused
from stages.schemas import INDEX_PORT, MAIN_PORT
from stages.sources.image import Source
from stages.sources.multi import DISK_SHIFT, MultiSource

from .. import signals
from ..console import waiting, warn
from ..engines import Engine
from .checkpoint import Checkpoints, adopt, checkpoint_seconds
from .plan import Range, WorkItem, work_items

# 16 MiB work items: large enough that per-call and per-batch Python costs vanish (~256 chunks),
# small enough for reused per-worker buffers. bench/README.md "batch size".
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024
# Work items in flight per worker: one running, one queued, so no worker waits on the driver.
INFLIGHT_PER_WORKER = 2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BackupOptions:
    source_name: str | None = None
    changed_extents: str | None = None
    batch_bytes: int = DEFAULT_BATCH_BYTES
    pack_target_bytes: int = DEFAULT_PACK_TARGET_BYTES
    tags: tuple[str, ...] = ()  # labels of the new points (FORMAT.md 9)
    description: str | None = None


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
class _Tally:
    """Statistics of one backup, summed from the writer's small result tables."""

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


@dataclass
class _Disk:
    job: DiskJob
    base: int
    items: list[WorkItem]
    manifest: ManifestWriter
    changes: ChangeTableWriter
    assembler: ManifestAssembler
    parent_manifest: ManifestReader | None
    tally: _Tally = field(default_factory=_Tally)
    fed: int = 0  # where the known rows given to the assembler end (``DiskJob.known``)
    failed: SourceReadError | None = None  # its source could not be read (then no point)

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


def _interleave(disks: list[_Disk]) -> list[tuple[_Disk, WorkItem]]:
    """Work items of all disks, round robin, each disk's in its own disk order."""
    out: list[tuple[_Disk, WorkItem]] = []
    for i in range(max((len(d.items) for d in disks), default=0)):
        out.extend((d, d.items[i]) for d in disks if i < len(d.items))
    return out


def _shifted(item: WorkItem, base: int) -> pa.Table:
    if not base:
        return item.table()
    return WorkItem(item.seq, [(s + base, e + base) for s, e in item.ranges], item.end).table()


def _unshifted(written: pa.Table, base: int) -> pa.Table:
    if not base:
        return written
    offs = written.column("offset").to_numpy() - base
    return written.set_column(0, "offset", pa.array(offs, pa.int64()))


def _drive(
    engine: Engine,
    disks: list[_Disk],
    index_seg: IndexSegmentWriter,
    progress: Progress | None,
    checkpoints: Checkpoints,
    alone: bool = False,
) -> None:
    """Keep at most ``INFLIGHT_PER_WORKER`` items per worker in flight (backpressure); take the
    results in submission order, so each disk's manifest streams out leaf by leaf. ``alone``:
    a disk whose source cannot be read fails alone (``_Disk.failed``), the others go on."""
    order = _interleave(disks)
    to_read = sum(item.bytes for _, item in order)
    done = 0
    if progress is not None:
        progress(0, to_read)  # the engine is up: the bar stops saying it is starting
    window: deque[tuple[_Disk, WorkItem, object]] = deque()
    pos = 0
    while pos < len(order) or window:
        while pos < len(order) and len(window) < engine.workers * INFLIGHT_PER_WORKER:
            disk, item = order[pos]
            pos += 1
            if disk.failed is None:
                window.append((disk, item, engine.submit(_shifted(item, disk.base))))
        if not window:
            continue
        disk, item, handle = window.popleft()
        try:
            ports = engine.result(handle)
        except SourceReadError as err:
            if not alone:
                raise
            to_read -= disk.fail(err, item)  # (no row of that item was stored)
            if progress is not None:
                progress(done, to_read)
            continue
        items = disk.items
        nxt = items[item.seq + 1].ranges[0][0] if item.seq + 1 < len(items) else None
        upto = disk.job.plan.size if nxt is None else nxt
        written = _unshifted(ports[MAIN_PORT], disk.base)
        stored = written.filter(written.column("new"))
        if stored.num_rows:  # where the chunks its rows will name were read (catalog.store.blocks)
            index_seg.read_at(
                ids_to_array(stored.column("chunk_id")), stored.column("offset").to_numpy()
            )
        if INDEX_PORT in ports:
            index_seg.add(ports[INDEX_PORT])
            checkpoints.add(ports[INDEX_PORT])
        if disk.failed is not None:
            continue
        disk.tally.add(item.bytes, written)
        disk.feed_read(item, written)
        disk.feed_known(upto)
        disk.assembler.advance(upto)
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


def _parent_data(parent: RecoveryPoint | None, manifest: ManifestReader | None) -> int:
    """Data bytes of the parent's image: from its document, or (for a point made before change
    tables existed) counted once from its manifest."""
    if parent is None or manifest is None:
        return 0
    if parent.changes is not None:
        return parent.stats.bytes_data
    return manifest_data_bytes(manifest, parent.size, parent.chunk_size, parent.leaf_chunks)


def run_jobs(
    repo: Repository,
    jobs: list[DiskJob],
    engine: Engine,
    opts: BackupOptions,
    progress: Progress | None = None,
    t0: float | None = None,
    lock: Lock | None = None,
    failures: list[tuple[str, SourceReadError]] | None = None,
) -> list[RecoveryPoint]:
    """Back up one or more disks in one engine run; one recovery point per disk, each
    committed on its own (in ``jobs`` order) once every disk's data is in, and only while
    ``lock`` (the backup's shared lock) is surely still held (``Lock.held``). With
    ``failures``, a disk whose source cannot be read gets no point and is added there."""
    t0 = time.perf_counter() if t0 is None else t0
    cfg = repo.config
    storage = repo.storage
    every = checkpoint_seconds()  # (a bad setting stops the backup before it writes)
    remove_dead_temporary(storage)  # what killed writers left (their pid is gone)
    sealer = repo.sealer.for_workers()
    target = PackTarget(repo.location, opts.pack_target_bytes, sealer=sealer, parity=cfg.parity)
    source: Source = (
        jobs[0].source if len(jobs) == 1 else MultiSource(tuple(j.source for j in jobs))
    )

    def make_stage(index: IndexClient) -> Fused:
        return Fused(
            backup_stages(source, cfg.chunk_size, opts.batch_bytes, index, cfg.zstd_level, target)
        )

    disks: list[_Disk] = []
    for i, job in enumerate(jobs):
        plan = job.plan
        parent_manifest = repo.manifest(plan.parent) if plan.parent is not None else None
        manifest = ManifestWriter(storage)
        changes = job.make_changes(storage)
        assembler = ManifestAssembler(
            manifest,
            cfg.chunk_size,
            cfg.leaf_chunks,
            parent_manifest,
            plan.changed,
            changes,
            plan.size,
            plan.parent.size if plan.parent is not None else 0,
        )
        items = list(work_items(plan.read, opts.batch_bytes, cfg.chunk_size))
        base = i << DISK_SHIFT if len(jobs) > 1 else 0
        disks.append(_Disk(job, base, items, manifest, changes, assembler, parent_manifest))
    index_seg = IndexSegmentWriter(storage)
    checkpoints = Checkpoints(storage, every, lock.info.id if lock is not None else None)
    failed = True
    try:
        # Before the dedup index is loaded (engine.start): a prune condemning later waits for
        # this backup; one whose record is here already may be removing (``commit_guard``).
        guarded = bool(condemned.names(storage))
        if lock is not None:  # (in the session: what dead runs' checkpoints hold, reused)
            try:
                adopt(storage, lock.held)
            except (OSError, RepositoryError, CorruptionError) as err:
                warn(f"the checkpoints of killed runs were not reused: {err}")
        engine.start(repo.location, make_stage, sealer)
        _drive(engine, disks, index_seg, progress, checkpoints, failures is not None)
        for disk in disks:
            if disk.failed is not None and failures is not None:
                failures.append((disk.job.source_path, disk.failed))
                disk.manifest.abort()
                disk.changes.abort()
        held = lock.held if lock is not None else lambda: None
        held()  # (a prune may have run if it was lost: nothing is committed then)
        parity = cfg.parity is not None
        with condemned.commit_guard(storage, guarded, index_seg.packs, parity, held, waiting):
            # Once the commit begins, a signal waits for it, the engine's shutdown and the
            # report: the points are committed and reported, never committed and reported as
            # interrupted.
            signals.hold()
            segment_id, index_bytes = index_seg.commit()
            committed = []
            for disk in (d for d in disks if d.failed is None):
                committed.append(
                    _commit_disk(
                        disk,
                        engine.name,
                        (segment_id, index_seg.blocks_id),
                        index_bytes,
                        t0,
                        cfg,
                        storage,
                        opts,
                    )
                )
                index_bytes = 0  # one segment for the run: counted with the first disk
        failed = False
        checkpoints.discard()
        engine.close(False)
        return committed
    finally:
        if failed:
            with signals.deferred():  # a second Ctrl-C must not cut the cleanup short
                for disk in disks:
                    disk.manifest.abort()
                    disk.changes.abort()
                index_seg.abort()
                checkpoints.abort()
                engine.close(True)


def _commit_disk(
    disk: _Disk,
    engine_name: str,
    segment: tuple[str | None, str | None],
    index_bytes: int,
    t0: float,
    cfg: RepoConfig,
    storage: Storage,
    opts: BackupOptions,
) -> RecoveryPoint:
    plan, tally, changes, manifest = disk.job.plan, disk.tally, disk.changes, disk.manifest
    segment_id, segment_blocks = segment
    leaves_id, root_id, manifest_bytes = manifest.commit()
    changes_id, changes_bytes = changes.commit()
    fields: dict[str, Any] = dict(
        source=plan.source_name,
        source_path=disk.job.source_path,
        time=datetime.now(UTC).isoformat(timespec="microseconds"),
        size=plan.size,
        chunk_size=cfg.chunk_size,
        leaf_chunks=cfg.leaf_chunks,
        root=root_id,
        leaves=leaves_id,
        parent=plan.parent.id if plan.parent is not None else None,
        index_segment=segment_id,
        engine=engine_name,
        mode=plan.mode,
        changes=changes_id,
        blocks={
            "leaves": manifest.leaves_blocks if leaves_id else None,
            "index_segment": segment_blocks if segment_id else None,
        },
        stats=PointStats(
            bytes_read=tally.read,
            bytes_new=tally.new,
            bytes_stored=tally.stored,
            bytes_zero=tally.zero,
            bytes_changed=changes.bytes_changed,
            bytes_data=_parent_data(plan.parent, disk.parent_manifest) + disk.assembler.data_delta,
            chunks=tally.chunks,
            chunks_new=tally.chunks_new,
            leaves_new=manifest.new_leaves,
            leaves_shared=manifest.ref_leaves,
            metadata_bytes=index_bytes + manifest_bytes + changes_bytes,
            seconds=round(time.perf_counter() - t0, 3),
        ),
        tags=opts.tags,
        description=opts.description,
    )
    if disk.job.fields is not None:  # the caller's own fields win (a copy keeps its time)
        fields.update(disk.job.fields(changes))
    return commit_point(storage, RecoveryPoint(**fields))
