"""Local copies of an object-storage repository's files, for readers that take a path (DuckDB
and pyarrow datasets over the catalog's Parquet files): kept under the cache directory, one
folder per repository location, bounded in size (least recently used first out).

Files are immutable and content-named, so a copy stays right; it is checked against its name
at each use (``catalog.store.parquet_io.verified_path``), never trusted. Owns the copies'
folder, writing one and the bound. Must not: fetch anything (``catalog.store.s3`` does).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from contextlib import suppress

from catalog.errors import RepositoryError, UsageError
from catalog.store.cachedir import cache_dir

COPIES_MIB = 2048  # the bound, unless COMB_S3_CACHE_MIB says otherwise
COPIES_MIB_ENV = "COMB_S3_CACHE_MIB"
_added = 0  # bytes this process added since it last looked at the bound
_lock = threading.Lock()
_STARTED = time.time()  # copies used since this process started are never trimmed by it


def copies_root() -> str:
    return os.path.join(cache_dir(), "s3")


def copies_dir(location: str) -> str:
    """The folder of one repository's copies."""
    return os.path.join(
        copies_root(), hashlib.blake2b(location.encode(), digest_size=12).hexdigest()
    )


def fresh(path: str) -> bool:
    """True (and the copy marked as just used) when ``path`` is already kept."""
    if not os.path.exists(path):
        return False
    with suppress(OSError):
        os.utime(path)
    return True


def keep(path: str, data: bytes, what: str) -> None:
    """Write a copy (whole, under a temporary name first), then keep the bound."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as err:
        raise RepositoryError(
            f"cannot keep a local copy of {what} in {path}: {err.strerror or err}"
        ) from None
    _trim(len(data))


def bound() -> int:
    """The bound in bytes (``COMB_S3_CACHE_MIB``, a whole number of MiB)."""
    text = os.environ.get(COPIES_MIB_ENV) or str(COPIES_MIB)
    if not text.isdigit():
        raise UsageError(f"{COPIES_MIB_ENV}={text}: give a whole number of MiB")
    return int(text) << 20


def _trim(added: int) -> None:
    """Remove the least recently used copies of every repository once they exceed the bound
    (looked at after every tenth of it added by this process), down to 80 % of it; never one
    this process used (a query's own files stay while it runs, whatever the bound)."""
    global _added
    limit = bound()
    with _lock:
        _added += added
        if _added < limit // 10:
            return
        _added = 0
    files = []
    for dirpath, _dirs, names in os.walk(copies_root()):
        for n in names:
            with suppress(OSError):
                st = os.stat(os.path.join(dirpath, n))
                files.append((st.st_mtime, st.st_size, os.path.join(dirpath, n)))
    total = sum(f[1] for f in files)
    for mtime, size, path in sorted(files):
        if total <= limit * 8 // 10 or mtime >= _STARTED:
            break
        with suppress(OSError):
            os.unlink(path)
            total -= size
