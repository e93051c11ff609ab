"""The files of a FUSE mount: each point's and each overlay's image files, opened on demand,
a few kept open.

Owns the file names and their formats (``FILES``), a point or an overlay opened as those
images (``OpenPoint``: its reader plus one ``VirtualImage`` per file, reads serialised;
``OpenOverlay``: a snapshot of the overlay's writes over its base) and the caches of opened
ones (``PointCache``: the few most recently used points, every point's file sizes remembered;
``OverlayCache``: a snapshot reused for ``REFRESH_S``). Must not write anything, nor know
about FUSE itself (inodes, requests, mounting are ``drive.fuse``'s); reads the repository only
through ``Repository.reader`` and ``drive.overlays.reader``. Calls that open or read block:
the caller runs them on a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.formats.image import VirtualImage
from drive.formats.registry import builder
from drive.overlays.reader import OverlayReader

# file name in a point's directory -> export format (drive.formats.registry.FORMATS)
FILES: dict[bytes, str] = {
    b"disk.img": "raw",
    b"disk.qcow2": "qcow2",
    b"disk.vhd": "vhd",
    b"disk.vhdx": "vhdx",
    b"disk.vmdk": "vmdk",
}
OPEN_POINTS = 4  # points kept open (each: its chunk locations, ~1.6 MiB per GiB of data)
REFRESH_S = 2.0  # point documents re-read, overlay snapshots retaken, at most this often


class OpenPoint:
    """One point opened: its block source and the five images, reads serialised by a lock
    (a point's reader keeps a cache and a thread pool of its own)."""

    def __init__(self, repo: Repository, point: RecoveryPoint) -> None:
        source = repo.reader(point)
        self.images: dict[str, VirtualImage] = {f: builder(f)(source) for f in FILES.values()}
        self._lock = threading.Lock()

    def read(self, fmt: str, offset: int, length: int) -> bytes:
        with self._lock:
            return self.images[fmt].read(offset, length)

    def size(self, fmt: str) -> tuple[int, int]:
        """(file size, bytes backed by data or headers) of one image."""
        img = self.images[fmt]
        return img.size, sum(s.length for s in img.segments)


class OpenOverlay(OpenPoint):
    """One overlay opened: a snapshot of its write records over its base, as five images."""

    def __init__(self, repo: Repository, name: str) -> None:  # noqa: D107 - same as parent
        reader = OverlayReader(repo, name)
        self.images = {f: builder(f)(reader) for f in FILES.values()}
        self._lock = threading.Lock()
        self.made_s = time.monotonic()


class OverlayCache:
    """Overlays change while served: a snapshot is reused for ``REFRESH_S`` seconds, then a
    new one is taken for the next open or stat (open files keep theirs)."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._open: dict[str, OpenOverlay] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> OpenOverlay:
        """Blocking (replays the logs, reads the base manifest): call from a worker thread."""
        with self._lock:
            hit = self._open.get(name)
            if hit is not None and time.monotonic() - hit.made_s < REFRESH_S:
                return hit
            opened = self._open[name] = OpenOverlay(self._repo, name)
            while len(self._open) > OPEN_POINTS:
                self._open.pop(next(iter(self._open)))
            return opened


class PointCache:
    """The few most recently used points open; every point's file sizes remembered (small), so
    a ``stat`` after eviction needs no rebuild. Open files hold their point themselves."""

    def __init__(self, repo: Repository, keep: int) -> None:
        self._repo = repo
        self._keep = keep
        self._open: OrderedDict[str, OpenPoint] = OrderedDict()
        self._sizes: dict[str, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def get(self, point: RecoveryPoint) -> OpenPoint:
        """Blocking (reads the manifest on a miss): call from a worker thread."""
        with self._lock:
            hit = self._open.get(point.id)
            if hit is not None:
                self._open.move_to_end(point.id)
                return hit
            opened = OpenPoint(self._repo, point)
            self._open[point.id] = opened
            self._sizes[point.id] = {f: opened.size(f) for f in opened.images}
            while len(self._open) > self._keep:
                self._open.popitem(last=False)
            return opened

    def sizes(self, point: RecoveryPoint) -> dict[str, tuple[int, int]]:
        """format -> (file size, bytes backed by data or headers). Blocking on a first call."""
        known = self._sizes.get(point.id)
        if known is None:
            self.get(point)
            known = self._sizes[point.id]
        return known
