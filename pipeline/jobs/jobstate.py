"""A job file's state on this machine (README "Jobs"): what ``job run`` and ``job serve`` last did
for each source, whether a ``job serve`` runs it now, and the lock that keeps two of them off
one job file.

The state is a JSON file beside its lock, ``<state dir>/jobs/<job file's name>-<key>.json`` (the
key: a hash of the job file's absolute path and the repository's location), where the state
dir is ``$COMB_STATE_DIR``, else ``$XDG_STATE_HOME/comb``, else ``~/.local/state/comb``. It is
replaced whole (written aside, then renamed), so a reader never sees half of it. The lock is an
``flock`` on ``<state>.lock``, which names the process holding it.

Owns the state file's place, reading, writing and lock. Must not: decide what is due or back
anything up (``pipeline.cli.job_cmd``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catalog.errors import LockedError, OutputError

STATE_VERSION = 1


def state_path(job_file: str, repo_location: str, given: str | None = None) -> str:
    """Where the state of ``job_file`` run against ``repo_location`` lives (``given``: there)."""
    if given:
        return os.path.abspath(given)
    base = os.environ.get("COMB_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state"), "comb"
    )
    job = os.path.abspath(job_file)
    key = hashlib.sha256(f"{job}\0{repo_location}".encode()).hexdigest()[:16]
    return os.path.join(base, "jobs", f"{Path(job).stem}-{key}.json")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_state(path: str) -> dict[str, Any]:
    """The state last written, or an empty one (none yet, or unreadable: it is rewritten)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("version") == STATE_VERSION else {}


def write_state(path: str, doc: dict[str, Any]) -> None:
    """Replace the state whole (``version`` added)."""
    tmp = f"{path}.{os.getpid()}.tmp"
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


def server_alive(doc: dict[str, Any]) -> bool:
    """Whether the ``job serve`` the state names still runs (on this host, by its pid)."""
    server = doc.get("server")
    if not isinstance(server, dict) or server.get("state") == "stopped":
        return False
    if server.get("host") != socket.gethostname() or not isinstance(server.get("pid"), int):
        return False
    try:
        os.kill(server["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def job_lock(path: str, job_file: str, what: str) -> Iterator[None]:
    """Hold the job file's lock for ``what`` (``job run`` or ``job serve``); another process
    holding it is a LockedError naming it."""
    lock = f"{path}.lock"
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot open the job lock {lock}: {err.strerror or err}") from None
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
