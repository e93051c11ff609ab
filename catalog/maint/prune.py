"""``comb prune``: garbage collection (``catalog.maint.gc``) under a protocol that is safe while
backups and readers run and that no backup waits for (FORMAT.md 13).

1. **Mark and repack, unlocked**: what every committed point needs; copies of the live chunks
   of mostly-garbage packs, indexed (their old packs are retired).
2. **Condemn**, under the ``condemn`` lock (it excludes other prunes only): mark the points
   committed since, plan, and write the plan as a condemnation record
   (``catalog.store.condemned``); a backup that starts from now on leaves condemned packs out
   of its dedup index. Nothing to remove: done.
3. **Wait out the writers** (backups, forgets, indexes) live once the record is written: they
   may depend on condemned files.
4. **Re-check and remove**, under the ``remove`` lock (readers and repairs wait for it, and it
   for them; backups do not): mark the points committed meanwhile and those forgotten since
   (2) (a later backup may build on one), plan again, and remove what is in both plans,
   condemned and written before the record (a later backup may have written a file of the
   same content name again). Then the record goes.

Owns the protocol. Must not: decide what is garbage (``catalog.maint.gc``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from catalog.errors import RepositoryError
from catalog.maint import gc
from catalog.maint.gc import Marks, Plan, mark, mark_forgotten
from catalog.maint.repack import Repacked, repack_candidates
from catalog.repo import Repository
from catalog.store import condemned, s3_lock
from catalog.store.blocks import block_list_name
from catalog.store.crypto import KEYS_PREFIX
from catalog.store.format import CONFIG_NAME
from catalog.store.leaves import LEAVES_PREFIX
from catalog.store.locks import locked
from catalog.store.parity import parity_name
from catalog.store.points import RecoveryPoint, load_forgotten


@dataclass
class PruneResult:
    plan: Plan
    points: int
    exclusive_s: float  # under the condemn lock (its waits too)
    dry_run: bool
    repacked: Repacked = field(default_factory=Repacked)
    removing_s: float = 0.0  # under the remove lock (readers wait meanwhile)
    extended: int = 0  # Object Lock: live objects whose retention was extended


def condemnable(p: Plan) -> list[str]:
    """The names of a plan that a condemnation record lists (temporary files are judged by
    their writer, segments by the packs they list)."""
    return p.files + p.parity


def restrict(repo: Repository, p: Plan, first: Plan, since: float) -> Plan:
    """What of ``p`` (planned after the sessions ended) may go: condemned in ``first`` (the
    plan the record holds) and written before ``since`` (the record's time on the storage's
    clock: a file of the same content name written again by a later backup is newer)."""
    storage = repo.storage
    allowed = set(first.packs) | set(condemnable(first))

    def old_enough(name: str) -> bool:
        written = storage.mtime(name)
        return written is not None and written < since

    locking = repo.config.object_lock is not None

    def old(name: str) -> bool:
        if name not in allowed or not old_enough(name):
            return False
        left = s3_lock.remaining(storage, name) if locking else None  # (kept until its date)
        if left is not None and left > 0:
            out.held.append(name)
            return False
        return True

    out = Plan(tmp=[n for n in p.tmp if old_enough(n)], live_packs=p.live_packs, live=p.live)
    for name in p.packs:
        if old(name):
            out.add(out.packs, name, p.sizes[name])
            if name in p.orphans:
                out.orphans.add(name)
    out.parity = [n for n in p.parity if old(n)]
    for name in p.files:
        if old(name):
            out.add(out.files, name, p.sizes[name])
    gc.drop_segments(repo, {gc.pack_id(n) for n in out.packs}, out)
    return out


def prune(
    repo: Repository,
    dry_run: bool = False,
    wait_s: float | None = None,
    on_wait: Callable[[object], None] | None = None,
) -> PruneResult:
    """Mark and repack without locks, then condemn, wait out the sessions, and remove."""
    repo.require_writable()
    marks = Marks()
    mark(repo, repo.points(), marks)
    mark_forgotten(repo, marks)
    if dry_run:
        # Nothing is written or removed; files of backups running now may show as garbage.
        _, _, cands = repack_candidates(repo, marks.live_ids())
        p = gc.plan(repo, marks, frozenset(cands), assume_copied=True)
        return PruneResult(p, len(marks.points), 0.0, True, Repacked(frozenset(cands)))
    done = gc.repack(repo, marks)
    storage = repo.storage
    with locked(storage, "condemn", wait_s, "prune", on_wait) as lease:
        t0 = time.perf_counter()
        condemned.remove_all_but(storage, lease.info.id)  # left by killed prunes
        mark(repo, _points(repo), marks)
        mark_forgotten(repo, marks)
        forgotten = {p.id for p in load_forgotten(storage, [])[0]}
        first = gc.plan(repo, marks, done.retired)
        if repo.config.object_lock is not None:  # what its retention keeps is not condemned
            first = restrict(repo, first, first, float("inf"))
        if not (first.packs or condemnable(first) or first.tmp):
            extended = _extend(repo, first, marks)
            seconds = time.perf_counter() - t0
            return PruneResult(first, len(marks.points), seconds, False, done, 0.0, extended)
        try:
            packs = [gc.pack_id(n) for n in first.packs]
            if storage.local_path(CONFIG_NAME) is None:
                # Object storage times objects to the second: a second after the plan, the
                # record is newer than every file it condemns (all older than the plan).
                time.sleep(1.0)
            since = condemned.write(storage, lease.info.id, packs, condemnable(first))
            condemned.wait_for_sessions(storage, lease, wait_s, on_wait)
            with locked(storage, "remove", wait_s, "prune", on_wait) as removing:
                t1 = time.perf_counter()
                # Points committed meanwhile, and points forgotten since the plan (a backup
                # that started after the record may build on one: its leaves, as parent).
                mark(repo, _points(repo), marks)
                later = [p for p in load_forgotten(storage, [])[0] if p.id not in forgotten]
                mark(repo, later, marks)
                mark_forgotten(repo, marks)
                p = restrict(repo, gc.plan(repo, marks, done.retired), first, since)
                p.held = first.held + p.held

                def held(look: bool) -> None:  # (lost: a backup may have begun, nothing goes)
                    lease.held(look)
                    removing.held(look)

                gc.execute(repo, p, held)
                removing_s = time.perf_counter() - t1
        finally:
            storage.remove(condemned.record_name(lease.info.id))
        extended = _extend(repo, p, marks)
        seconds = time.perf_counter() - t0
        return PruneResult(p, len(marks.points), seconds, False, done, removing_s, extended)


def _extend(repo: Repository, p: Plan, marks: Marks) -> int:
    """Object Lock: the retention of what the live points use (their packs and parity, every
    manifest and its block list, the documents, the keys and the config), extended where it
    ends soon. (Forgotten points' documents and change tables stay for analytics, FORMAT 9.1.)"""
    if repo.config.object_lock is None:
        return 0
    storage = repo.storage
    parity = [parity_name(gc.pack_id(n)) for n in p.live] if repo.config.parity else []
    files = sorted(marks.files)
    lists = [block_list_name(n) for n in files if n.startswith(LEAVES_PREFIX)]
    keys = [CONFIG_NAME, *storage.list(KEYS_PREFIX)]
    return s3_lock.extend(storage, p.live + parity + files + lists + keys)


def _points(repo: Repository) -> list[RecoveryPoint]:
    """The committed points; a damaged document stops the prune (what it needs is unknown)."""
    points = repo.points()
    if repo.damaged:
        raise RepositoryError(
            f"{len(repo.damaged)} damaged point document(s) (`comb verify` lists them): prune "
            "cannot tell what they need, so it removes nothing more"
        )
    return points
