"""The backup job: plan, run the fused workers on an engine, assemble the manifest, commit.

Commit order (FORMAT.md "Commit protocol"): packs (sealed and fsynced by the workers) -> index
segment -> leaves -> root -> point document by atomic rename. A failure anywhere before the
rename leaves only unreferenced files; no recovery point appears.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from catalog.changes import ChangeTableWriter
from catalog.errors import SourceError, UsageError
from catalog.index import IndexSegmentWriter
from catalog.manifest import ManifestReader, ManifestWriter, manifest_data_bytes
from catalog.packs import DEFAULT_PACK_TARGET_BYTES
from catalog.points import PointStats, RecoveryPoint, commit_point, latest_for
from catalog.repo import Repository
from drive.overlay import Overlay
from stages.backup import IndexClient, PackTarget, backup_stages
from stages.base import Fused
from stages.schemas import INDEX_PORT, MAIN_PORT
from stages.source import ImageSource, Source

from .assemble import ManifestAssembler
from .engines import Engine
from .overlay_source import OverlaySource, overlay_name
from .plan import Range, WorkItem, align, intersect, parse_changed_extents, work_items

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


@dataclass(frozen=True)
class BackupPlan:
    source_name: str
    size: int
    parent: RecoveryPoint | None
    mode: str
    read: list[Range]
    changed: list[Range] | None


def plan_backup(repo: Repository, source_path: str, opts: BackupOptions) -> BackupPlan:
    """Decide what to read: holes never, and with a change list only the changed chunks."""
    src = ImageSource(source_path).open()
    try:
        name = opts.source_name or os.path.abspath(source_path)
        chunk = repo.config.chunk_size
        parent = latest_for(repo.points(), name)
        for msg in repo.damaged:
            # The parent is chosen among readable points only; say what was skipped.
            print(f"comb: warning: skipping {msg}", file=sys.stderr)
        if parent is not None and src.size < parent.size:
            raise SourceError(
                f"source {source_path} is {src.size} bytes, shorter than its parent recovery "
                f"point {parent.id} says ({parent.size} bytes); use --source-name for a new source"
            )
        data = align([(s, s + n) for s, n in src.data_extents(0, src.size)], chunk, src.size)
        changed: list[Range] | None = None
        if opts.changed_extents is not None:
            extents = parse_changed_extents(opts.changed_extents, src.size)
            if parent is None:
                print(
                    f"comb: note: no earlier recovery point of {name!r}; "
                    "ignoring --changed-extents and reading the whole source",
                    file=sys.stderr,
                )
            else:
                if src.size > parent.size:
                    extents.append((parent.size, src.size))
                changed = align(extents, chunk, src.size)
        if changed is not None:
            return BackupPlan(
                name, src.size, parent, "changed-extents", intersect(changed, data), changed
            )
        mode = "full" if parent is None else "full-reread"
        return BackupPlan(name, src.size, parent, mode, data, None)
    finally:
        src.close()


def plan_overlay_backup(repo: Repository, ov: Overlay, opts: BackupOptions) -> BackupPlan:
    """An overlay as a new point of its base point's source: the parent is the base point (not
    the source's latest), the change list is every written run (data or zeros), read whole."""
    if opts.source_name is not None or opts.changed_extents is not None:
        raise UsageError(
            "--source-name and --changed-extents do not apply to an overlay (its source and "
            "changes are its base point's and its writes)"
        )
    base = repo.resolve(ov.base_id)
    written = [(p.start, p.end) for p in ov.pieces(0, ov.size)]
    changed = align(written, repo.config.chunk_size, base.size)
    return BackupPlan(base.source, base.size, base, "changed-extents", changed, changed)


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


def _drive(
    engine: Engine,
    items: list[WorkItem],
    size: int,
    assembler: ManifestAssembler,
    index_seg: IndexSegmentWriter,
    tally: _Tally,
    progress: Progress | None,
) -> None:
    """Keep at most ``INFLIGHT_PER_WORKER`` items per worker in flight (backpressure); take the
    results in disk order, so the manifest streams out leaf by leaf."""
    to_read = sum(item.bytes for item in items)
    window: deque[tuple[WorkItem, object]] = deque()
    pos = 0
    while pos < len(items) or window:
        while pos < len(items) and len(window) < engine.workers * INFLIGHT_PER_WORKER:
            window.append((items[pos], engine.submit(items[pos].table())))
            pos += 1
        item, handle = window.popleft()
        ports = engine.result(handle)
        if INDEX_PORT in ports:
            index_seg.add(ports[INDEX_PORT])
        tally.add(item.bytes, ports[MAIN_PORT])
        assembler.feed(ports[MAIN_PORT])
        nxt = items[item.seq + 1].ranges[0][0] if item.seq + 1 < len(items) else size
        assembler.advance(nxt)
        if progress is not None:
            progress(tally.read, to_read)
    for ports in engine.finish():
        if INDEX_PORT in ports:
            index_seg.add(ports[INDEX_PORT])
    assembler.finish()


def _parent_data(parent: RecoveryPoint | None, manifest: ManifestReader | None) -> int:
    """Data bytes of the parent's image: from its document, or (for a point made before change
    tables existed) counted once from its manifest."""
    if parent is None or manifest is None:
        return 0
    if parent.changes is not None:
        return parent.stats.bytes_data
    return manifest_data_bytes(manifest, parent.size, parent.chunk_size, parent.leaf_chunks)


def run_backup(
    repo: Repository,
    source_path: str,
    engine: Engine,
    opts: BackupOptions = BackupOptions(),
    progress: Progress | None = None,
) -> RecoveryPoint:
    t0 = time.perf_counter()
    repo.require_writable()
    name = overlay_name(source_path)
    if name is None:
        plan = plan_backup(repo, source_path, opts)
        path = os.path.abspath(source_path)
        return _run(repo, plan, ImageSource(path), path, engine, opts, progress, t0)
    # The overlay's lock (the one a server holds) for the whole backup: its writes stay put.
    ov = Overlay(repo, name)
    try:
        plan = plan_overlay_backup(repo, ov, opts)
        source = OverlaySource(repo.location, name)
        return _run(repo, plan, source, source_path, engine, opts, progress, t0)
    finally:
        ov.close()


def _run(
    repo: Repository,
    plan: BackupPlan,
    source: Source,
    source_path: str,
    engine: Engine,
    opts: BackupOptions,
    progress: Progress | None,
    t0: float,
) -> RecoveryPoint:
    cfg = repo.config
    storage = repo.storage
    target = PackTarget(repo.location, opts.pack_target_bytes)

    def make_stage(index: IndexClient) -> Fused:
        return Fused(
            backup_stages(source, cfg.chunk_size, opts.batch_bytes, index, cfg.zstd_level, target)
        )

    parent_manifest = repo.manifest(plan.parent) if plan.parent is not None else None
    manifest = ManifestWriter(storage)
    changes = ChangeTableWriter(storage)
    index_seg = IndexSegmentWriter(storage)
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
    tally = _Tally()
    failed = True
    try:
        engine.start(repo.location, make_stage)
        _drive(engine, items, plan.size, assembler, index_seg, tally, progress)
        segment_id, index_bytes = index_seg.commit()
        leaves_id, root_id, manifest_bytes = manifest.commit()
        changes_id, changes_bytes = changes.commit()
        point = RecoveryPoint(
            source=plan.source_name,
            source_path=source_path,
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
            size=plan.size,
            chunk_size=cfg.chunk_size,
            leaf_chunks=cfg.leaf_chunks,
            root=root_id,
            leaves=leaves_id,
            parent=plan.parent.id if plan.parent is not None else None,
            index_segment=segment_id,
            engine=engine.name,
            mode=plan.mode,
            changes=changes_id,
            stats=PointStats(
                bytes_read=tally.read,
                bytes_new=tally.new,
                bytes_stored=tally.stored,
                bytes_zero=tally.zero,
                bytes_changed=changes.bytes_changed,
                bytes_data=_parent_data(plan.parent, parent_manifest) + assembler.data_delta,
                chunks=tally.chunks,
                chunks_new=tally.chunks_new,
                leaves_new=manifest.new_leaves,
                leaves_shared=manifest.ref_leaves,
                metadata_bytes=index_bytes + manifest_bytes + changes_bytes,
                seconds=round(time.perf_counter() - t0, 3),
            ),
        )
        committed = commit_point(storage, point)
        failed = False
        return committed
    finally:
        if failed:
            manifest.abort()
            changes.abort()
            index_seg.abort()
        engine.close(failed)
