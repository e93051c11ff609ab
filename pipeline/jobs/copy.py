"""``comb copy``: recovery points of one repository into another (an offsite copy), sending only
what the target lacks.

A copy is a backup into the target whose source is the point itself, read through its virtual
drive (``Repository.reader``: every chunk checked against its id as it is read), so the target's
pipeline chunks, deduplicates, compresses and seals it with the target's own keys and settings,
local directory or S3 alike, on either engine. The new point keeps the original's time, source,
tags and description and names it in ``copy_of`` (FORMAT.md 9). Points are copied oldest first;
one copied already (a target point names it) is skipped, so a second copy sends nothing and a
killed copy resumes with the point it was copying; so is one the target forgot, and one that
is itself a copy of a point the target has (copying back does not double it). A point whose
source has a copied earlier point in the target becomes that point's child and reads only the
byte runs where the two originals differ (``catalog.read.compare``, from their manifests): the
cost follows the change. Between repositories that share chunk ids (``init --copy-keys-from``),
the chunks the target holds already are not read at all (``pipeline.jobs.copy_known``).

Owns choosing, planning and running copies. Must not: print (``pipeline.cli.copy_cmd``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from catalog.read.compare import changed_runs
from catalog.repo import Repository
from catalog.store.index import DedupIndex
from catalog.store.points import RecoveryPoint, load_forgotten
from catalog.store.sealing import PLAIN, Sealer

from ..engines import Engine
from ..locking import reader_lock, writer_lock
from .copy_known import KnownChunks, split_known
from .plan import align, clip, intersect
from .runner import BackupOptions, BackupPlan, DiskJob, Progress, run_jobs


@dataclass(frozen=True)
class PointAsSource:
    """A recovery point as a backup source: picklable configuration, opened in each worker."""

    repo: str
    point: str
    sealer: Sealer = field(default=PLAIN, repr=False)  # (a worker cannot ask for a password)

    def open(self) -> OpenPoint:
        return OpenPoint(self.repo, self.point, self.sealer)

    def describe(self) -> str:
        return f"{self.repo} point {self.point}"


class OpenPoint:
    """An open point with the source-handle interface the backup reader uses."""

    def __init__(self, repo: str, point: str, sealer: Sealer) -> None:
        r = Repository.open(repo, sealer=sealer)
        self._reader = r.reader(r.resolve(point))
        self.size = self._reader.size

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._reader.read_into(buf, offset)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        return clip(self._reader.extents(), start, end)

    def close(self) -> None:
        """Nothing to release: the reader holds no file open between reads."""


def plan_copy(
    src: Repository, dst: Repository, point: RecoveryPoint, copies: dict[str, RecoveryPoint]
) -> BackupPlan:
    """What to read of ``point`` into ``dst``; ``copies``: the target's copies by original id.
    The parent is the target's copy of the latest earlier point of the same source that was
    copied and is still in ``src`` (to compare with); without one, everything is read."""
    chunk = dst.config.chunk_size
    data = align([(o, o + n) for o, n in src.reader(point).extents()], chunk, point.size)
    earlier = [
        p
        for p in src.points()
        if p.source == point.source and (p.time, p.id) < (point.time, point.id) and p.id in copies
    ]
    parent = copies[earlier[-1].id] if earlier else None
    if parent is None or parent.size > point.size:
        return BackupPlan(point.source, point.size, None, "full", data, None)
    original = earlier[-1]
    runs = changed_runs(original, src.manifest(original), point, src.manifest(point))
    changed = align([(o, o + n) for o, n in runs], chunk, point.size)
    return BackupPlan(
        point.source, point.size, parent, "changed-extents", intersect(changed, data), changed
    )


def _kept(point: RecoveryPoint) -> Callable[[object], dict[str, Any]]:
    """The fields a copy keeps of its original (the runner's ``DiskJob.fields``)."""
    kept = {"time": point.time, "copy_of": point.id, "vsphere": point.vsphere}
    return lambda _changes: dict(kept)


def _target(dst: Repository) -> tuple[dict[str, RecoveryPoint], set[str]]:
    """The target's live copies by original id (a later copy's parent is one of them), and the
    ids a copy skips: of every point the target has or had (a forgotten copy is not sent
    again) and of the originals its points copy (a point copied back is not doubled)."""
    live = dst.points()
    every = live + load_forgotten(dst.storage, live)[0]
    copies = {p.copy_of: p for p in live if p.copy_of is not None}
    return copies, {p.id for p in every} | {p.copy_of for p in every if p.copy_of is not None}


def copy_points(
    src: Repository,
    dst: Repository,
    points: list[RecoveryPoint],
    engine: Callable[[], Engine],
    progress: Progress | None = None,
    batch_bytes: int = 16 << 20,
) -> Iterator[tuple[RecoveryPoint, RecoveryPoint | None]]:
    """Copy ``points`` (oldest first) from ``src`` into ``dst`` with a new ``engine()`` each
    (an engine runs once); yields each original with its new copy, or None when the target
    had it already. The source is read under a reader's
    lock (a prune there does not remove what is being copied), the target written under a
    backup's."""
    dst.require_writable()
    sealer = src.sealer.for_workers()
    with reader_lock(src, "copy", long_lived=True), writer_lock(dst, "backup") as lock:
        # (Read in the session: packs a prune condemned already are left out, a later one
        # waits for this copy. Chunks stored by this copy's earlier points are not in it:
        # they are read again, and the engine's own index finds them.)
        held = DedupIndex.load(dst.storage) if src.shares_chunk_ids(dst) else None
        for point in sorted(points, key=lambda p: (p.time, p.id)):
            copies, had = _target(dst)
            if point.id in had or (point.copy_of is not None and point.copy_of in had):
                yield point, None
                continue
            plan = plan_copy(src, dst, point, copies)
            source = PointAsSource(src.location, point.id, sealer)
            job = DiskJob(plan, source, point.source_path, fields=_kept(point))
            if held is not None:
                manifest = src.manifest(point)
                read, known = split_known(point, manifest, plan.read, held)
                job = replace(
                    job,
                    plan=replace(plan, read=read),
                    known=KnownChunks(point, manifest, known).rows,
                )
            opts = BackupOptions(
                source_name=point.source,
                tags=point.tags,
                description=point.description,
                batch_bytes=batch_bytes,
            )
            yield point, run_jobs(dst, [job], engine(), opts, progress, None, lock)[0]
