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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def _row(volume: Volume, path: bytes, entry: Entry, spans: list[int] | None) -> dict[str, Any]:
    """One listing row as ``_rows`` makes it, as a dict (``relist`` works on dicts)."""
    row: dict[str, Any] = {"volume": volume.name, "path": path, "path_text": display(path)}
    row.update((name, getattr(entry, name)) for name in _METADATA)
    row["deps_spans"] = spans if entry.is_dir else None
    return row


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
    """The volume's listing now, from its listing ``before`` (rows of this volume sorted by
    path, with ``deps_spans``): each directory whose deps are ``stale`` (changed or unknown) is
    listed again, parents first; what it gained as a subdirectory is walked whole, what it lost
    is removed with everything under it. Everything else is kept as it was: only the rows of
    the folders listed again are handled one by one, the rest stays in Arrow."""
    paths = before.column("path").to_pylist()
    index = {p: i for i, p in enumerate(paths)}
    dirs = pc.indices_nonzero(pc.equal(before.column("kind"), "dir")).to_pylist()
    spans = before.column("deps_spans")
    redo = sorted(
        (paths[i] for i in dirs if stale(spans[i].as_py())), key=lambda p: (p.count(b"/"), p)
    )
    if not redo:
        return before
    wanted = set(redo)
    kids: dict[bytes, list[int]] = {}
    for i, p in enumerate(paths):
        parent = p.rsplit(b"/", 1)[0] or b"/"
        if parent in wanted and p != b"/":
            kids.setdefault(parent, []).append(i)
    sorted_paths = np.array(paths, dtype=object)
    gone: set[bytes] = set()  # paths removed, with everything under them
    rows: dict[bytes, dict[str, Any]] = {}  # rows replaced or added
    extra: list[pa.Table] = []  # new subtrees
    for path in redo:
        if _under(path, gone) or (path not in rows and path not in index):
            continue
        row = rows.get(path) or before.slice(index[path], 1).to_pylist()[0]
        entries, deps = files.list_inode(volume, int(row["inode"]))
        rows[path] = {**row, "deps_spans": deps}
        prefix = b"/" if path == b"/" else path + b"/"
        old = {paths[i][len(prefix) :]: i for i in kids.get(path, [])}
        for entry in entries:
            child = prefix + entry.name
            was = old.pop(entry.name, None)
            if was is not None:
                w = before.slice(was, 1).to_pylist()[0]
                if (w["kind"], w["inode"]) == (entry.kind, entry.inode):
                    rows[child] = _row(volume, child, entry, w["deps_spans"])
                    continue
                gone.add(child)  # replaced by another entry of the same name
            if entry.is_dir:
                node = Node(b"/" + volume.name.encode() + child, volume, entry)
                extra.append(subtree(files, node))
            else:
                rows[child] = _row(volume, child, entry, None)
        gone.update(prefix + name for name in old)
    keep = np.ones(len(paths), dtype=bool)
    for path in gone:
        keep[index[path]] = False
        lo, hi = np.searchsorted(sorted_paths, [path + b"/", path + b"0"]).tolist()
        keep[lo:hi] = False
    for path in rows:
        if path in index:
            keep[index[path]] = False
    kept = before.filter(pa.array(keep))
    parts = [kept, pa.Table.from_pylist(list(rows.values()), schema=before.schema)]
    parts += [t.select(before.schema.names).cast(before.schema) for t in extra]
    result = pa.concat_tables(parts)
    return result.sort_by([("path", "ascending")])


def _under(path: bytes, gone: set[bytes]) -> bool:
    """Is ``path`` (or a folder above it) among ``gone``?"""
    while path not in (b"", b"/"):
        if path in gone:
            return True
        path = path.rsplit(b"/", 1)[0]
    return False
