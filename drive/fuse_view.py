"""The file view of a FUSE mount: ``MOUNTPOINT/<source>/<point id>/files/`` holds the point's
volumes (``part1``, ``disk``, ``lvm/VG/LV``) and their files, read-only, read through the same
``drive.files.view.PointFiles`` as ``comb ls`` and ``cat`` (guest filesystems parsed in the
sandboxed worker).

Owns the points opened for their files (the few most recently used, each a ``PointFiles``) and
the attributes a file-view entry shows. Must not: know about inodes or requests (``drive.fuse``
does), write anything, or follow a link. Every call may block: the caller runs it on a worker
thread.
"""

from __future__ import annotations

import stat
import threading
from collections import OrderedDict

from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.files.entries import Entry
from drive.files.view import Node, PointFiles

OPEN_VIEWS = 4
FILES_DIR = b"files"
_TYPE = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}


def st_mode(entry: Entry) -> int:
    """The file type and permission bits a view entry shows (a volume's folder: 0555)."""
    return _TYPE.get(entry.kind, stat.S_IFREG) | (entry.mode & 0o7777)


class FileViews:
    """Points opened for their files, the most recently used few kept."""

    def __init__(self, repo: Repository, keep: int = OPEN_VIEWS) -> None:
        self._repo = repo
        self._keep = keep
        self._open: OrderedDict[str, PointFiles] = OrderedDict()
        self._lock = threading.Lock()

    def _files(self, point: RecoveryPoint) -> PointFiles:
        with self._lock:
            files = self._open.get(point.id)
            if files is None:
                files = PointFiles(self._repo.reader(point))
                self._open[point.id] = files
                while len(self._open) > self._keep:
                    self._open.popitem(last=False)[1].close()
            else:
                self._open.move_to_end(point.id)
            return files

    def listdir(self, point: RecoveryPoint, path: bytes) -> list[Node]:
        files = self._files(point)
        with self._lock:  # one request at a time per point: its workers answer in turn
            return files.listdir(files.lookup(path))

    def read(self, point: RecoveryPoint, node: Node, offset: int, size: int) -> bytes:
        files = self._files(point)
        with self._lock:
            return files.read_at(node, offset, size)

    def close(self) -> None:
        with self._lock:
            for files in self._open.values():
                files.close()
            self._open.clear()
