"""An overlay read without writing: its base recovery point with the write records on top, as
a ``catalog.read.source.MappedSource`` (a snapshot of the logs as they were when it was opened).

Used where nothing may be written: ``comb backup overlay:NAME`` (which holds the overlay's lock
meanwhile) and the FUSE drive (which may read while a server appends; it sees the records
replayed at open). A torn last record is left out, not cut (cutting is the writer's job).

Owns the read-only replay and the reads. Must not: write to the overlay or the repository.
"""

from __future__ import annotations

import os
import threading

import drive.overlays.log as L
import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError, RepositoryError
from catalog.errors import describe_os_error as _os
from catalog.read.source import read_bytes
from catalog.repo import Repository


def replay(repo: Repository, name: str, size: int, sealed: L.Sealed | None = None) -> L.ExtentMap:
    """The overlay's extent map, read without writing (``sealed``: encrypted repository)."""
    path = overlay.overlay_dir(repo, name)
    logs = overlay.log_numbers(path)
    written = L.ExtentMap()
    for k, n in enumerate(logs):
        file = os.path.join(path, overlay.log_name(n))
        try:
            L.replay(file, n, k == len(logs) - 1, size, written, sealed, repo.sealer.encrypted)
        except OSError as err:
            raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
    return written


class OverlayReader:
    """Reads of an overlay: the base point's bytes with the writes on top."""

    def __init__(self, repo: Repository, name: str) -> None:
        doc = overlay.read_doc(repo, name)
        self.name = name
        self.size = int(str(doc["size"]))
        self.path = overlay.overlay_dir(repo, name)
        self._sealed = overlay.sealed_records(repo, doc, name)
        self.map = replay(repo, name, self.size, self._sealed)
        self.base = repo.reader(repo.resolve(str(doc["base"])))
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def granularity(self) -> int:
        return self.base.granularity

    def extents(self) -> list[tuple[int, int]]:
        """The base point's data runs and every written run (data or zeros), merged and widened
        to whole chunks (formats allocate by them)."""
        g = self.granularity
        runs = sorted(
            [(o, o + n) for o, n in self.base.extents()]
            + [
                (p.start // g * g, min(self.size, -(-p.end // g) * g))
                for p in self.map.pieces(0, self.size)
            ]
        )
        out: list[tuple[int, int]] = []
        for lo, hi in runs:
            if out and lo <= out[-1][0] + out[-1][1]:
                s, n = out[-1]
                out[-1] = (s, max(s + n, hi) - s)
            elif hi > lo:
                out.append((lo, hi - lo))
        return out

    def read(self, offset: int, length: int) -> bytes:
        return read_bytes(self, offset, length)

    def read_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        self.base.read_into(buf, offset)
        for p in self.map.pieces(offset, n):
            lo, hi = p.start - offset, p.end - offset
            if p.pos < 0:
                buf[lo:hi] = bytes(hi - lo)
                continue
            if self._sealed is not None:
                buf[lo:hi] = self._sealed.read(self._fd(p.log), p.log, p.pos, hi - lo, self.name)
                continue
            data = os.pread(self._fd(p.log), hi - lo, p.pos)
            if len(data) != hi - lo:
                raise CorruptionError(f"overlay {self.name}: log {p.log} is shorter than its map")
            buf[lo:hi] = data

    def _fd(self, log: int) -> int:
        with self._lock:
            if log not in self._fds:
                file = os.path.join(self.path, overlay.log_name(log))
                try:
                    self._fds[log] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as err:
                    raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
            return self._fds[log]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
