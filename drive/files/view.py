"""The files of a recovery point as one tree: ``/`` holds the volumes (``part1``, ``disk``,
...), each volume's directory holds its filesystem.

``PointFiles(source)`` finds the volumes (``drive.files.volumes``), reads filesystems through
the sandboxed worker (``drive.files.sandbox``) and resolves byte paths by listing directories
(a name that is not UTF-8 is reached like any other). A file's data is read straight from the
point where the filesystem says it lies on the disk, and through the worker only when it is
not plainly there (resident, compressed).

Owns path resolution, the listing cache and where a file's bytes are read from. Must not: parse
a filesystem in this process, or follow a symbolic link (the caller decides what a link means).
"""

from __future__ import annotations

import json
import queue
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from catalog.errors import FileSystemError, PathNotFound
from catalog.read.source import BlockSource

from . import devices
from .entries import (
    Answer,
    Ask,
    Entry,
    answers_from_json,
    checked_spans,
    display,
    entries_from,
    entries_from_json,
    walk_paths,
)
from .sandbox import DEFAULT_MEMORY, DEFAULT_TIMEOUT, Worker
from .volumes import Volume, find_volumes

READABLE = ("ext2", "ext3", "ext4", "xfs", "ntfs", "fat12", "fat16", "fat32", "exfat")
PIECE = 8 << 20
LISTING_CACHE = 1024
LIST_BATCH = 256  # directories per ``lists`` request, and at most
LIST_ENTRIES = 100_000  # entries known of them (but one directory)
WALKERS = 2  # walk workers kept between walks (``listing.walk_whole`` runs this many at once)


@dataclass(frozen=True)
class Node:
    """A path inside the point: its volume (None for ``/``) and its entry."""

    path: bytes
    volume: Volume | None
    entry: Entry


def split(path: bytes | str) -> list[bytes]:
    """A path's components; ``..`` goes up (never above ``/``), empty and ``.`` are dropped."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    parts: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return parts


def describe(volume: Volume) -> str:
    kind = volume.fstype or volume.note or "unknown"
    return f"volume {volume.name} ({kind} at offset {volume.offset})"


class PointFiles:
    """A point's volumes and filesystems, read-only."""

    def __init__(
        self,
        source: BlockSource,
        memory: int = DEFAULT_MEMORY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.source = source
        self.worker = Worker(source, memory, timeout)
        self._walkers: queue.SimpleQueue[Worker] = queue.SimpleQueue()  # idle, between walks
        self._volumes: list[Volume] | None = None
        self._roots: dict[str, int] = {}
        self.skipped: list[str] = []  # what walks could not list, one line each
        self._runs: OrderedDict[tuple[str, int], list[tuple[int, int, int]] | None] = OrderedDict()
        self._listings: OrderedDict[tuple[str, int], list[Entry]] = OrderedDict()

    def __enter__(self) -> PointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.worker.close()
        while not self._walkers.empty():
            self._walkers.get_nowait().close()

    def volumes(self) -> list[Volume]:
        if self._volumes is None:
            self._volumes = find_volumes(self.source)
        return self._volumes

    def root(self) -> Node:
        return Node(b"/", None, Entry(name=b"/", kind="dir", inode=0, nlink=2, mode=0o555))

    def volume_node(self, volume: Volume) -> Node:
        name = volume.name.encode().rsplit(b"/", 1)[-1]  # "lvm/VG/LV": LV in /lvm/VG
        entry = Entry(name=name, kind="dir", inode=0, size=0, mode=0o555)
        if volume.fstype in READABLE:
            entry = Entry(name=entry.name, kind="dir", inode=self._root_inode(volume), mode=0o555)
        return Node(b"/" + volume.name.encode(), volume, entry)

    def _root_inode(self, volume: Volume) -> int:
        if volume.name not in self._roots:
            ok, _ = self.worker.request(self._header("open", volume), describe(volume))
            self._roots[volume.name] = int(ok["root"])
        return self._roots[volume.name]

    def _header(self, op: str, volume: Volume, **more: object) -> dict[str, object]:
        return {"op": op, "volume": [volume.offset, volume.size], "fstype": volume.fstype, **more}

    def _readable(self, volume: Volume) -> None:
        if volume.fstype in READABLE:
            return
        if volume.note and "encrypted" in volume.note:
            why = f"{volume.note}: comb cannot read an encrypted volume"
        elif volume.fstype:
            why = f"comb cannot read {volume.fstype} filesystems yet"
        else:
            why = f"no filesystem comb can read ({volume.note or 'unknown'})"
        raise FileSystemError(f"{describe(volume)}: {why}")

    def listdir(self, node: Node) -> list[Node]:
        """A directory's entries as nodes (``/``: the volumes)."""
        if node.volume is None:
            return [self._node_in(node.path, k, v) for k, v in self._volume_dir(node.path).items()]
        if not node.entry.is_dir:
            raise PathNotFound(f"{display(node.path)}: not a directory")
        self._readable(node.volume)
        base = node.path.rstrip(b"/")
        return [
            Node(base + b"/" + e.name, node.volume, e)
            for e in self._list(node.volume, node.entry.inode)
            if self._fit(base, e.name)
        ]

    def _volume_dir(self, path: bytes) -> dict[bytes, Volume | None]:
        """What ``/`` or a directory of volume names (``/lvm``, ``/lvm/VG``) holds: name ->
        its volume, or None for a directory of longer names ("lvm/VG/LV")."""
        prefix = path.strip(b"/") + b"/" if path.strip(b"/") else b""
        found: dict[bytes, Volume | None] = {}
        for volume in self.volumes():
            name = volume.name.encode()
            head, more, _ = name.removeprefix(prefix).partition(b"/")
            if name.startswith(prefix) and head not in found:
                found[head] = None if more else volume
        return found

    def _node_in(self, path: bytes, name: bytes, volume: Volume | None) -> Node:
        if volume is not None:
            return self.volume_node(volume)
        entry = Entry(name=name, kind="dir", inode=0, nlink=2, mode=0o555)
        return Node(path.rstrip(b"/") + b"/" + name, None, entry)

    def _fit(self, base: bytes, name: bytes) -> bool:
        """Can the name be a path component? A damaged or hostile filesystem can hold names
        with ``/`` or NUL in them, or ``.`` and ``..`` as entries of their own: left out, said."""
        if b"/" in name or b"\0" in name or name in (b".", b".."):
            said = f"{display(base or b'/')}: left out an entry named {display(name)!r}"
            self.skipped.append(said)
            return False
        return True

    def list_inodes(
        self, volume: Volume, asks: list[Ask], paths: Sequence[bytes] = ()
    ) -> list[Answer]:
        """Directories' entries by inode (names that cannot be paths left out, said with their
        directory's ``paths``), their deps and whether that is all of them (or why a directory
        cannot be read), in batches, never cached; maybe only changed entries (``Ask``)."""
        out: list[Answer] = []
        while len(out) < len(asks):
            part: list[list[object]] = []
            known = 0
            for ask in asks[len(out) : len(out) + LIST_BATCH]:
                if part and known + len(ask[1] or ()) > LIST_ENTRIES:
                    break
                part.append(list(ask))
                known += len(ask[1] or ())
            header = self._header("lists", volume)
            _, payload = self.worker.request(header, describe(volume), json.dumps(part).encode())
            try:
                for entries, deps, whole in answers_from_json(payload, len(part), volume.size):
                    if whole is True:
                        base = paths[len(out)] if paths else b""
                        entries = [e for e in entries if self._fit(base, e.name)]
                    out.append((entries, deps, whole))
            except ValueError as err:
                raise _bad_listing(volume, err) from None
        return out

    def _request_list(self, volume: Volume, inode: int) -> list[Entry]:
        _, payload = self.worker.request(
            self._header("list", volume, inode=inode), describe(volume)
        )
        try:
            return entries_from_json(payload)
        except ValueError as err:
            raise _bad_listing(volume, err) from None

    def _list(self, volume: Volume, inode: int) -> list[Entry]:
        key = (volume.name, inode)
        cached = self._listings.get(key)
        if cached is not None:
            self._listings.move_to_end(key)
            return cached
        entries = self._request_list(volume, inode)
        self._listings[key] = entries
        while len(self._listings) > LISTING_CACHE:
            self._listings.popitem(last=False)
        return entries

    def lookup(self, path: bytes | str) -> Node:
        """The node at ``path`` (not following symbolic links); a missing path raises
        ``PathNotFound`` naming the first component that is not there."""
        node = self.root()
        for part in split(path):
            if node.volume is None:
                here = self._volume_dir(node.path)
                if part not in here:
                    names = ", ".join(v.name for v in self.volumes())
                    where = display(node.path.rstrip(b"/") + b"/" + part)
                    raise PathNotFound(f"{where}: no such volume in this point (it has {names})")
                node = self._node_in(node.path, part, here[part])
                continue
            if node.entry.kind == "symlink":
                raise PathNotFound(f"{display(node.path)}: a symbolic link (comb does not follow)")
            match = [n for n in self.listdir(node) if n.entry.name == part]
            if not match:
                raise PathNotFound(f"{display(node.path.rstrip(b'/') + b'/' + part)}: not found")
            node = match[0]
        return node

    def walk(self, node: Node) -> Iterator[Node]:
        """Every node under a directory (not the directory itself), parents before children."""
        if node.volume is None:
            for volume_node in self.listdir(node):
                if volume_node.volume is None:  # /lvm, /lvm/VG
                    yield volume_node
                    yield from self.walk(volume_node)
                elif volume_node.volume.fstype in READABLE:
                    yield volume_node
                    yield from self.walk(volume_node)
            return
        self._readable(node.volume)
        for table, paths, _ in self.walk_tables(node):
            for path, entry in zip(paths.to_pylist(), entries_from(table), strict=True):
                yield Node(path, node.volume, entry)

    def walk_tables(
        self, node: Node, batch_rows: int | None = None, top: bytes | None = None
    ) -> Iterator[tuple[pa.Table, pa.BinaryArray, dict[int, list[int] | None]]]:
        """A walk's batches (``entries.SCHEMA``), each kept row's path (from ``top``, by default
        the node's full path), and where each directory's listing came from (worker ``deps``);
        an entry whose name cannot be a path component is left out (and said). Paths are made
        in Arrow: only the folders are handled one by one."""
        assert node.volume is not None
        paths = {node.entry.inode: (node.path if top is None else top).rstrip(b"/")}
        header = self._header("walk", node.volume, inode=node.entry.inode)
        if batch_rows:
            header["batch_rows"] = batch_rows  # (tests: many small batches)
        # A worker of its own (walks may run at once, and files be read meanwhile), kept after.
        try:
            walker = self._walkers.get_nowait()
        except queue.Empty:
            walker = Worker(self.source, self.worker.memory, self.worker.timeout)
        try:
            for table, deps in walker.stream(header, describe(node.volume)):
                kept, found, bad = walk_paths(table, paths)
                for base, name in bad:
                    self._fit(base, name)  # says what was left out
                try:
                    spans = {int(d[0]): checked_spans(d[1], node.volume.size) for d in deps}
                except (ValueError, TypeError, IndexError) as err:
                    raise _bad_listing(node.volume, err) from None
                yield kept, found, spans
        finally:
            self.skipped.extend(walker.skipped)
            walker.skipped.clear()
            if self._walkers.qsize() < WALKERS:
                self._walkers.put(walker)
            else:
                walker.close()

    def data(
        self, node: Node, piece: int = PIECE, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """A regular file's data in [start, end) as (offset, bytes) pieces in order; the gaps
        between pieces (holes) read as zeros."""
        volume, entry = node.volume, node.entry
        if volume is None or entry.kind != "file":
            raise PathNotFound(f"{display(node.path)}: not a regular file")
        end = entry.size if end is None else min(end, entry.size)
        runs = self._file_runs(node, volume, entry)
        if runs is None:
            yield from self._data_through_worker(volume, entry, piece, start, end)
            return
        for first, length, where in runs:
            pos, stop = max(first, start), min(first + length, end)
            while pos < stop:
                n = min(piece, stop - pos)
                buf = bytearray(n)
                self.source.read_into(memoryview(buf), volume.offset + where + pos - first)
                yield pos, bytes(buf)
                pos += n

    def read_at(self, node: Node, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a regular file, short past its end."""
        end = min(offset + length, node.entry.size)
        out = bytearray(max(0, end - offset))
        for at, data in self.data(node, start=offset, end=end):
            out[at - offset : at - offset + len(data)] = data
        return bytes(out)

    def xattrs(self, node: Node) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """A node's extended attributes and POSIX ACLs as Linux names and values (ACLs in the
        VFS format: ``drive.files.xattrs``), and one line for each the worker could not read;
        none for NTFS, FAT and exFAT (their security descriptors and EAs are not POSIX xattrs)."""
        volume = node.volume
        if volume is None or node.entry.inode == 0:
            return [], []
        self._readable(volume)
        what = describe(volume)
        header = self._header("xattrs", volume, inode=node.entry.inode)
        ok, payload = self.worker.request(header, what)
        sizes, problems = ok.get("sizes"), ok.get("problems")
        found: list[tuple[bytes, bytes]] = []
        at = 0
        for size in sizes if isinstance(sizes, list) and isinstance(problems, list) else [None]:
            if not (
                isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)
            ):
                raise FileSystemError(f"{what}: the filesystem reader's xattrs are not valid")
            name, value = payload[at : at + size[0]], payload[at + size[0] : at + sum(size)]
            if not 0 < len(name) == size[0] <= 255 or b"\0" in name or len(value) != size[1]:
                raise FileSystemError(f"{what}: the filesystem reader's xattrs are not valid")
            found.append((name, value))
            at += sum(size)
        if at != len(payload):
            raise FileSystemError(f"{what}: the filesystem reader's xattrs are not valid")
        return found, [" ".join(str(p).split())[:300] for p in problems or []]

    def device(self, node: Node) -> tuple[int, int]:
        """A character or block device's number (major, minor), read by the worker."""
        volume, entry = node.volume, node.entry
        if volume is None or entry.kind not in ("chardev", "blockdev"):
            raise PathNotFound(f"{display(node.path)}: not a device file")
        self._readable(volume)
        header = self._header("device", volume, inode=entry.inode)
        return devices.answer(self.worker.request(header, describe(volume))[0], describe(volume))

    def _file_runs(
        self, node: Node, volume: Volume, entry: Entry
    ) -> list[tuple[int, int, int]] | None:
        """Where a file's data lies on the volume (checked against it), kept for a few files."""
        key = (volume.name, entry.inode)
        if key in self._runs:
            self._runs.move_to_end(key)
            return self._runs[key]
        what = describe(volume)
        ok, _ = self.worker.request(self._header("runs", volume, inode=entry.inode), what)
        runs = None if ok["runs"] is None else _merged(ok["runs"])
        for _, length, where in runs or []:
            if where < 0 or where + length > volume.size:
                raise FileSystemError(
                    f"{what}: {display(node.path)} has data outside the volume (damaged)"
                )
        self._runs[key] = runs
        while len(self._runs) > LISTING_CACHE:
            self._runs.popitem(last=False)
        return runs

    def _data_through_worker(
        self, volume: Volume, entry: Entry, piece: int, start: int, end: int
    ) -> Iterator[tuple[int, bytes]]:
        offset = start
        while offset < end:
            n = min(piece, end - offset)
            header = self._header("read", volume, inode=entry.inode, offset=offset, length=n)
            _, data = self.worker.request(header, describe(volume))
            if not data:
                raise FileSystemError(
                    f"{describe(volume)}: inode {entry.inode} ends at {offset} of {entry.size}"
                )
            yield offset, data
            offset += len(data)


def _merged(runs: list[list[int]]) -> list[tuple[int, int, int]]:
    """Runs that continue each other both in the file and on the disk, as one."""
    out: list[tuple[int, int, int]] = []
    for start, length, where in runs:
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] + out[-1][1] == where:
            out[-1] = (out[-1][0], out[-1][1] + length, out[-1][2])
        else:
            out.append((int(start), int(length), int(where)))
    return out


def _bad_listing(volume: Volume, err: Exception) -> FileSystemError:
    return FileSystemError(f"{describe(volume)}: the filesystem reader sent a bad listing ({err})")
