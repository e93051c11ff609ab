"""An overlay read without writing: its base recovery point with the write records on top, as
a ``catalog.read.source.MappedSource`` (a snapshot of the logs as they were when it was opened).

Used where nothing may be written: ``comb backup overlay:NAME`` (which holds the overlay's lock
meanwhile) and the FUSE drive (which may read while a server appends; it sees the records
replayed at open). A torn last record is left out, not cut (cutting is the writer's job).

Owns the read-only replay and the reads. Must not: write to the overlay or the repository.
"""

from __future__ import annotations

import threading

import drive.overlays.log as L
import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError, RepositoryError
from catalog.errors import describe_os_error as _os
from catalog.read.source import read_bytes
from catalog.repo import Repository
from catalog.store.inplace import LogFile


def replay(repo: Repository, name: str, size: int, sealed: L.Sealed | None = None) -> L.ExtentMap:
    """The overlay's extent map, read without writing (``sealed``: encrypted repository)."""
    logs = overlay.log_numbers(repo, name)
    written = L.ExtentMap()
    for k, n in enumerate(logs):
        last, encrypted = k == len(logs) - 1, repo.sealer.encrypted
        try:
            overlay.replay_log(repo, name, n, last, size, written, sealed, encrypted)
        except OSError as err:
            raise RepositoryError(f"cannot read {_shown(repo, name, n)}: {_os(err)}") from None
    return written


def _shown(repo: Repository, name: str, n: int) -> str:
    return overlay.shown(repo, overlay.log_path(name, n))


class OverlayReader:
    """Reads of an overlay: the base point's bytes with the writes on top."""

    def __init__(self, repo: Repository, name: str) -> None:
        doc = overlay.read_doc(repo, name)
        self.name = name
        self.size = int(str(doc["size"]))
        self._repo = repo
        self._sealed = overlay.sealed_records(repo, doc, name)
        self.map = replay(repo, name, self.size, self._sealed)
        self.base = repo.reader(repo.resolve(str(doc["base"])))
        self._logs: dict[int, LogFile] = {}
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
                buf[lo:hi] = self._sealed.read(self._log(p.log), p.log, p.pos, hi - lo, self.name)
                continue
            data = self._log(p.log).pread(hi - lo, p.pos)
            if len(data) != hi - lo:
                raise CorruptionError(f"overlay {self.name}: log {p.log} is shorter than its map")
            buf[lo:hi] = data

    def _log(self, n: int) -> LogFile:
        with self._lock:
            if n not in self._logs:
                try:
                    self._logs[n] = self._repo.storage.open_log(overlay.log_path(self.name, n))
                except OSError as err:
                    raise RepositoryError(
                        f"cannot read {_shown(self._repo, self.name, n)}: {_os(err)}"
                    ) from None
            return self._logs[n]

    def close(self) -> None:
        with self._lock:
            for log in self._logs.values():
                log.close()
            self._logs.clear()
