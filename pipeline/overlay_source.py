"""An overlay as a backup source (``comb backup overlay:NAME``): its base recovery point with
the overlay's write records on top.

``OverlaySource`` is plain picklable configuration (repository path and overlay name), usable
wherever ``stages.source.ImageSource`` is: each worker's ``open()`` replays the overlay's logs
read-only (no lock: the driver holds the overlay's lock for the whole backup, see
``pipeline.backup``) and reads the base point through ``drive.source.PointSource``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from catalog.errors import CorruptionError, RepositoryError
from catalog.errors import describe_os_error as _os
from catalog.repo import Repository
from drive import overlay
from drive import overlay_log as L
from drive.source import PointSource

PREFIX = "overlay:"


def overlay_name(source_path: str) -> str | None:
    """NAME of an ``overlay:NAME`` source, else None (an image file or block device)."""
    return source_path[len(PREFIX) :] if source_path.startswith(PREFIX) else None


def _replay(repo: Repository, name: str, size: int) -> L.ExtentMap:
    """The overlay's extent map, read without writing (a torn tail is left out, not cut)."""
    path = overlay.overlay_dir(repo, name)
    logs = overlay.log_numbers(path)
    written = L.ExtentMap()
    for k, n in enumerate(logs):
        file = os.path.join(path, overlay.log_name(n))
        try:
            L.replay(file, n, k == len(logs) - 1, size, written)
        except OSError as err:
            raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
    return written


@dataclass(frozen=True)
class OverlaySource:
    repo: str
    name: str

    def open(self) -> OpenOverlay:
        return OpenOverlay(self.repo, self.name)

    def describe(self) -> str:
        return PREFIX + self.name


class OpenOverlay:
    """An overlay open read-only: reads are the base point's bytes with the writes on top."""

    def __init__(self, repo_path: str, name: str) -> None:
        repo = Repository.open(repo_path)
        doc = overlay.read_doc(repo, name)
        self.name = name
        self.size = int(str(doc["size"]))
        self.path = overlay.overlay_dir(repo, name)
        self.map = _replay(repo, name, self.size)
        self.base = PointSource(repo, repo.resolve(str(doc["base"])))
        self._fds: dict[int, int] = {}

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The base point's data runs and every written run (data or zeros), merged."""
        runs = sorted(
            [(o, o + n) for o, n in self.base.extents()]
            + [(p.start, p.end) for p in self.map.pieces(0, self.size)]
        )
        out: list[tuple[int, int]] = []
        for lo, hi in runs:
            lo, hi = max(lo, start), min(hi, end)
            if lo >= hi:
                continue
            if out and lo <= out[-1][0] + out[-1][1]:
                s, n = out[-1]
                out[-1] = (s, max(s + n, hi) - s)
            else:
                out.append((lo, hi - lo))
        return out

    def read_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        buf[:] = self.base.read(offset, n)
        for p in self.map.pieces(offset, n):
            lo, hi = p.start - offset, p.end - offset
            if p.pos < 0:
                buf[lo:hi] = bytes(hi - lo)
                continue
            data = os.pread(self._fd(p.log), hi - lo, p.pos)
            if len(data) != hi - lo:
                raise CorruptionError(f"overlay {self.name}: log {p.log} is shorter than its map")
            buf[lo:hi] = data

    def _fd(self, log: int) -> int:
        if log not in self._fds:
            file = os.path.join(self.path, overlay.log_name(log))
            try:
                self._fds[log] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise RepositoryError(f"cannot read {file}: {_os(err)}") from None
        return self._fds[log]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
