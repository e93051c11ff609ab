"""The FUSE virtual drive: every recovery point of a repository as read-only image files.

Layout (all generated on the fly, nothing is copied)::

    MOUNTPOINT/<escaped source name>/<point id>/disk.img     raw (holes kept)
                                               /disk.qcow2   qcow2 v3
                                               /disk.vhd     VHD, dynamic
                                               /disk.vhdx    VHDX, dynamic
                                               /disk.vmdk    VMDK, monolithicSparse
                                               /files/part1/etc/fstab   the files inside
                                                     (``drive.fuse_view``; read-only)

    MOUNTPOINT/%overlays/<overlay name>/disk.*                an overlay over its base point

Owns: the reversible escaping of source names into file names, the inode tree (built from the
points at mount time; points committed later appear on the next listing, none disappear), the
pyfuse3 request handlers, and the serve loop with its signal handling (SIGINT, SIGTERM, SIGHUP
unmount cleanly). The files themselves, opened and a few kept open, are ``drive.fuse_files``'.

Must not: write anything (the mount is ``ro`` and every modifying request answers EROFS), let
one failed read stop the filesystem (any error reading becomes EIO for that request, and one
line through the ``warn`` it is given), or touch packs and manifests other than through
``Repository.reader``. Imports catalog and drive only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import pyfuse3
import trio

import drive.overlays.overlay as overlays
from catalog.errors import UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.files.view import Node
from drive.fuse_files import FILES, OPEN_POINTS, REFRESH_S, OpenPoint, OverlayCache, PointCache
from drive.fuse_view import FILES_DIR, FileViews, st_mode

# Overlays live under this directory: escaped source names never start with "%o" (a "%" is
# always followed by two hex digits or "~"), so it cannot collide with a source.
OVERLAYS_DIR = b"%overlays"
NAME_MAX_BYTES = 255
_BLKSIZE_BYTES = 1 << 20  # st_blksize: tools that honour it read 1 MiB at a time
_DIR_TIMEOUT_S = 1.0  # the kernel re-asks soon, so new points show up
_FILE_TIMEOUT_S = 60.0  # a point's files never change
_MOUNT_OPTIONS = {"ro", "noatime", "default_permissions", "fsname=comb", "subtype=comb"}
T = TypeVar("T")


def escape_name(name: str) -> bytes:
    """A source name as one file name: its UTF-8 bytes with '%', '/', NUL and control bytes
    (< 0x20, 0x7f) written as ``%XX``; "." and ".." fully escaped, "" as "%". Reversible ("%"
    is "", any other entry percent-decodes to the name) up to 255 bytes; a longer result is cut
    and ends in ``%~`` plus 16 hex digits of the name's SHA-256 (unique, but not reversible)."""
    raw = name.encode("utf-8", "surrogatepass")
    if raw in (b"", b".", b".."):
        return b"".join(b"%%%02X" % b for b in raw) or b"%"
    out = b"".join(b"%%%02X" % b if b < 0x20 or b in b"%/\x7f" else bytes([b]) for b in raw)
    if len(out) > NAME_MAX_BYTES:
        out = out[: NAME_MAX_BYTES - 18] + b"%~" + hashlib.sha256(raw).hexdigest()[:16].encode()
    return out


@dataclass
class _Node:
    inode: int
    parent: int
    kind: str  # "root", "source", "point" or "file"
    time_ns: int
    point: RecoveryPoint | None = None
    fmt: str = ""
    overlay: str = ""  # for an overlay's directory and files
    children: dict[bytes, int] = field(default_factory=dict)  # insertion order = listing order
    view: Node | None = None  # a file-view entry (kinds "view" and "view entry")
    listed: bool = False  # a file-view folder's children are in the tree


def _time_ns(point: RecoveryPoint) -> int:
    try:
        return int(datetime.fromisoformat(point.time).timestamp() * 1e9)
    except (TypeError, ValueError):
        return time.time_ns()


def _view_attr(a: pyfuse3.EntryAttributes, node: _Node) -> pyfuse3.EntryAttributes:
    """A file-view entry as the guest's filesystem describes it (owner, mode, times)."""
    assert node.view is not None
    e = node.view.entry
    a.st_mode, a.st_nlink, a.st_size = st_mode(e), max(1, e.nlink), e.size
    a.st_blocks = -(-e.size // 512)
    a.st_uid, a.st_gid, a.st_blksize = e.uid, e.gid, _BLKSIZE_BYTES
    a.st_mtime_ns = e.mtime_ns or node.time_ns
    a.st_ctime_ns = e.ctime_ns or node.time_ns
    a.st_atime_ns = e.atime_ns or node.time_ns
    a.entry_timeout = a.attr_timeout = _FILE_TIMEOUT_S  # a point's files never change
    return a


def _fail(code: int) -> NoReturn:
    raise pyfuse3.FUSEError(code)


class CombFS(pyfuse3.Operations):
    """The pyfuse3 handlers. Tree lookups run on the trio thread; anything that reads the
    repository runs on a worker thread, and any error there answers EIO."""

    def __init__(
        self,
        repo: Repository,
        warn: Callable[[str], None],
        keep_points: int = OPEN_POINTS,
    ) -> None:
        """``warn``: says one line about a request that failed (the command line passes its
        warning helper, ``pipeline.console.warn``)."""
        super().__init__()
        self._repo = repo
        self._warn = warn
        self._cache = PointCache(repo, keep_points)
        self._overlays = OverlayCache(repo)
        self.views = FileViews(repo)
        root = pyfuse3.ROOT_INODE
        self._nodes: dict[int, _Node] = {root: _Node(root, root, "root", time.time_ns())}
        self._handles: dict[int, tuple[OpenPoint, str]] = {}
        self._view_handles: dict[int, _Node] = {}
        self._links: dict[tuple[str, str, int], int] = {}  # a point's hard-linked file -> inode
        self._next_fh = 1
        self._refreshed_s = time.monotonic()
        self.add_points(repo.points())
        self.add_overlays(overlays.names(repo))

    def add_points(self, points: list[RecoveryPoint]) -> None:
        """Add points not in the tree yet (sources by name, then by time)."""
        root = self._nodes[pyfuse3.ROOT_INODE]
        for p in sorted(points, key=lambda p: (p.source, p.time, p.id)):
            src = self._child(root, escape_name(p.source), "source", _time_ns(p))
            src.time_ns = max(src.time_ns, _time_ns(p))
            if p.id.encode() in src.children:
                continue
            pdir = self._child(src, p.id.encode(), "point", _time_ns(p), p)
            for name, fmt in FILES.items():
                self._child(pdir, name, "file", pdir.time_ns, p).fmt = fmt
            self._child(pdir, FILES_DIR, "view", pdir.time_ns, p)

    def add_overlays(self, names: list[str]) -> None:
        """``%overlays/<name>/disk.*`` for overlays not in the tree yet (removed ones stay
        listed until remount; reading them fails with EIO)."""
        if not names:
            return
        top = self._child(self._nodes[pyfuse3.ROOT_INODE], OVERLAYS_DIR, "overlays", time.time_ns())
        for name in sorted(names):
            if name.encode() in top.children:
                continue
            odir = self._child(top, name.encode(), "overlay", top.time_ns)
            odir.overlay = name
            for file, fmt in FILES.items():
                node = self._child(odir, file, "file", top.time_ns)
                node.fmt, node.overlay = fmt, name

    def _child(
        self, parent: _Node, name: bytes, kind: str, t_ns: int, p: RecoveryPoint | None = None
    ) -> _Node:
        inode = parent.children.get(name)
        if inode is None:
            inode = len(self._nodes) + pyfuse3.ROOT_INODE
            self._nodes[inode] = _Node(inode, parent.inode, kind, t_ns, p)
            parent.children[name] = inode
        return self._nodes[inode]

    async def _refresh(self) -> None:
        """Pick up points committed since the mount (rate-limited)."""
        if time.monotonic() - self._refreshed_s < REFRESH_S:
            return
        self._refreshed_s = time.monotonic()
        points = await self._blocking("list points", self._repo.points)
        names = await self._blocking("list overlays", overlays.names, self._repo)
        self.add_points(points)  # on the trio thread: handlers never see a half-changed tree
        self.add_overlays(names)

    async def _blocking(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the drive
            self._warn(f"{what}: {err}")
            _fail(errno.EIO)

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        return node if node is not None else _fail(errno.ENOENT)

    async def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        if node.view is not None:
            return _view_attr(a, node)
        if node.kind == "file":
            if node.overlay:
                size, backed = (await self._opened(node)).size(node.fmt)
            else:  # sizes stay known after the point is closed: no reopening for a stat
                assert node.point is not None
                sizes = await self._blocking(
                    f"open point {node.point.id}", self._cache.sizes, node.point
                )
                size, backed = sizes[node.fmt]
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, size
            a.st_blocks = -(-backed // 512)
            # an overlay changes; a point's files never do
            a.entry_timeout = a.attr_timeout = _DIR_TIMEOUT_S if node.overlay else _FILE_TIMEOUT_S
        else:
            subdirs = 0 if node.kind in ("point", "overlay") else len(node.children)
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2 + subdirs
            a.entry_timeout = a.attr_timeout = _DIR_TIMEOUT_S
        a.st_uid, a.st_gid, a.st_blksize = os.getuid(), os.getgid(), _BLKSIZE_BYTES
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.time_ns
        return a

    async def _opened(self, node: _Node) -> OpenPoint:
        """The opened point, or overlay snapshot, of a file node (opened on a worker thread)."""
        if node.overlay:
            return await self._blocking(
                f"open overlay {node.overlay}", self._overlays.get, node.overlay
            )
        assert node.point is not None
        return await self._blocking(f"open point {node.point.id}", self._cache.get, node.point)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._attr(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        node = self._node(parent_inode)
        if name in (b".", b".."):
            return await self._attr(self._node(node.inode if name == b"." else node.parent))
        child = node.children.get(name)
        if child is None and node.kind in ("root", "source", "overlays"):
            await self._refresh()
            child = node.children.get(name)
        if child is None and node.kind == "view":
            await self._list_view(node)
            child = node.children.get(name)
        return await self._attr(self._nodes[child]) if child else _fail(errno.ENOENT)

    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if node.kind == "file":
            _fail(errno.ENOTDIR)
        if node.kind in ("root", "source", "overlays"):
            await self._refresh()
        if node.kind == "view":
            await self._list_view(node)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = list(self._node(fh).children.items())
        for i, (name, inode) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, await self._attr(self._nodes[inode]), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def _list_view(self, node: _Node) -> None:
        """A file-view folder's entries, listed once (the point never changes)."""
        if node.listed:
            return
        assert node.point is not None
        path = node.view.path if node.view is not None else b"/"
        found = await self._blocking(
            f"list {path.decode(errors='replace')} of {node.point.id}",
            self.views.listdir,
            node.point,
            path,
        )
        for n in found:
            if len(n.entry.name) > NAME_MAX_BYTES:
                continue
            # Hard links are one inode here too (tools that compare st_ino see them as such).
            key = (node.point.id, n.volume.name if n.volume else "", n.entry.inode)
            same = self._links.get(key) if n.entry.nlink > 1 and not n.entry.is_dir else None
            if same is not None:
                node.children.setdefault(n.entry.name, same)
                continue
            kind = "view" if n.entry.is_dir else "view entry"
            child = self._child(node, n.entry.name, kind, node.time_ns, node.point)
            child.view = n
            if n.entry.nlink > 1 and not n.entry.is_dir:
                self._links[key] = child.inode
        node.listed = True

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.view is None or node.view.entry.kind != "symlink":
            _fail(errno.EINVAL)
        return node.view.entry.target or b""

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            _fail(errno.EROFS)
        if node.view is not None:
            if node.view.entry.kind != "file":
                _fail(errno.EISDIR if node.view.entry.is_dir else errno.EACCES)
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            self._view_handles[fh] = node
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if node.kind != "file":
            _fail(errno.EISDIR)
        opened = await self._opened(node)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._handles[fh] = (opened, node.fmt)
        # direct_io: the kernel passes reads through whole (1 MiB requests on libfuse3) and
        # keeps no page cache of its own; the point's chunk cache is the cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        view = self._view_handles.get(fh)
        if view is not None:
            assert view.point is not None and view.view is not None
            where = f"read {view.view.path.decode(errors='replace')} at {off}"
            return await self._blocking(where, self.views.read, view.point, view.view, off, size)
        handle = self._handles.get(fh)
        if handle is None:
            _fail(errno.EBADF)
        opened, fmt = handle
        return await self._blocking(f"read {fmt} at {off}", opened.read, fmt, off, size)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._view_handles.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = _BLKSIZE_BYTES
        s.f_files, s.f_namemax = len(self._nodes), NAME_MAX_BYTES
        return s

    async def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        _fail(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only


def serve(fs: CombFS, mountpoint: str, on_mounted: Callable[[], None]) -> int:
    """Mount ``fs`` at ``mountpoint`` and serve it until a signal or an unmount from outside;
    always unmounts. Returns the signal that stopped it (0: unmounted from outside)."""
    got: list[int] = []

    def early_stop(signum: int, _frame: object) -> None:  # before trio listens
        got.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, early_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            pyfuse3.init(fs, mountpoint, set(_MOUNT_OPTIONS))
        except RuntimeError as err:
            raise UsageError(f"cannot mount at {mountpoint}: {err}") from None
        try:
            trio.run(_serve, on_mounted, got)
        except (KeyboardInterrupt, trio.TrioInternalError):
            got.append(signal.SIGINT)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return got[0] if got else 0


async def _serve(on_mounted: Callable[[], None], got: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    got.append(signum)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            on_mounted()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # the kernel ended the session: unmounted outside
