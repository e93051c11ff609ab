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

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.store import sorted_rows

from .entries import SCHEMA, Entry, display
from .view import Node, PointFiles
from .volumes import Volume

_METADATA = ["kind", "inode", "size", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "nlink"]
_METADATA += ["target"]


# Paths shown as they are (printable ASCII, no backslash): every other path goes through
# ``display`` one by one.
_PLAIN = r"^[\x20-\x5b\x5d-\x7e]*$"


def _texts(paths: pa.Array) -> pa.Array:
    """``display`` of every path, in Arrow where the path needs no escape."""
    plain = pc.match_substring_regex(paths, _PLAIN)
    if pc.all(plain).as_py() is not False:
        return paths.cast(pa.string())
    texts = [display(p) for p in paths.to_pylist()]
    return pa.array(texts, pa.string())


def _columns(volume: Volume, entries: pa.Table, paths: pa.Array, deps: dict) -> pa.Table:
    """Listing rows from walk rows (``entries.SCHEMA``) and their paths below the volume."""
    dirs = pc.indices_nonzero(pc.equal(entries.column("kind"), "dir"))
    spans: list[list[int] | None] = [None] * entries.num_rows
    inodes = entries.column("inode").take(dirs).to_pylist()
    for i, inode in zip(dirs.to_pylist(), inodes, strict=True):
        spans[i] = deps.get(inode)
    return pa.table(
        {
            "volume": pa.array([volume.name] * entries.num_rows, pa.string()),
            "path": paths,
            "path_text": _texts(paths),
            **{name: entries.column(name) for name in _METADATA},
            "deps_spans": pa.array(spans, pa.list_(pa.int64())),
        }
    )


def _row(volume: Volume, path: bytes, entry: Entry, spans: list[int] | None) -> dict[str, Any]:
    """One listing row as ``_columns`` makes it, as a dict (``relist`` works on dicts)."""
    row: dict[str, Any] = {"volume": volume.name, "path": path, "path_text": display(path)}
    row.update((name, getattr(entry, name)) for name in _METADATA)
    row["deps_spans"] = spans if entry.is_dir else None
    return row


def subtree(files: PointFiles, top: Node) -> pa.Table:
    """``top`` (its path below the volume) and everything under it, with each directory's
    ``deps_spans``."""
    volume = top.volume
    assert volume is not None
    path = top.path[len(b"/" + volume.name.encode()) :] or b"/"
    first = pa.Table.from_pylist([{"parent": 0, **top.entry._asdict()}], schema=SCHEMA)
    tables, paths = [first], [pa.array([path], pa.binary())]
    deps: dict[int, list[int] | None] = {}
    for table, found, more in files.walk_tables(top, top=path):
        deps.update(more)  # a directory's deps may come in a later batch than its row
        tables.append(table)
        paths.append(found)
    entries = pa.concat_tables(tables)
    return _columns(volume, entries, pa.concat_arrays(paths), deps)


class Relisted(NamedTuple):
    """A volume's listing made again from its parent's: the rows, and the paths whose rows
    were removed, replaced or added."""

    table: pa.Table
    touched: pa.Array  # paths below the volume
    folders: int  # listed again


def relist(
    files: PointFiles,
    volume: Volume,
    before: pa.Table,
    changed: Callable[[list[int] | None], list[int] | None],
) -> Relisted:
    """The volume's listing now, from its listing ``before`` (rows of this volume sorted by
    path, with ``deps_spans``) and ``changed``: which of a folder's ``deps_spans`` changed
    (volume offsets and lengths; None when its deps are unknown). Each folder with a change is
    read again, parents first: when its own blocks did not change, only its entries whose
    records did (the worker tells); else it is listed again, what it gained as a subdirectory
    is walked whole and what it lost is removed with everything under it. Everything else is
    kept as it was: only the folders' rows and the rows read again are handled one by one; the
    rest is found by binary search in the sorted paths and stays in Arrow."""
    before = before.combine_chunks()  # (a take from many chunks joins them first, each time)
    paths = before.column("path").to_numpy(zero_copy_only=False)  # sorted
    dirs = pc.indices_nonzero(pc.equal(before.column("kind"), "dir")).to_pylist()
    spans = before.column("deps_spans").take(pa.array(dirs, pa.int64())).to_pylist()
    hints = {paths[i]: c for i, d in zip(dirs, spans, strict=True) if (c := changed(d)) != []}
    redo = sorted(hints, key=lambda p: (p.count(b"/"), p))
    if not redo:
        return Relisted(before, pa.array([], pa.binary()), 0)
    depth = pc.count_substring(before.column("path"), "/").to_numpy()

    def at(path: bytes) -> int | None:
        i = int(np.searchsorted(paths, path))
        return i if i < len(paths) and paths[i] == path else None

    def below(path: bytes) -> tuple[int, int]:  # the rows under a folder
        if path == b"/":
            return 1, len(paths)
        lo, hi = np.searchsorted(paths, [path + b"/", path + b"0"]).tolist()
        return int(lo), int(hi)

    gone: set[bytes] = set()  # paths removed, with everything under them
    rows: dict[bytes, dict[str, Any]] = {}  # rows replaced or added
    extra: list[pa.Table] = []  # new subtrees
    for path in redo:
        i = at(path)
        if _under(path, gone) or (path not in rows and i is None):
            continue
        row = rows.get(path) or before.slice(i, 1).to_pylist()[0]
        prefix = b"/" if path == b"/" else path + b"/"
        lo, hi = below(path)
        kids = lo + np.nonzero(depth[lo:hi] == (1 if path == b"/" else path.count(b"/") + 1))[0]
        was_rows = before.select(["kind", "inode", "deps_spans"]).take(pa.array(kids, pa.int64()))
        was = dict(zip((paths[k][len(prefix) :] for k in kids), zip(*(
            c.to_pylist() for c in was_rows.columns), strict=True), strict=True))  # fmt: skip
        hint = hints[path]  # (None: the folder's deps are unknown)
        known = was_rows.column("inode").to_pylist() if hint else None
        entries, deps, whole = files.list_inode(volume, int(row["inode"]), known or None, hint)
        rows[path] = {**row, "deps_spans": deps}
        if not whole and _restat(volume, prefix, was, entries, rows):
            continue
        if not whole:  # an entry changed kind under the same name and number: list it again
            entries, deps, _ = files.list_inode(volume, int(row["inode"]))
            rows[path] = {**row, "deps_spans": deps}
        for entry in entries:
            child = prefix + entry.name
            w = was.pop(entry.name, None)
            if w is not None:
                if (w[0], w[1]) == (entry.kind, entry.inode):
                    rows[child] = _row(volume, child, entry, w[2])
                    continue
                gone.add(child)  # replaced by another entry of the same name
            if entry.is_dir:
                node = Node(b"/" + volume.name.encode() + child, volume, entry)
                extra.append(subtree(files, node))
            else:
                rows[child] = _row(volume, child, entry, None)
        gone.update(prefix + name for name in was)
    keep = np.ones(len(paths), dtype=bool)
    for path in gone:
        i = at(path)
        if i is not None:
            keep[i] = False
        lo, hi = below(path)
        keep[lo:hi] = False
    for path in rows:
        i = at(path)
        if i is not None:
            keep[i] = False
    parts = [pa.Table.from_pylist(list(rows.values()), schema=before.schema)]
    parts += [t.select(before.schema.names).cast(before.schema) for t in extra]
    result = sorted_rows.merge(before, pa.concat_tables(parts), ["path"], paths, keep)
    touched = [pa.array(paths[~keep], pa.binary()), pa.array(list(rows), pa.binary())]
    touched += [t.column("path").combine_chunks() for t in extra]
    return Relisted(result, pa.concat_arrays(touched), len(redo))


def _restat(
    volume: Volume,
    prefix: bytes,
    was: dict[bytes, tuple[str, int, list[int] | None]],
    fresh: list[Entry],
    rows: dict[bytes, dict[str, Any]],
) -> bool:
    """The rows of a folder's entries read again by number (``fresh``, names empty) under their
    names (``was``: name → kind, inode, deps as listed before); False, and nothing done, when
    one changed kind."""
    by_inode = {e.inode: e for e in fresh}
    found = [(name, w, by_inode[w[1]]) for name, w in was.items() if w[1] in by_inode]
    if any(e.kind != w[0] for _, w, e in found):
        return False
    for name, w, e in found:
        rows[prefix + name] = _row(volume, prefix + name, e._replace(name=name), w[2])
    return True


def _under(path: bytes, gone: set[bytes]) -> bool:
    """Is ``path`` (or a folder above it) among ``gone``?"""
    while path not in (b"", b"/"):
        if path in gone:
            return True
        path = path.rsplit(b"/", 1)[0]
    return False
