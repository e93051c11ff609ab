"""Condemnation records (FORMAT.md 13): what a running prune is about to remove.

A prune (holding its ``condemn`` lock) writes ``gc/<lock id>.json``, then waits out the writer
sessions that were running (``wait_for_sessions``), then, under its ``remove`` lock, removes
only condemned files no point needs by then and written before the record, and removes the
record last. A backup reads the records after its own session exists, before the index, and
leaves out every row of a condemned pack (``DedupIndex.load``), so a backup that starts while a
prune runs never depends on what that prune removes. A record left by a killed prune is removed
by the next prune (meanwhile it only makes backups store a chunk again).

Owns the records' format and reading, and waiting out the sessions (``wait_for_sessions``).
Must not: decide what is garbage (``catalog.maint.gc``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from catalog.errors import CombError, CorruptionError, LockedError
from catalog.store.locks import (
    WAIT_POLL_S,
    WRITER_KINDS,
    Lock,
    LockInfo,
    default_wait,
    locked,
    locked_error,
    read_locks,
)
from catalog.store.packs import pack_name
from catalog.store.parity import parity_name
from catalog.store.storage import Storage

GC_PREFIX = "gc"
FORMAT_NAME = "comb-condemned"
FORMAT_VERSION = 1


def record_name(lock_id: str) -> str:
    return f"{GC_PREFIX}/{lock_id}.json"


def write(storage: Storage, lock_id: str, packs: list[str], files: list[str]) -> float:
    """Write the record of prune ``lock_id`` (``packs``: pack ids; ``files``: other names);
    returns its time on the storage's clock, which the files a prune removes must predate."""
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "lock": lock_id,
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "packs": sorted(packs),
        "files": sorted(files),
    }
    name = record_name(lock_id)
    storage.write_atomic(name, (json.dumps(doc, indent=1) + "\n").encode())
    written = storage.mtime(name)
    if written is None:
        raise CorruptionError(f"{name} is gone right after it was written")
    return written


def names(storage: Storage) -> list[str]:
    return [n for n in storage.list(GC_PREFIX) if n.endswith(".json")]


def condemned_packs(storage: Storage) -> set[str]:
    """The ids of every pack a record condemns. A record that exists but does not read stops
    the caller (a backup must not deduplicate against a pack a prune may remove)."""
    out: set[str] = set()
    for name in names(storage):
        try:
            raw = storage.read(name)
        except CombError:
            if not storage.exists(name):
                continue  # the prune finished between the listing and the read
            raise
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_NAME or not isinstance(doc.get("packs"), list):
                raise ValueError("not a condemnation record")
        except (ValueError, AttributeError) as err:
            raise CorruptionError(f"{name} is not a readable condemnation record ({err})") from None
        out.update(str(p) for p in doc["packs"])
    return out


def remove_all_but(storage: Storage, lock_id: str | None) -> int:
    """Remove every record but ``lock_id``'s (a prune holding the lock: the others' prunes are
    dead); how many."""
    others = [n for n in names(storage) if n != record_name(lock_id or "")]
    for name in others:
        storage.remove(name)
    return len(others)


def sessions(storage: Storage, mine: LockInfo) -> list[LockInfo]:
    """The live writer sessions (backups, forgets, indexes: ``WRITER_KINDS``) of other
    processes. Readers are not waited out here: the ``remove`` lock excludes them."""
    return [
        other
        for other in read_locks(storage)
        if other.kind in WRITER_KINDS
        and other.id != mine.id
        and (other.host, other.pid) != (mine.host, mine.pid)
        and other.stale() is None
    ]


def wait_for_sessions(
    storage: Storage, lock: Lock, wait_s: float | None = None, on_wait: object = None
) -> None:
    """Wait (up to ``wait_s``) until every writer session live now has ended: called by a
    prune once its condemnation is written, so that a backup which may depend on condemned
    files has committed or died (a later one sees the condemnation). ``on_wait(session)`` is
    called once."""
    waiting = {s.id for s in sessions(storage, lock.info)}
    deadline = time.monotonic() + (default_wait() if wait_s is None else wait_s)
    told = False
    while waiting:
        live = [s for s in sessions(storage, lock.info) if s.id in waiting]
        waiting = {s.id for s in live}
        if not live:
            return
        if time.monotonic() >= deadline:
            raise locked_error(live, ", started before this prune; it removed nothing")
        if not told and callable(on_wait):
            on_wait(live[0])
            told = True
        time.sleep(WAIT_POLL_S * (0.5 + secrets.randbelow(1000) / 1000))


@contextmanager
def commit_guard(
    storage: Storage,
    needed: bool,
    packs: Iterable[str],
    parity: bool,
    held: Callable[[], None],
    on_wait: object = None,
) -> Iterator[None]:
    """Where a backup commits, when records were there as it began (``needed``): a prune that
    did not wait for it may be removing, and a pack it wrote may have the very name (the same
    bytes, in a plain repository) of one that prune condemned. Under a shared ``commit`` lock
    (no prune's ``remove`` runs or starts while it is held) every pack of ``packs`` and, with
    ``parity``, its parity file must exist, or the backup stops before committing anything; a
    prune that removes later plans again and sees the point; ``held()`` (the backup's own lock
    still held) is checked once the ``commit`` lock is taken. Without records a prune that
    condemns meanwhile waits for the backup's session, so nothing is needed."""
    if not needed:
        yield
        return
    with locked(storage, "commit", None, "commit", on_wait):
        held()  # the wait may have been long: a prune may have taken the backup for dead
        for pack in sorted(packs):
            for name in (pack_name(pack), parity_name(pack))[: 2 if parity else 1]:
                if not storage.exists(name):
                    raise LockedError(
                        f"a prune removed {name}, which this backup had just written (the same "
                        "content as a file it condemned); nothing was committed: run the "
                        "backup again"
                    )
        yield
