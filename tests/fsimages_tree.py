"""The source tree that tests/fsimages.py puts into filesystem images, and its truth.

``make_tree`` creates real files (contents, modes, hard links, symlinks, a fifo, unicode and
hostile names, a sparse file, fixed mtimes) and returns ``{b"/rel/path": Item}``; ``walk``
lists any directory the same way (the judge of a mounted image); ``truth_for`` says what a
given filesystem really holds of a tree (FAT, exFAT and NTFS hold less than ext4).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

MiB = 1024 * 1024
# mtimes: entry i (in creation order) gets BASE + i * STEP nanoseconds, all distinct.
MTIME_BASE_NS = 1_600_000_000_123_456_789
MTIME_STEP_NS = 86_400_000_000_001

NFC_CAFE = "caf\u00e9".encode()
NFD_CAFE = "cafe\u0301".encode()
HOSTILE_NAMES = [
    b"new\nline",
    b"tab\there",
    b"back\\slash",
    b"-leading-dash",
    b"a..b",
    b"...",
    b"L" * 255,
    b"bad\xff\xfe",
    b"quote'\"s",
    b"$(id)",
]
NOT_ON_WINDOWS_FS = set(b'"*/:<>?\\|')  # characters FAT and exFAT names cannot hold


@dataclass(frozen=True)
class Item:
    """What an entry in the image is: the truth tests compare against."""

    kind: str  # "file", "dir", "symlink", "fifo"
    size: int  # bytes for files (0 otherwise)
    sha256: str | None  # of file content
    target: bytes | None  # symlink target
    mode: int  # permission bits (0o7777) as created
    inode_group: int | None  # same number for hard-linked paths, else None
    # Set by make_tree and walk; not part of equality (FAT keeps 2 s, exFAT 10 ms).
    mtime_ns: int = field(default=0, compare=False)


class _Builder:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = os.fsencode(root)
        self.rng = random.Random(seed)
        self.items: dict[bytes, Item] = {}
        self.order: list[bytes] = []
        self.links: dict[bytes, bytes] = {}

    def _add(self, rel: bytes, item: Item) -> None:
        self.items[rel] = item
        self.order.append(rel)

    def dir(self, rel: bytes, mode: int = 0o755) -> None:
        parts = rel.strip(b"/").split(b"/")
        for i in range(1, len(parts) + 1):
            sub = b"/" + b"/".join(parts[:i])
            if sub not in self.items:
                os.mkdir(self.root + sub)
                os.chmod(self.root + sub, 0o755)  # whatever the umask (CI runs under 0)
                self._add(sub, Item("dir", 0, None, None, 0o755, None))
        os.chmod(self.root + rel, mode)
        self.items[rel] = replace(self.items[rel], mode=mode)

    def file(self, rel: bytes, data: bytes, mode: int = 0o644) -> None:
        self.dir(rel.rsplit(b"/", 1)[0] or b"/", self._mode_of_parent(rel))
        with open(self.root + rel, "wb") as fh:
            fh.write(data)
        os.chmod(self.root + rel, mode)
        digest = hashlib.sha256(data).hexdigest()
        self._add(rel, Item("file", len(data), digest, None, mode, None))

    def _mode_of_parent(self, rel: bytes) -> int:
        parent = rel.rsplit(b"/", 1)[0]
        item = self.items.get(parent)
        return item.mode if item else 0o755

    def sparse(self, rel: bytes, size: int, chunks: list[tuple[int, bytes]]) -> None:
        digest = hashlib.sha256()
        pos = 0
        with open(self.root + rel, "wb") as fh:
            fh.truncate(size)
            for offset, data in chunks:
                fh.seek(offset)
                fh.write(data)
                _hash_zeros(digest, offset - pos)
                digest.update(data)
                pos = offset + len(data)
        _hash_zeros(digest, size - pos)
        os.chmod(self.root + rel, 0o644)
        self._add(rel, Item("file", size, digest.hexdigest(), None, 0o644, None))

    def link(self, rel: bytes, existing: bytes, group: int) -> None:
        os.link(self.root + existing, self.root + rel)
        self.items[existing] = replace(self.items[existing], inode_group=group)
        self.items[rel] = self.items[existing]  # no mtime of its own: shares the inode's
        self.links[rel] = existing

    def symlink(self, rel: bytes, target: bytes) -> None:
        os.symlink(target, self.root + rel)
        self._add(rel, Item("symlink", 0, None, target, 0o777, None))

    def fifo(self, rel: bytes) -> None:
        os.mkfifo(self.root + rel, 0o644)
        os.chmod(self.root + rel, 0o644)
        self._add(rel, Item("fifo", 0, None, None, 0o644, None))

    def finish(self) -> dict[bytes, Item]:
        """Sets the fixed mtimes (leaves first, so that no later change touches a parent)."""
        for i, rel in reversed(list(enumerate(self.order))):
            ns = MTIME_BASE_NS + i * MTIME_STEP_NS
            os.utime(self.root + rel, ns=(ns, ns), follow_symlinks=False)
            self.items[rel] = replace(self.items[rel], mtime_ns=ns)
        for rel, existing in self.links.items():
            self.items[rel] = self.items[existing]
        return dict(sorted(self.items.items()))


def _hash_zeros(digest: hashlib._Hash, count: int) -> None:
    block = bytes(MiB)
    while count > 0:
        digest.update(block[: min(count, MiB)])
        count -= MiB


def make_tree(
    root: Path, *, hostile: bool = True, many: int = 0, seed: int = 0
) -> dict[bytes, Item]:
    """Creates the source tree under ``root`` (which must be empty or absent) and returns
    ``{b"/rel/path": Item}`` for every entry below it (dirs included, root excluded)."""
    root.mkdir(parents=True, exist_ok=True)
    b = _Builder(root, seed)
    b.file(b"/etc/fstab", b"UUID=comb / ext4 defaults 0 1\n")
    b.file(b"/etc/nginx/nginx.conf", b"events {}\nhttp { server { listen 80; } }\n")
    b.dir(b"/home/ann", 0o750)
    b.dir(b"/home/ann/docs", 0o755)
    for size in (0, 1, 4095, 4096, 4097, MiB + 7):
        b.file(b"/home/ann/docs/f%d.bin" % size, b.rng.randbytes(size))
    b.file(b"/home/ann/docs/secret.txt", b"hunter2\n", 0o600)
    b.file(b"/usr/bin/suidtool", b"#!/bin/sh\necho suid\n", 0o4755)
    b.file(b"/usr/bin/script.sh", b"#!/bin/sh\necho hi\n", 0o755)
    b.dir(b"/var/lib")
    b.sparse(
        b"/var/lib/sparse.img",
        64 * MiB,
        [(0, b.rng.randbytes(4096)), (40 * MiB, b.rng.randbytes(MiB))],
    )
    b.file(b"/links/hard1", b"one inode, three names\n")
    b.link(b"/links/hard2", b"/links/hard1", 1)
    b.link(b"/links/hard3", b"/links/hard1", 1)
    b.symlink(b"/links/relative", b"../etc/fstab")
    b.symlink(b"/links/absolute", b"/etc/passwd")
    b.symlink(b"/links/dangling", b"no/such/target")
    b.symlink(b"/links/todir", b"../home/ann/docs")
    b.dir(b"/run")
    b.fifo(b"/run/fifo")
    deep = b"".join(b"/d%02d" % i for i in range(1, 31))
    b.file(b"/deep" + deep + b"/leaf.txt", b"deep leaf\n")
    # names longer than 8.3, so that FAT keeps them as long names, not upper-cased short ones
    unicode = [NFC_CAFE + b"-composed.txt", NFD_CAFE + b"-decomposed.txt"]
    for name in unicode + ["\u6587\u4ef6.txt".encode(), "\U0001f600.txt".encode()]:
        b.file(b"/unicode/" + name, name + b"\n")
    if hostile:
        for name in HOSTILE_NAMES:
            b.file(b"/hostile/" + name, b"hostile: " + name + b"\n")
    for i in range(many):
        b.file(b"/many/d%03d/f%06d" % (i % (many // 1000 + 1), i), b"%d\n" % i)
    return b.finish()


def walk(top: Path) -> dict[bytes, Item]:
    """Lists every entry below ``top`` with os.lstat/os.readlink/hashlib (no symlink followed)."""
    base = os.fsencode(top)
    items: dict[bytes, Item] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = path[len(base) :]
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                items[rel] = Item("dir", 0, None, None, mode, None)
            elif stat.S_ISLNK(st.st_mode):
                items[rel] = Item("symlink", 0, None, os.readlink(path), mode, None)
            elif stat.S_ISFIFO(st.st_mode):
                items[rel] = Item("fifo", 0, None, None, mode, None)
            else:
                items[rel] = Item("file", st.st_size, _sha256(path), None, mode, None)
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            items[rel] = replace(items[rel], mtime_ns=st.st_mtime_ns)
    return number_groups(items, inodes.values())


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def number_groups(items: dict[bytes, Item], groups: object) -> dict[bytes, Item]:
    """Hard-link groups numbered 1, 2, ... in the order of their first path (as make_tree)."""
    ordered = sorted(sorted(g) for g in groups if len(g) > 1)  # type: ignore[attr-defined]
    for number, group in enumerate(ordered, 1):
        for rel in group:
            items[rel] = replace(items[rel], inode_group=number)
    return dict(sorted(items.items()))


def _valid_utf8(name: bytes) -> bool:
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return True


def _windows_name(name: bytes) -> bool:
    """FAT and exFAT: valid UTF-8, no control or reserved character, no trailing dot/space."""
    if not _valid_utf8(name) or name.rstrip(b". ") != name:
        return False
    return not any(c < 0x20 or c in NOT_ON_WINDOWS_FS for c in name)


def _bmp(name: bytes) -> bool:
    """mtools writes a character beyond U+FFFF (an emoji) as a wrong one: vfat gets none."""
    return all(ord(c) <= 0xFFFF for c in name.decode())


# What the builders keep of a mtime (ns): mke2fs -d, btrfs --rootdir and exfat-fuse whole
# seconds, NTFS 100 ns, FAT 2 s (in local time: the tests run in UTC), xfs with cp -a all.
MTIME_RESOLUTION_NS = {
    "ext4": 10**9,
    "btrfs": 10**9,
    "exfat": 10**9,
    "ntfs": 100,
    "vfat": 2 * 10**9,
}


def truth_for(fstype: str, items: dict[bytes, Item]) -> dict[bytes, Item]:
    """What a filesystem built from a tree with ``items`` really holds (mtimes truncated to
    what it keeps, MTIME_RESOLUTION_NS).

    ext4, xfs, btrfs: everything. ntfs (ntfs-3g): no name with invalid UTF-8; modes are not
    stored (ntfs-3g shows 0o777). vfat, exfat: only files and dirs with Windows-valid names
    (vfat: and no character beyond U+FFFF), hard links become separate files, modes not
    stored (0o777 as the FUSE mounts show)."""
    res = MTIME_RESOLUTION_NS.get(fstype, 1)
    out: dict[bytes, Item] = {}
    for rel, item in items.items():
        names = rel.split(b"/")[1:]
        if fstype == "ntfs":
            if all(_valid_utf8(n) for n in names):
                out[rel] = replace(item, mode=0o777)
        elif fstype in ("vfat", "exfat"):
            if item.kind in ("file", "dir") and all(_windows_name(n) for n in names):
                if fstype == "exfat" or all(_bmp(n) for n in names):
                    out[rel] = replace(item, mode=0o777, inode_group=None)
        else:
            out[rel] = item
    return {k: replace(v, mtime_ns=v.mtime_ns - v.mtime_ns % res) for k, v in out.items()}


def make_xattr_tree(root: Path) -> None:
    """A small tree whose entries carry extended attributes (os.setxattr) and POSIX ACLs
    (setfacl; ``need_tool("setfacl")`` first): values in the inode and, too big for it, in ext's
    xattr block; an empty and a binary value; access and default ACLs (and a file that inherits
    one); a read-only file; trusted.* and security.* (as root only: on a file and on a link);
    a hard link."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    base = os.fsencode(root)

    def file(rel: bytes, data: bytes, **attrs: bytes) -> bytes:
        path = base + rel
        with open(path, "wb") as fh:
            fh.write(data)
        for name, value in attrs.items():
            os.setxattr(path, "user." + name, value)
        return path

    def acl(*args: str | bytes) -> None:
        subprocess.run(["setfacl", *args], check=True, capture_output=True)

    file(b"/plain", b"plain\n", color=b"blue", bin=b"\x00\xff\x01\n", empty=b"")
    file(b"/big-value", b"big\n", big=random.Random(1).randbytes(700), small=b"1")
    acl("-m", "u:1234:rw-,g:55:r--", file(b"/acl-file", b"acl\n"))
    os.mkdir(base + b"/shared", 0o755)
    acl("-m", "u:1234:rwx", base + b"/shared")
    acl("-d", "-m", "u:1234:rwx,g:55:r-x", base + b"/shared")
    file(b"/shared/inherits", b"inherits\n", inner=b"x")
    os.chmod(file(b"/readonly", b"ro\n", ro=b"1"), 0o444)
    os.link(base + b"/plain", base + b"/hard")
    os.symlink(b"plain", base + b"/link")
    if os.geteuid() == 0:
        only = file(b"/root-only", b"root\n")
        os.setxattr(only, b"trusted.comb", b"t")
        os.setxattr(only, b"security.comb", b"s")
        os.setxattr(base + b"/link", b"trusted.link", b"l", follow_symlinks=False)


def xattrs_below(
    top: Path, skip: tuple[bytes, ...] = (b"/lost+found",)
) -> dict[bytes, dict[str, bytes]]:
    """``{b"/rel": {name: value}}`` of every entry below ``top`` (links not followed), as the
    kernel lists them (ACLs in the VFS format)."""
    base = os.fsencode(top)
    out: dict[bytes, dict[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = path[len(base) :]
            if rel.startswith(skip):
                continue
            names = os.listxattr(path, follow_symlinks=False)
            out[rel] = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    return out


# (path, S_IFCHR or S_IFBLK, mode, major, minor): 1:3 and 7:200 in ext's old encoding,
# 259:70000 and 4000:1048575 in its new one (XFS holds at most major 16383, minor 262143).
DEVICES = [
    (b"/null", stat.S_IFCHR, 0o666, 1, 3),
    (b"/nodes/loop200", stat.S_IFBLK, 0o660, 7, 200),
    (b"/nodes/nvme", stat.S_IFBLK, 0o640, 259, 70000),
    (b"/nodes/wide", stat.S_IFCHR, 0o600, 4000, 1048575),
]


def make_device_tree(root: Path, xfs: bool = False, sock: bool = True) -> None:
    """A tree of character and block device nodes (``DEVICES``: root only, os.mknod), a FIFO,
    a socket (unless not ``sock``), a regular file and a hard link to a device, times fixed;
    ``xfs``: without the number XFS cannot hold."""
    import socket

    base = os.fsencode(root)
    os.makedirs(base + b"/nodes", exist_ok=True)
    for i, (rel, kind, mode, major, minor) in enumerate(DEVICES):
        if xfs and minor > 0x3FFFF:
            continue
        os.mknod(base + rel, kind | mode, os.makedev(major, minor))
        os.chmod(base + rel, mode)
        os.chown(base + rel, 1000 + i, 2000 + i)
    os.link(base + b"/nodes/loop200", base + b"/nodes/loop200-again")
    os.mkfifo(base + b"/fifo", 0o640)
    with open(base + b"/plain", "wb") as fh:
        fh.write(b"plain\n")
    if sock:
        with socket.socket(socket.AF_UNIX) as unix:
            unix.bind(base + b"/sock")
    for i, (dirpath, names, files) in enumerate(os.walk(base)):
        for name in names + files:
            at = MTIME_BASE_NS + i * MTIME_STEP_NS + len(name)
            os.utime(os.path.join(dirpath, name), ns=(at, at), follow_symlinks=False)


def special_below(top: Path) -> dict[bytes, tuple[int, int, int, int, int, int, int]]:
    """``{b"/rel": (S_IFMT, mode, major, minor, uid, gid, mtime)}`` of every device node and
    FIFO below ``top`` (majors and minors 0 for a FIFO; mtime in whole seconds: mkfs.ext4 -d
    keeps no nanoseconds)."""
    base = os.fsencode(top)
    out = {}
    for dirpath, _, files in os.walk(base):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                fmt, mode = stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)
                out[path[len(base) :]] = (fmt, mode, *dev, st.st_uid, st.st_gid, int(st.st_mtime))
    return out
