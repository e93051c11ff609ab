"""The backup of an image file, a block device or an overlay: plan what to read, then run it
(``pipeline.jobs.runner``) under the repository's shared ``backup`` lock. Several image files
or devices go in one engine run (``run_backups``: one dedup index, the workers shared), one
point each; a source that cannot be planned (missing, unreadable, shorter than its parent)
fails alone, and so does one that cannot be read during the run.

The parent is the last point read from the same path (FORMAT.md 8.4); an overlay's parent is
its base point. What is read: data extents (holes never), or, with a change list valid against
the parent, only the changed chunks; of an overlay, only the chunks it wrote.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import replace

from catalog.errors import ChangeListError, CombError, SourceError, SourceReadError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint, backup_parent
from drive.overlays.overlay import Overlay
from stages.sources.image import ImageSource

from ..console import note, warn_damaged
from ..engines import Engine
from ..locking import reader_lock, writer_lock
from .overlay_source import OverlaySource, overlay_name
from .plan import Range, align, intersect, parse_changed_extents
from .runner import BackupOptions, BackupPlan, DiskJob, Progress, run_jobs


def plan_backup(repo: Repository, source_path: str, opts: BackupOptions) -> BackupPlan:
    """Decide what to read: holes never, and with a change list only the changed chunks."""
    src = ImageSource(source_path).open()
    try:
        path = os.path.abspath(source_path)  # what the point's source_path records
        name = opts.source_name or path
        chunk = repo.config.chunk_size
        parent, same_device = backup_parent(repo.points(), name, path)
        warn_damaged(repo)  # the parent is chosen among readable points only: say so
        if parent is not None and src.size < parent.size:
            raise SourceError(
                f"source {source_path} is {src.size} bytes, shorter than its parent recovery "
                f"point {parent.id} says ({parent.size} bytes); use --source-name for a new source"
            )
        data = align([(s, s + n) for s, n in src.data_extents(0, src.size)], chunk, src.size)
        changed: list[Range] | None = None
        if opts.changed_extents is not None:
            extents = parse_changed_extents(opts.changed_extents, src.size)
            if parent is None or not same_device:  # the list is relative to no point we have
                why = (
                    f"no earlier recovery point of {name!r}"
                    if parent is None
                    else f"the latest point {parent.id} of {name!r} was read from "
                    f"{parent.source_path}, not {path}"
                )
                note(f"{why}; ignoring --changed-extents and reading the whole source")
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
    with writer_lock(repo, "backup") as lock:  # (FORMAT.md 13: what a prune does meanwhile)
        if name is None:
            plan = plan_backup(repo, source_path, opts)
            path = os.path.abspath(source_path)
            job = DiskJob(plan, ImageSource(path), path)
            return run_jobs(repo, [job], engine, opts, progress, t0, lock)[0]
        # The overlay's lock (the one a server holds) for the whole backup: its writes stay put.
        # It reads its base point like a reader: a prune's removal waits for it (``overlay``).
        ov = Overlay(repo, name)
        try:
            with reader_lock(repo, "overlay", long_lived=True):
                plan = plan_overlay_backup(repo, ov, opts)
                source = OverlaySource(repo.location, name, repo.sealer.for_workers())
                job = DiskJob(plan, source, source_path)
                return run_jobs(repo, [job], engine, opts, progress, t0, lock)[0]
        finally:
            ov.close()


def same_source(paths: list[str]) -> tuple[str, str] | None:
    """Two of ``paths`` that are one file or one device (a link, a second name), if any."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue  # (its planning fails and says why)
        key = (0, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
        if key in seen:
            return seen[key], path
        seen[key] = path
    return None


def run_backups(
    repo: Repository,
    source_paths: list[str],
    engine: Engine,
    opts: BackupOptions = BackupOptions(),
    progress: Progress | None = None,
    names: list[str] | None = None,
    nodes: list[str | None] | None = None,
) -> tuple[list[RecoveryPoint], list[tuple[str, CombError]]]:
    """Image files and block devices in one engine run, one point each (in the order given;
    ``names``: their source names, else their paths; ``nodes``: the Ray nodes each is read on,
    else any); also the sources that failed, before or during the run, each as given with its
    error, in the order given."""
    t0 = time.perf_counter()
    repo.require_writable()
    given = {os.path.abspath(p): p for p in source_paths}
    if len(given) < len(source_paths):
        raise UsageError("a source is named twice")
    same = same_source(source_paths)
    if same is not None:
        raise UsageError(f"{same[0]} and {same[1]} are one source")
    with writer_lock(repo, "backup") as lock:
        jobs: list[DiskJob] = []
        failed: list[tuple[str, CombError]] = []
        unread: list[tuple[str, SourceReadError]] = []
        for i, (path, name) in enumerate(given.items()):
            mine = opts if names is None else replace(opts, source_name=names[i])
            try:
                plan = plan_backup(repo, name, mine)
            except (SourceError, ChangeListError) as err:
                failed.append((name, err))
                continue
            node = None if nodes is None else nodes[i]
            jobs.append(DiskJob(plan, ImageSource(path), path, node=node))
        points = run_jobs(repo, jobs, engine, opts, progress, t0, lock, unread) if jobs else []
    failed += [(given[path], err) for path, err in unread]
    return points, sorted(failed, key=lambda f: source_paths.index(f[0]))
