"""A point's filesystems as listing tables, whole or by what changed: what a file catalog is
made of (``pipeline.jobs.index``).

A listing row is an entry below its volume: ``volume``, ``path`` (bytes, from ``/``),
``path_text`` (as shown), the entry's metadata, and for a directory ``deps_spans``: where on
the volume its listing came from (offset, length, ... pairs; null: unknown). The volume's own
root is a row too (``/``).

``relist`` makes the listing of a point from its parent's and the parent's dirs' ``deps``:
only directories whose listing depends on a changed chunk are listed again, and only new
subdirectories are walked. Its result equals a full walk's (tests check it row for row).

Owns the listing's shape and the incremental re-listing. Must not: store anything, or know
the catalog's format (``catalog.store.filecat``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from catalog.errors import FileSystemError

from .entries import Entry, display, entries_from
from .view import READABLE, Node, PointFiles
from .volumes import Volume

_METADATA = ["kind", "inode", "size", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "nlink"]
_METADATA += ["target"]


def _rows(volume: Volume, entries: list[tuple[bytes, Entry, list[int] | None]]) -> pa.Table:
    cols: dict[str, list[object]] = {name: [] for name in _METADATA}
    paths, deps = [], []
    for path, entry, spans in entries:
        paths.append(path)
        deps.append(spans if entry.is_dir else None)
        for name in _METADATA:
            cols[name].append(getattr(entry, name))
    table = pa.table(
        {
            "volume": pa.array([volume.name] * len(paths), pa.string()),
            "path": pa.array(paths, pa.binary()),
            "path_text": pa.array([display(p) for p in paths], pa.string()),
            **{k: pa.array(v) for k, v in cols.items()},
            "deps_spans": pa.array(deps, pa.list_(pa.int64())),
        }
    )
    return table


def subtree(files: PointFiles, top: Node) -> pa.Table:
    """``top`` (its path below the volume) and everything under it, with each directory's
    ``deps_spans``."""
    volume = top.volume
    assert volume is not None
    base = len(b"/" + volume.name.encode())
    found: list[tuple[bytes, Entry]] = [(top.path[base:] or b"/", top.entry)]
    deps: dict[int, list[int] | None] = {}
    for table, paths, more in files.walk_tables(top):
        deps.update(more)  # a directory's deps may come in a later batch than its row
        found += [(p[base:], e) for p, e in zip(paths, entries_from(table), strict=True)]
    return _rows(volume, [(p, e, deps.get(e.inode)) for p, e in found])


def volume_listings(
    files: PointFiles,
) -> Iterator[tuple[Volume, pa.Table | None, str | None]]:
    """Every volume with its listing (``subtree`` of its root); None and a one-line error when
    it cannot be read; None and None when it is not a filesystem comb reads."""
    for volume in files.volumes():
        if volume.fstype not in READABLE:
            yield volume, None, None
            continue
        try:
            table = subtree(files, files.volume_node(volume))
        except FileSystemError as err:
            yield volume, None, str(err)
            continue
        yield volume, table, None


def relist(
    files: PointFiles,
    volume: Volume,
    before: pa.Table,
    stale: Callable[[list[int] | None], bool],
) -> pa.Table:
    """The volume's listing now, from its listing ``before`` (rows of this volume, with
    ``deps_spans``): each directory whose deps are ``stale`` (changed or unknown) is listed
    again, parents first; what it gained as a subdirectory is walked whole, what it lost is
    removed with everything under it. Everything else is kept as it was."""
    tree = _Tree(before.to_pylist())
    dirs = [p for p, r in tree.rows.items() if r["kind"] == "dir" and stale(r["deps_spans"])]
    for path in sorted(dirs, key=lambda p: (p.count(b"/"), p)):
        row = tree.rows.get(path)
        if row is None or row["kind"] != "dir":
            continue  # removed with its parent meanwhile
        entries, deps = files.list_inode(volume, int(row["inode"]))
        row["deps_spans"] = deps
        prefix = b"/" if path == b"/" else path + b"/"
        kept = set()
        for entry in entries:
            child = prefix + entry.name
            kept.add(child)
            was = tree.rows.get(child)
            if was is not None and (was["kind"], was["inode"]) != (entry.kind, entry.inode):
                tree.drop(child)
                was = None
            if was is None and entry.is_dir:
                node = Node(b"/" + volume.name.encode() + child, volume, entry)
                for new in subtree(files, node).to_pylist():
                    tree.add(new)
                continue
            spans = was["deps_spans"] if was is not None else None
            tree.add(_rows(volume, [(child, entry, spans)]).to_pylist()[0])
        for child in tree.children(path) - kept:
            tree.drop(child)
    return pa.Table.from_pylist(list(tree.rows.values()), schema=before.schema)


class _Tree:
    """Listing rows by path, with each directory's children."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows: dict[bytes, dict[str, Any]] = {}
        self.kids: dict[bytes, set[bytes]] = {}
        for row in rows:
            self.add(row)

    @staticmethod
    def parent(path: bytes) -> bytes:
        return path.rsplit(b"/", 1)[0] or b"/"

    def add(self, row: dict[str, Any]) -> None:
        path = row["path"]
        assert isinstance(path, bytes)
        self.rows[path] = row
        if path != b"/":
            self.kids.setdefault(self.parent(path), set()).add(path)

    def children(self, path: bytes) -> set[bytes]:
        return set(self.kids.get(path, ()))

    def drop(self, path: bytes) -> None:
        """An entry and, for a directory, everything under it."""
        for child in self.kids.pop(path, set()):
            self.drop(child)
        self.rows.pop(path, None)
        self.kids.get(self.parent(path), set()).discard(path)
