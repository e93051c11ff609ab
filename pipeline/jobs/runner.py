"""One engine run of a backup: one or more disks read by the same workers, a point per disk.

Commit order (FORMAT.md "Commit protocol"): packs (sealed and fsynced by the workers) -> index
segment -> leaves -> root -> point document by atomic rename. A failure anywhere before the
rename leaves only unreferenced files; no recovery point appears. Several disks share the
engine through one address space (``DISK_SHIFT``): one dedup index and one set of workers
serve them all, their work items interleave, and one whose source cannot be read can fail
alone. What to read is each job's plan (``BackupPlan``: ``pipeline.jobs.backup`` for images,
devices and overlays, ``pipeline.jobs.vsphere_backup`` for a VM's disks).

Owns setting a run up (stages, engine, checkpoints) and its commit. Must not: run the loop of
items and results (``pipeline.jobs.run_loop``) or plan what to read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from catalog.errors import CorruptionError, RepositoryError, SourceReadError
from catalog.maint.gc import remove_dead_temporary
from catalog.repo import Repository
from catalog.store import condemned
from catalog.store.assemble import ManifestAssembler
from catalog.store.format import RepoConfig
from catalog.store.index import IndexSegmentWriter
from catalog.store.locks import Lock
from catalog.store.manifest import ManifestReader, ManifestWriter, manifest_data_bytes
from catalog.store.packs import DEFAULT_PACK_TARGET_BYTES
from catalog.store.points import PointStats, RecoveryPoint, commit_point
from catalog.store.storage import Storage
from stages.backup import IndexClient, PackTarget, backup_stages
from stages.base import Fused
from stages.sources.image import Source
from stages.sources.multi import DISK_SHIFT, MultiSource

from .. import signals
from ..console import waiting, warn
from ..engines import Engine
from . import run_loop
from .checkpoint import Checkpoints, adopt, checkpoint_seconds
from .plan import work_items
from .run_loop import BackupPlan as BackupPlan  # (re-exported: the jobs plan with it)
from .run_loop import Disk
from .run_loop import DiskJob as DiskJob
from .run_loop import Progress as Progress

# 16 MiB work items: large enough that per-call and per-batch Python costs vanish (~256 chunks),
# small enough for reused per-worker buffers. bench/README.md "batch size".
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BackupOptions:
    source_name: str | None = None
    changed_extents: str | None = None
    batch_bytes: int = DEFAULT_BATCH_BYTES
    pack_target_bytes: int = DEFAULT_PACK_TARGET_BYTES
    tags: tuple[str, ...] = ()  # labels of the new points (FORMAT.md 9)
    description: str | None = None


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

    disks: list[Disk] = []
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
        disks.append(Disk(job, base, items, manifest, changes, assembler, parent_manifest))
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
        engine.placements = tuple(job.node for job in jobs)
        engine.start(repo.location, make_stage, sealer)
        run_loop.drive(engine, disks, index_seg, progress, checkpoints, failures is not None)
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
    disk: Disk,
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
        read_on=tuple({"node_id": k, "address": v} for k, v in sorted(disk.nodes.items())),
    )
    if disk.job.fields is not None:  # the caller's own fields win (a copy keeps its time)
        fields.update(disk.job.fields(changes))
    return commit_point(storage, RecoveryPoint(**fields))
