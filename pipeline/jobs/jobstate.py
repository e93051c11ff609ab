"""A job file's state on this machine (README "Jobs"): what ``job run`` and ``job serve`` last did
for each source, whether a ``job serve`` runs it now, and the lock that keeps two of them off
one job file.

Both live in ``<state dir>/jobs/``, named ``<job file's name>-<key>`` (the key: a hash of the
job file's real path, links resolved, and the repository's location), where the state dir is
``$COMB_STATE_DIR``, else ``$XDG_STATE_HOME/comb``, else ``~/.local/state/comb``. The state
(``.json``; ``--state`` puts it elsewhere, never the lock) is replaced whole (written aside,
then renamed), so a reader never sees half of it; one it cannot use (unreadable, another
version, a wrong shape) counts as empty, and entries of a wrong shape are dropped. The lock
(``.lock``) is an ``flock`` held for the whole run, naming its holder: it is also how ``job
status`` knows a server runs (a pid alone could be another process's after a reboot).

Owns the state's place, format, reading, writing, heartbeat and lock. Must not: decide what is
due or back anything up (``pipeline.cli.job_cmd``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catalog.errors import LockedError, OutputError

STATE_VERSION = 1
HEARTBEAT_S = 10.0  # how often a server's state says it is alive
RUN_KEYS = ("status", "point", "error", "seconds", "bytes_read", "bytes_new")


def _base(job_file: str, repo_location: str) -> str:
    folder = os.environ.get("COMB_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state"), "comb"
    )
    job = os.path.realpath(job_file)
    key = hashlib.sha256(f"{job}\0{repo_location}".encode()).hexdigest()[:16]
    return os.path.join(folder, "jobs", f"{Path(job).stem}-{key}")


def state_path(job_file: str, repo_location: str, given: str | None = None) -> str:
    """Where the state of ``job_file`` run against ``repo_location`` lives (``given``: there)."""
    return os.path.abspath(given) if given else _base(job_file, repo_location) + ".json"


def lock_path(job_file: str, repo_location: str) -> str:
    return _base(job_file, repo_location) + ".lock"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _iso(value: object) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def read_state(path: str) -> dict[str, Any]:
    """The state last written, its entries of a wrong shape dropped; or an empty one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        return {}
    runs = doc.get("sources")
    runs = runs if isinstance(runs, dict) else {}
    doc["sources"] = {
        k: {key: v.get(key) for key in ("began", *RUN_KEYS)}
        for k, v in runs.items()
        if isinstance(v, dict) and _iso(v.get("began")) and isinstance(v.get("status"), str)
    }
    if not isinstance(doc.get("server"), dict):
        doc.pop("server", None)
    return doc


def write_state(path: str, doc: dict[str, Any]) -> None:
    """Replace the state whole (``version`` added)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump({**doc, "version": STATE_VERSION}, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write the job state {path}: {err.strerror or err}") from None
    except BaseException:  # (interrupted: nothing left aside)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class JobState:
    """The state as a running ``job run`` or ``job serve`` keeps it: ``save`` writes it (from
    the main thread or the heartbeat's, one at a time)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.doc = read_state(path)
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def server(self) -> dict[str, Any]:
        return self.doc.setdefault("server", {})  # type: ignore[no-any-return]

    def record(self, docs: list[dict[str, object]], began: str) -> None:
        """Each backed-up or failed source's last run (the round's lines, ``job_cmd``)."""
        runs = self.doc.setdefault("sources", {})
        for doc in docs:
            if doc["status"] != "not due":
                runs[str(doc["source"])] = {"began": began, **{k: doc.get(k) for k in RUN_KEYS}}

    def last_run(self, name: str) -> dict[str, Any]:
        return self.doc.get("sources", {}).get(name) or {}  # type: ignore[no-any-return]

    def save(self, **server: object) -> None:
        """The server record updated (heartbeat now), then the whole state written."""
        with self._lock:
            if server or "server" in self.doc:
                self.server.update(server, heartbeat=now_iso())
            write_state(self.path, self.doc)

    def beat(self, every_s: float = HEARTBEAT_S) -> None:
        """A heartbeat every ``every_s`` from a thread of its own, until ``stop``: the state
        says the server lives also during a long round. A failed write waits for the next."""

        def run() -> None:
            while not self._stop.wait(every_s):
                with contextlib.suppress(OutputError):
                    self.save()

        self._beat = threading.Thread(target=run, name="comb-heartbeat", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()


def lock_holder(path: str) -> str | None:
    """Who holds the lock at ``path`` (its own words), or None when no one does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    return None


@contextlib.contextmanager
def job_lock(path: str, job_file: str, what: str) -> Iterator[None]:
    """Hold the job lock at ``path`` for ``what`` (``comb job run``, ``comb job serve``);
    another process holding it is a LockedError naming it."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot open the job lock {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LockedError(
                f"job file {job_file} is being run by {holder}; wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}) on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing releases the flock)
