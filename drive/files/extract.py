"""Files and folders of a recovery point written to a directory of the host, safely and
faithfully (``comb restore POINT --path P --target DIR``).

Safe: every name is created relative to a directory opened without following links, below the
target; names the host cannot hold (``.``, ``..``, ``/`` or NUL in them, too long) are skipped
with a warning; symbolic links are made as links and never followed. A file is written under a
temporary name and renamed into place, so a killed restore leaves no half file under the real
name. Faithful: hard links stay hard links, holes stay holes, mode and times always, owner when
run as root; with ``special`` FIFOs, and as root character and block devices (``os.mknod``,
their numbers read by the worker: ``view.PointFiles.device``; not as root, one warning per
kind); sockets never (one exists only while a program listens on it); extended attributes and
POSIX ACLs with ``xattrs`` (ext and XFS; ``trusted.*`` and ``security.*`` only as root), each
set through the path of the entry in its parent's descriptor, never following a link; one that
cannot be set or read is skipped.

Owns the host side of a file restore. Must not: read a filesystem itself (``view.PointFiles``
does), or write anything outside the target.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from catalog.errors import FileSystemError, OutputError, describe_os_error

from .entries import Entry, display
from .view import Node, PointFiles

OVERWRITE = ("never", "if-newer", "always")
_OPEN_DIRS = 64
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
_DEVICES = {"chardev": "character device", "blockdev": "block device"}
_SPECIAL = "(restored only with --special: FIFOs, and devices as root)"
_NOT_RESTORED = {
    "socket": "a socket (not restored: a socket exists only while a program listens on it)",
    "other": "an entry of a kind comb does not know (not restored)",
}


@dataclass
class Extracted:
    """What a file restore did."""

    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    existing: int = 0
    xattrs: int = 0
    skipped: list[str] = field(default_factory=list)


class _Dirs:
    """Directory descriptors below the target by relative components, a few kept open; each
    opened one component at a time without following links."""

    def __init__(self, target: str) -> None:
        self.root = os.open(target, _NOFOLLOW_DIR)
        self._open: OrderedDict[tuple[bytes, ...], int] = OrderedDict()

    def fd(self, parts: tuple[bytes, ...]) -> int:
        if not parts:
            return self.root
        found = self._open.get(parts)
        if found is not None:
            self._open.move_to_end(parts)
            return found
        fd = os.open(parts[-1], _NOFOLLOW_DIR, dir_fd=self.fd(parts[:-1]))
        self._open[parts] = fd
        while len(self._open) > _OPEN_DIRS:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        os.close(self.root)


class Extractor:
    def __init__(
        self,
        files: PointFiles,
        target: str,
        overwrite: str = "never",
        special: bool = False,
        warn: Callable[[str], None] = lambda _: None,
        xattrs: bool = False,
    ) -> None:
        self.files = files
        self.xattrs = xattrs
        self._xattr_off: set[bytes] = set()  # namespaces not set (not root; target refuses)
        self._devices_off: set[str] = set()  # device kinds not made (not root)
        self.overwrite = overwrite
        self.special = special
        self.warn = warn
        self.owner = os.geteuid() == 0
        self.done = Extracted()
        os.makedirs(target, mode=0o700, exist_ok=True)
        self.dirs = _Dirs(target)
        self._links: dict[tuple[str, int], tuple[bytes, ...]] = {}
        self._times: list[tuple[tuple[bytes, ...], Node]] = []

    def run(self, top: Node) -> Extracted:
        """``top`` and everything under it, as ``TARGET/<top's name>``."""
        try:
            depth = max(1, top.path.rstrip(b"/").count(b"/"))
            if top.volume is not None:
                self._one((top.entry.name,), top)
            if top.entry.is_dir:
                for node in self.files.walk(top):
                    self._one(tuple(node.path.split(b"/")[depth:]), node)
            for parts, node in reversed(self._times):  # a folder's times after its contents
                self._attributes(parts, node, is_link=False)
        finally:
            self.dirs.close()
        return self.done

    def _skip(self, parts: tuple[bytes, ...], why: str) -> None:
        self.done.skipped.append(f"{display(b'/'.join(parts))}: {why}")
        self.warn(f"skipped {display(b'/'.join(parts))}: {why}")

    def _one(self, parts: tuple[bytes, ...], node: Node) -> None:
        entry = node.entry
        if any(p in (b"", b".", b"..") or b"\0" in p for p in parts):
            self._skip(parts, "a name the host cannot hold")
            return
        try:
            self._write(parts, node)
        except FileSystemError as err:  # this file's metadata or data is damaged: the rest goes on
            self._skip(parts, str(err))
            return
        except OSError as err:
            if err.errno in _FULL:
                raise OutputError(
                    f"cannot write {display(b'/'.join(parts))}: {describe_os_error(err)}"
                ) from None
            self._skip(parts, describe_os_error(err))
            return
        if entry.kind != "dir":
            self.done.files += entry.kind == "file"

    def _write(self, parts: tuple[bytes, ...], node: Node) -> None:
        entry = node.entry
        parent, name = self.dirs.fd(parts[:-1]), parts[-1]
        if entry.kind == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
                self.done.dirs += 1
            except FileExistsError:
                self.dirs.fd(parts)  # an existing folder is entered, a link to one is not
            volume = node.volume
            if volume is not None and node.path != b"/" + volume.name.encode():
                # (a volume's folder, and /lvm and /lvm/VG, have no times of their own)
                self._times.append((parts, node))
            return
        if not self._replace(parent, name, entry):
            self.done.existing += 1
            return
        assert node.volume is not None
        linked = self._links.get((node.volume.name, entry.inode))
        if linked is not None and entry.kind != "dir":
            self._place(parent, name, lambda tmp: self._hard_link(linked, tmp, parent))
            self.done.links += 1
            return
        if entry.kind == "file":
            self._place(parent, name, lambda tmp: self._file(parent, tmp, node))
        elif entry.kind == "symlink":
            target = entry.target or b""
            self._place(parent, name, lambda tmp: os.symlink(target, tmp, dir_fd=parent))
        elif entry.kind == "fifo" and self.special:
            self._place(parent, name, lambda tmp: os.mkfifo(tmp, 0o600, dir_fd=parent))
        elif entry.kind in _DEVICES and self.special:
            if not self._device(parent, name, parts, node):
                return
        else:
            self._skip(parts, _NOT_RESTORED.get(entry.kind, f"a {entry.kind} {_SPECIAL}"))
            return
        if entry.nlink > 1:
            self._links[(node.volume.name, entry.inode)] = parts
        self._attributes(parts, node, is_link=entry.kind == "symlink")

    def _device(self, parent: int, name: bytes, parts: tuple[bytes, ...], node: Node) -> bool:
        """A character or block device made (True), or skipped when not root (one warning per
        kind; each counted as skipped)."""
        kind = _DEVICES[node.entry.kind]
        if not self.owner:
            self.done.skipped.append(f"{display(b'/'.join(parts))}: a {kind}: only as root")
            if kind not in self._devices_off:
                self._devices_off.add(kind)
                self.warn(f"not restoring {kind}s: only as root")
            return False
        major, minor = self.files.device(node)
        what = stat.S_IFCHR if node.entry.kind == "chardev" else stat.S_IFBLK
        number = os.makedev(major, minor)
        self._place(parent, name, lambda tmp: os.mknod(tmp, what | 0o600, number, dir_fd=parent))
        return True

    def _replace(self, parent: int, name: bytes, entry: Entry) -> bool:
        """May ``name`` be written? Not when it exists, unless --overwrite says so."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if self.overwrite == "always":
            return True
        return self.overwrite == "if-newer" and entry.mtime_ns > st.st_mtime_ns

    def _place(self, parent: int, name: bytes, make: Callable[[bytes], None]) -> None:
        tmp = b".comb-restore-" + secrets.token_hex(8).encode()
        try:
            make(tmp)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=parent)
            except OSError:
                pass
            raise

    def _hard_link(self, first: tuple[bytes, ...], tmp: bytes, parent: int) -> None:
        os.link(
            first[-1],
            tmp,
            src_dir_fd=self.dirs.fd(first[:-1]),
            dst_dir_fd=parent,
            follow_symlinks=False,
        )

    def _file(self, parent: int, tmp: bytes, node: Node) -> None:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            for offset, data in self.files.data(node):
                if data.count(0) == len(data):
                    continue  # a run of zeros stays a hole
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                self.done.bytes += len(data)
            os.ftruncate(fd, node.entry.size)
        finally:
            os.close(fd)

    def _attributes(self, parts: tuple[bytes, ...], node: Node, is_link: bool) -> None:
        entry = node.entry
        parent, name = self.dirs.fd(parts[:-1]), parts[-1]
        if self.owner:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if self.xattrs:  # after chown (it drops capabilities), before chmod (the file writable)
            self._set_xattrs(parts, node, b"/proc/self/fd/%d/%s" % (parent, name))
        if not is_link:
            os.chmod(name, entry.mode & 0o7777, dir_fd=parent)
        times = (entry.atime_ns, entry.mtime_ns)
        os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, parts: tuple[bytes, ...], node: Node, path: bytes) -> None:
        """The entry's extended attributes and ACLs; one that cannot be read or set is skipped
        (said), trusted.* and security.* are left out unless root (said once per kind)."""
        try:
            found, problems = self.files.xattrs(node)
        except FileSystemError as err:
            self._skip(parts, f"extended attributes: {err}")
            return
        for line in problems:
            self._skip(parts, f"extended attributes: {line}")
        for key, value in found:
            kind = key.split(b".", 1)[0] + b"."
            if kind in self._xattr_off:
                continue
            if kind in (b"trusted.", b"security.") and not self.owner:
                self._xattr_off.add(kind)
                self.warn(f"not restoring {kind.decode()}* extended attributes: only as root")
                continue
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
                self.done.xattrs += 1
            except OSError as err:
                if err.errno in (errno.EROFS, errno.EIO):
                    raise OutputError(
                        f"cannot write {display(b'/'.join(parts))}: {describe_os_error(err)}"
                    ) from None
                why = describe_os_error(err)
                if err.errno == errno.EOPNOTSUPP:
                    self._xattr_off.add(kind)
                    why = f"the target does not support {kind.decode()}* (none restored)"
                self._skip(parts, f"extended attribute {display(key)}: {why}")


def extract(
    files: PointFiles,
    top: Node,
    target: str,
    overwrite: str = "never",
    special: bool = False,
    warn: Callable[[str], None] = lambda _: None,
    xattrs: bool = False,
) -> Extracted:
    try:
        extractor = Extractor(files, target, overwrite, special, warn, xattrs)
    except OSError as err:
        raise OutputError(f"cannot use {target} as the target: {describe_os_error(err)}") from None
    return extractor.run(top)
