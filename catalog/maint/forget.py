"""``forget``: which recovery points go, which stay because an overlay is over them or they
are younger than their S3 Object Lock period, and retiring the rest.

Under the shared ``forget`` lock (FORMAT.md 13): the points are read (a damaged document stops
it: keep rules decide per source and must not guess around one), the keep policy and the named
points (``store.points.resolve``) say which go, a point that is the base of an overlay stays
(``held``), and so does one younger than its Object Lock period (``locked``); the others
are retired (``store.points.retire_point``: their documents move to ``forgotten/``). What they
referenced is left to ``prune``. Prints nothing; the overlays are the caller's to list (they
live in ``drive``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from catalog.errors import RepositoryError, UsageError
from catalog.maint.retention import KeepPolicy, forget_mask
from catalog.repo import Repository
from catalog.store import s3_lock
from catalog.store.locks import ensure_locking, writer_lock
from catalog.store.points import POINTS_PREFIX, RecoveryPoint, point_name, retire_point

OverlayBases = Mapping[str, Sequence[str]]  # point id -> names of the overlays over it


@dataclass(frozen=True)
class Forgotten:
    gone: list[RecoveryPoint]  # forgotten (or, in a dry run, to be)
    held: list[tuple[RecoveryPoint, list[str]]]  # would go, but overlays (named) are over it
    kept: int  # points left
    locked: list[tuple[RecoveryPoint, float]] = field(default_factory=list)  # Object Lock:
    # would go, but is younger than the period by that many seconds


def forget(
    repo: Repository,
    policy: KeepPolicy,
    named: tuple[str, ...] = (),
    source: str | None = None,
    dry_run: bool = False,
    overlay_bases: Callable[[], OverlayBases] = dict,
    command: str = "forget",
    on_wait: object = None,
) -> Forgotten:
    """Forget the points ``policy`` does not keep (of ``source`` only, when given) and the
    ``named`` ones (point specs), except the bases of overlays; ``dry_run`` changes nothing.
    ``command`` and ``on_wait`` are the lock's (``store.locks.writer_lock``)."""
    repo.require_writable()
    with writer_lock(repo.storage, "forget", command, on_wait):
        points = repo.points()
        if repo.damaged:
            raise RepositoryError(
                f"{len(repo.damaged)} damaged point document(s) (`comb verify` lists them): "
                "forget decides per source and will not guess around them"
            )
        if source is not None and all(p.source != source for p in points):
            raise UsageError(f"no recovery point of source {source!r}")
        mask = forget_mask(points, policy, named, source)
        bases = overlay_bases()
        gone: list[RecoveryPoint] = []
        held: list[tuple[RecoveryPoint, list[str]]] = []
        locked: list[tuple[RecoveryPoint, float]] = []
        for p, drop in zip(points, mask.tolist(), strict=True):
            left = s3_lock.first_period_left(repo.storage, point_name(p.id)) if drop else None
            if drop and p.id in bases:
                held.append((p, list(bases[p.id])))
            elif left is not None and left > 0:
                locked.append((p, left))
            elif drop:
                gone.append(p)
        if not dry_run and gone:
            repo.config = ensure_locking(repo.storage, repo.config)
            for p in gone:
                retire_point(repo.storage, p.id)
            repo.storage.sync(POINTS_PREFIX)  # the removals from points/ are durable
    return Forgotten(gone, held, len(points) - len(gone), locked)
