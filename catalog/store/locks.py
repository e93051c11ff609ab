"""Repository locks (FORMAT.md 13): shared ones are the sessions of backups, forgets and
readers; exclusive ones are held by prune, repair and key changes.

A lock is a small JSON file ``locks/<id>.json`` naming its kind, host, pid, start time and a
heartbeat that a thread refreshes every ``HEARTBEAT_S``. Taking a lock is *write, then look*:
the lock file is written (atomically, durably) first, then the other locks are listed. Two
parties that conflict therefore always see at least one of the other's files; whoever sees a
live conflicting lock removes its own file and waits (or fails), so they never both proceed.
A prune holds ``condemn`` (its lease: other prunes only) and, to remove, ``remove`` (readers
and repairs, not backups): it waits out the backups after condemning
(``condemned.wait_for_sessions``), and no backup waits for it.
A lock is **stale** when its process is known dead (same host, pid gone) or its heartbeat is
older than ``STALE_S`` (the storage's clock); stale locks are ignored, and removed only by
``comb unlock --stale``. On S3 each beat is a compare-and-swap (lost if removed or replaced).
Callers pass the callbacks that say something (this module prints nothing).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

import psutil

from catalog.errors import CombError, LockedError, RepositoryError
from catalog.store import s3_lease
from catalog.store.format import CONFIG_NAME, RepoConfig
from catalog.store.storage import Storage

LOCKS_PREFIX = "locks"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats
WAIT_POLL_S = 1.0
DEFAULT_WAIT_S = 3600.0
WAIT_ENV = "COMB_LOCK_WAIT"  # seconds to wait for a conflicting lock (default an hour)


def default_wait() -> float:
    try:
        return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    except ValueError:
        return DEFAULT_WAIT_S


# "prune" is the one lock of a comb whose prunes do not condemn (conflicts with every lock but
# "key"); a condemning prune holds "condemn" throughout and "remove" while it removes.
EXCLUSIVE_KINDS = frozenset({"prune", "repair", "key", "condemn", "remove"})
# Sessions that write (a prune waits out those running when it condemned; they never wait
# for a prune). Every other shared lock is a reader's, which ``remove`` excludes.
WRITER_KINDS = frozenset({"backup", "forget", "index"})
# Shared locks that ``remove`` does not exclude: backups and forgets read nothing condemned.
REMOVE_FREE_KINDS = frozenset({"backup", "forget"})
_PRUNE_KINDS = {"condemn": "prune", "remove": "prune"}  # what a message calls them
# The ``ro_compat`` feature of a repository whose writers take locks (FORMAT.md 13).
LOCKING_FEATURE = "locks"


class LockUnwritable(RepositoryError):
    """The own lock file could not be written (read-only media: a reader goes on without)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LockInfo:
    id: str
    kind: str  # "backup", "forget", "prune", ...
    exclusive: bool
    host: str
    pid: int
    started: str
    heartbeat: str
    command: str = ""
    # Not in the file: seconds since it was last written, by the storage's clock (read_locks).
    age: float | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{LOCKS_PREFIX}/{self.id}.json"

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "age"}).encode()

    def stale(self, now: float | None = None) -> str | None:
        """Why this lock is stale, or None when its holder may be alive."""
        if self.host == socket.gethostname():
            try:
                started = datetime.fromisoformat(self.started).timestamp()
            except ValueError:
                started = None
            gone = process_gone(self.pid, started)
            if gone:
                return gone
        if self.age is not None and now is None:  # the storage's clock: no clock skew counts
            age = self.age
        else:
            age = (now or time.time()) - datetime.fromisoformat(self.heartbeat).timestamp()
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def describe(self) -> str:
        mode = "exclusive" if self.exclusive else "shared"
        return f"{self.kind} ({mode}) by {self.host} pid {self.pid} since {self.started}"


def process_gone(pid: int, started: float | None) -> str | None:
    """Why process ``pid`` of this host cannot be the one that took a lock at ``started``:
    it does not exist, it has exited and waits to be reaped (a killed comb whose parent has not
    collected it yet), or the pid now belongs to a process started after the lock."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited"
        if started is not None and proc.create_time() > started + 1.0:  # taken after its start
            return f"process {pid} is gone (the pid belongs to a newer process)"
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.Error:
        return None  # cannot tell (permissions): the heartbeat decides
    return None


def read_locks(storage: Storage) -> list[LockInfo]:
    """Every lock file that parses (a torn or foreign file is not a lock)."""
    out = []
    for name in storage.list(LOCKS_PREFIX):
        if not name.endswith(".json"):
            continue
        try:
            raw = storage.read(name)
        except CombError:
            if not storage.exists(name):
                continue  # released between the listing and the read
            raise  # a lock that exists but cannot be read must not be ignored
        try:
            doc = json.loads(raw)
            info = LockInfo(**{k: doc[k] for k in LockInfo.__dataclass_fields__ if k != "age"})
            datetime.fromisoformat(info.heartbeat)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        age = storage.age(name)
        if info.name == name and age is not None:  # (None: released since the read)
            out.append(replace(info, age=age))
    return sorted(out, key=lambda lk: lk.started)


def _conflicts(mine: LockInfo, other: LockInfo) -> bool:
    """Whether two locks exclude each other (FORMAT.md 13). A process never conflicts with
    itself (scrub --repair: shared to read, exclusive to isolate damage)."""
    ours = other.host == mine.host and other.pid == mine.pid
    if other.id == mine.id or ours:
        return False
    kinds = {mine.kind, other.kind}
    if "key" in kinds:
        # Key changes touch keys/ alone, which nothing else writes or removes: they exclude
        # each other only, so a server holding its shared lock for days never blocks them.
        return kinds == {"key"}
    if "condemn" in kinds:  # a prune's lease: other prunes only (a repair may run meanwhile)
        return kinds <= {"condemn", "prune", "remove"}
    if "remove" in kinds and kinds & REMOVE_FREE_KINDS:
        return False
    return mine.exclusive or other.exclusive


def _clock() -> float:
    """Seconds that go on while the machine sleeps (a suspended holder's heartbeat stops, and
    others judge it by wall time)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return time.time()


class Lock:
    """A held lock; ``release()`` (or the context manager) removes its file."""

    def __init__(self, storage: Storage, info: LockInfo) -> None:
        self.storage = storage
        self.info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="comb-lock", daemon=True)
        self._written = _clock()  # when the last heartbeat that got written was taken
        self._lost = ""  # why the lock was lost at some point (a later beat does not undo it)
        self._etag: str | None = None  # object storage: the ETag of the last beat

    def _write(self) -> None:
        taken = _clock()  # (before the write: a write retried for minutes is that old)
        body = self.info.to_json()
        etag = s3_lease.beat(self.storage, self.info.name, body, self._etag, self._ours)
        if etag is None:
            self._lost = self._lost or (
                f"its lock object {self.info.name} was removed or replaced (compare-and-swap "
                "refused: `comb unlock --stale` elsewhere?)"
            )
            raise RepositoryError(self._lost)
        self._etag, self._written = etag or None, taken

    def _ours(self, raw: bytes) -> bool:
        """Whether stored lock bytes are this lock's (an earlier beat of it)."""
        try:
            doc = json.loads(raw)
        except ValueError:
            return False
        keys = ("id", "host", "pid", "started")
        return isinstance(doc, dict) and all(doc.get(k) == getattr(self.info, k) for k in keys)

    def held(self, look: bool = True) -> None:
        """Raise ``LockedError`` unless the lock is surely still ours: its file is there and
        its heartbeat was written less than half of ``STALE_S`` ago. Others take a lock whose
        heartbeat is older than ``STALE_S`` for stale (a holder cut off from the storage, or
        suspended, keeps running but cannot refresh it), so a prune may have run meanwhile:
        a backup must not commit then, nor a prune remove anything. ``look=False``: the clock
        only, no request (a prune checks it before every removal, the file now and then)."""
        self._check(look)
        if self._lost:
            raise LockedError(
                f"lost the repository's {_PRUNE_KINDS.get(self.info.kind, self.info.kind)} lock: "
                f"{self._lost}; stopped before "
                "changing anything"
            )

    def _check(self, look: bool = True) -> None:
        """Note the lock as lost when it could have been taken for stale, or was removed."""
        quiet = _clock() - self._written
        if quiet > STALE_S / 2 and not self._lost:
            self._lost = (
                f"it could not be refreshed for {quiet:.0f} s, and others take it for stale "
                f"after {STALE_S:.0f} s"
            )
        if look and not self._lost and not self.storage.exists(self.info.name):
            self._lost = f"its file {self.info.name} was removed (`comb unlock --stale` elsewhere?)"

    def _beat(self) -> None:
        """Refresh the heartbeat until released (for days, for a server). A failed write (a
        full disk, a network file system's hiccup: storage raises ``RepositoryError``) must not
        end the thread, or the lock would go stale ten minutes later under a live holder."""
        while not self._stop.wait(HEARTBEAT_S):
            self.info = replace(self.info, heartbeat=_now())
            try:
                # A gap or a missing file is remembered (``held``) before the file is written
                # again: a reader's lock goes on (nothing of it is committed), a writer's not.
                self._check()
                self._write()
            except (OSError, CombError):
                pass  # the next beat tries again; staleness needs ten misses

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.storage.remove(self.info.name)
        except FileNotFoundError:
            pass


def acquire(
    storage: Storage,
    kind: str,
    wait_s: float | None = None,
    command: str = "",
    on_wait: object = None,
) -> Lock:
    """Take a lock of ``kind`` (exclusive for ``EXCLUSIVE_KINDS``, shared otherwise), waiting
    up to ``wait_s`` for conflicting live locks to go; ``on_wait(blocker)`` is called once."""
    exclusive = kind in EXCLUSIVE_KINDS
    deadline = time.monotonic() + (default_wait() if wait_s is None else wait_s)
    told = False
    while True:
        now = _now()
        info = LockInfo(
            id=secrets.token_hex(8),
            kind=kind,
            exclusive=exclusive,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            heartbeat=now,
            command=command,
        )
        lock = Lock(storage, info)
        try:
            lock._write()
        except (OSError, RepositoryError) as err:
            why = err.message if isinstance(err, RepositoryError) else str(err)
            raise LockUnwritable(f"cannot write lock {info.name}: {why}") from None
        try:
            blockers = [
                other
                for other in read_locks(storage)
                if _conflicts(info, other) and other.stale() is None
            ]
        except BaseException:  # an unreadable lock, Ctrl-C: leave no file of ours behind
            lock.release()
            raise
        if not blockers:
            lock._thread.start()
            return lock
        lock.release()
        if time.monotonic() >= deadline:
            raise locked_error(blockers)
        if not told and callable(on_wait):
            on_wait(blockers[0])
            told = True
        time.sleep(WAIT_POLL_S * (0.5 + secrets.randbelow(1000) / 1000))


def locked_error(blockers: list[LockInfo], more: str = "") -> LockedError:
    return LockedError(
        f"repository is locked: {blockers[0].describe()}"
        + (f" ({len(blockers) - 1} more)" if len(blockers) > 1 else "")
        + more
        + "; `comb locks` lists locks, `comb unlock --stale` clears dead ones"
    )


@contextmanager
def locked(
    storage: Storage,
    kind: str,
    wait_s: float | None = None,
    command: str = "",
    on_wait: object = None,
) -> Iterator[Lock]:
    lock = acquire(storage, kind, wait_s, command, on_wait)
    try:
        yield lock
    finally:
        lock.release()


def remove_stale(storage: Storage) -> list[tuple[LockInfo, str]]:
    """Remove every stale lock file; returns (lock, why stale). Live locks are never touched."""
    out = []
    for info in read_locks(storage):
        why = info.stale()
        if why is not None:
            try:
                storage.remove(info.name)
            except FileNotFoundError:
                continue
            out.append((info, why))
    return out


def ensure_locking(storage: Storage, config: RepoConfig) -> RepoConfig:
    """Mark the repository as one whose writers take locks (``ro_compat``: a comb that does not
    know locking may still read it, but no longer write to it); returns the config now in
    force. Set before anything is removed."""
    feats = config.features
    if LOCKING_FEATURE in feats.ro_compat:
        return config
    new = replace(feats, ro_compat=tuple(sorted({*feats.ro_compat, LOCKING_FEATURE})))
    config = replace(config, features=new)
    storage.write_atomic(CONFIG_NAME, config.to_json())
    return config


@contextmanager
def writer_lock(
    storage: Storage, kind: str, command: str = "", on_wait: object = None
) -> Iterator[Lock]:
    """The shared lock (session) of a backup, forget or index: waits while a repair changes
    the index, never for a condemning prune. Lock files are plain: in an encrypted repository
    one names its kind, not ``command`` (a command line names the source)."""
    shown = kind if storage.sealer.encrypted else command
    with locked(storage, kind, None, shown, on_wait) as lock:
        yield lock


@contextmanager
def reader_lock(
    storage: Storage,
    config: RepoConfig,
    kind: str,
    long_lived: bool = False,
    on_wait: object = None,
    on_unlocked: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """A shared lock for readers (restore, verify, scrub, export, serve, mount, boot), held
    until they exit, so prune does not remove files under them; a repository on read-only media
    cannot take one and is read without it. A reader that ends (restore, verify, scrub, export)
    takes none in a repository no forget or prune ever ran on (no ``locks`` feature), so that it
    writes nothing there (FORMAT.md 12); the one gap: such a reader still running when the first
    prune removes data fails on a missing file (never returns wrong data).

    ``long_lived`` readers (serve, mount, boot) always lock: one started before the first
    forget and prune would otherwise stay unprotected for days, as that prune sets the feature
    and then sees no lock of theirs (FORMAT.md 13). ``on_unlocked(why)`` is told when one
    cannot lock."""
    if not long_lived and LOCKING_FEATURE not in config.features.ro_compat:
        yield
        return
    try:
        lock = acquire(storage, kind, command=kind, on_wait=on_wait)
    except LockUnwritable as err:  # (any other error stops the reader: it must not go unlocked)
        if long_lived and on_unlocked is not None:
            on_unlocked(err.message)
        yield
        return
    try:
        yield
    finally:
        lock.release()
