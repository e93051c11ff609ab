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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.store import sorted_rows

from .entries import SCHEMA, Answer, Ask, Entry, display
from .view import WALKERS, Node, PointFiles, describe
from .volumes import Volume

WALK_SHARE = 0.5
WALK_UNITS = 16  # folders to share out among walkers: fewer, and the next level is listed
WALK_LEVELS = 2  # (at most: the levels listed first are tabled one row at a time)
_METADATA = ["kind", "inode", "size", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "nlink"]
_METADATA += ["target"]
_LISTING = pa.schema(
    [("volume", pa.string()), ("path", pa.binary()), ("path_text", pa.string())]
    + [SCHEMA.field(name) for name in _METADATA]
    + [("deps_spans", pa.list_(pa.int64()))]
)


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


def walk_whole(files: PointFiles, top: Node) -> pa.Table:
    """``subtree(files, top)``, the subtrees below ``top`` walked ``WALKERS`` at a time:
    ``top`` is listed first, and its folders too while they are fewer than ``WALK_UNITS``
    (a root of a few folders, one of them holding most of the tree: a whole disk's /usr),
    then each folder below is walked whole by the next free worker. The same rows as
    ``subtree`` (whose single walk lists a folder reached twice once, under its first name:
    when a folder's inode comes twice, the volume is walked that way instead); what could not
    be listed is said in path order."""
    volume = top.volume
    assert volume is not None
    said = len(files.skipped)
    base = top.path[len(b"/" + volume.name.encode()) :] or b"/"
    rows = {base: _row(volume, base, top.entry, None)}
    level: list[tuple[bytes, Entry]] = [(base, top.entry)]
    for depth in range(WALK_LEVELS):
        asks: list[Ask] = [(e.inode, None, None, None) for _, e in level]
        answers = files.list_inodes(volume, asks, [path for path, _ in level])
        below = []
        for (path, _), (entries, deps, whole) in zip(level, answers, strict=True):
            rows[path]["deps_spans"] = deps
            if isinstance(whole, str):  # (as a walk says it)
                files.skipped.append(f"{describe(volume)}: {whole}")
                continue
            prefix = b"/" if path == b"/" else path + b"/"
            for entry in entries:
                if entry.is_dir:
                    below.append((prefix + entry.name, entry))
                else:
                    rows[prefix + entry.name] = _row(volume, prefix + entry.name, entry, None)
        level = below
        if len(below) >= WALK_UNITS or depth == WALK_LEVELS - 1:
            break
        rows.update((path, _row(volume, path, entry, None)) for path, entry in below)
    units = [Node(b"/" + volume.name.encode() + path, volume, entry) for path, entry in level]
    with ThreadPoolExecutor(WALKERS) as pool:
        tables = list(pool.map(lambda node: subtree(files, node), units))
    first = pa.Table.from_pylist(list(rows.values()), schema=_LISTING)
    if _linked([first, *tables]):
        del files.skipped[said:]
        return subtree(files, top)
    files.skipped[said:] = sorted(files.skipped[said:])
    table = pa.concat_tables([first, *(t.cast(_LISTING) for t in tables)])
    return table.sort_by([("path", "ascending")])


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
) -> Relisted | None:
    """The volume's listing now, from its listing ``before`` (rows of this volume sorted by
    path, with ``deps_spans``) and ``changed``: which of a folder's ``deps_spans`` changed
    (volume offsets and lengths; None when its deps are unknown). Each folder with a change is
    read again, parents first, a level of folders per batch of requests: when its own blocks
    did not change, only its entries whose records did (the worker tells); else it is listed
    again, what it gained as a subdirectory is walked whole and what it lost is removed with
    everything under it. Everything else is kept as it was: only the folders' rows and the rows
    read again are handled one by one; the rest is found by binary search in the sorted paths
    and stays in Arrow. None when more than ``WALK_SHARE`` of the folders changed: walking
    the volume whole (``subtree``) costs less then."""
    return _Relist(files, volume, before.combine_chunks()).run(changed)


Was = dict[bytes, tuple[str, int, list[int] | None]]  # name → kind, inode, deps as listed before


class _Relist:
    def __init__(self, files: PointFiles, volume: Volume, before: pa.Table) -> None:
        self.files, self.volume, self.before = files, volume, before
        self.paths = before.column("path").to_numpy(zero_copy_only=False)  # sorted
        self.gone: set[bytes] = set()  # paths removed, with everything under them
        self.rows: dict[bytes, dict[str, Any]] = {}  # rows replaced or added
        self.extra: list[pa.Table] = []  # new subtrees

    def run(self, changed: Callable[[list[int] | None], list[int] | None]) -> Relisted | None:
        before, paths = self.before, self.paths
        dirs = pc.indices_nonzero(pc.equal(before.column("kind"), "dir")).to_pylist()
        spans = before.column("deps_spans").take(pa.array(dirs, pa.int64())).to_pylist()
        hints = {paths[i]: c for i, d in zip(dirs, spans, strict=True) if (c := changed(d)) != []}
        if not hints:
            return Relisted(before, pa.array([], pa.binary()), 0)
        if len(hints) > WALK_SHARE * len(dirs):
            return None  # most folders changed (or are unknown): a walk costs less
        levels: dict[int, list[bytes]] = {}  # the root, then folders by depth: parents first
        for p in hints:
            levels.setdefault(0 if p == b"/" else p.count(b"/"), []).append(p)
        self.depth = pc.count_substring(before.column("path"), "/").to_numpy()
        for level in sorted(levels):
            self.level(level, sorted(levels[level]), hints)
        keep = np.ones(len(paths), dtype=bool)
        for path in self.gone:
            i = self.at(path)
            if i is not None:
                keep[i] = False
            lo, hi = self.below(path)
            keep[lo:hi] = False
        for path in self.rows:
            i = self.at(path)
            if i is not None:
                keep[i] = False
        parts = [pa.Table.from_pylist(list(self.rows.values()), schema=before.schema)]
        parts += [t.select(before.schema.names).cast(before.schema) for t in self.extra]
        if _linked([before.select(["kind", "inode"]).filter(pa.array(keep)), *parts]):
            return None  # a folder under two names (a hard link, a loop): as a walk sees it
        result = sorted_rows.merge(before, pa.concat_tables(parts), ["path"], paths, keep)
        touched = [pa.array(paths[~keep], pa.binary()), pa.array(list(self.rows), pa.binary())]
        touched += [t.column("path").combine_chunks() for t in self.extra]
        return Relisted(result, pa.concat_arrays(touched), len(hints))

    def at(self, path: bytes) -> int | None:
        i = int(np.searchsorted(self.paths, path))
        return i if i < len(self.paths) and self.paths[i] == path else None

    def below(self, path: bytes) -> tuple[int, int]:
        """The rows under a folder."""
        if path == b"/":
            return 1, len(self.paths)
        lo, hi = np.searchsorted(self.paths, [path + b"/", path + b"0"]).tolist()
        return int(lo), int(hi)

    def level(self, level: int, folders: list[bytes], hints: dict[bytes, list[int] | None]) -> None:
        """The folders of one depth (``level`` slashes; the root 0), read in one batch."""
        todo: list[tuple[bytes, dict[str, Any], np.ndarray]] = []
        for path in folders:
            i = self.at(path)
            if _under(path, self.gone) or (path not in self.rows and i is None):
                continue
            row = self.rows.get(path) or self.before.slice(i, 1).to_pylist()[0]
            lo, hi = self.below(path)
            todo.append((path, row, lo + np.nonzero(self.depth[lo:hi] == level + 1)[0]))
        if not todo:
            return
        kids = pa.array(np.concatenate([t[2] for t in todo]), pa.int64())
        taken = self.before.select(["kind", "inode", "deps_spans"]).take(kids)
        kinds, inodes, kid_spans = (c.to_pylist() for c in taken.columns)
        wases: list[Was] = []
        asks: list[Ask] = []
        first = 0
        for path, row, mine in todo:
            prefix = b"/" if path == b"/" else path + b"/"
            wases.append({self.paths[k][len(prefix) :]: (kinds[first + j], inodes[first + j],
                          kid_spans[first + j]) for j, k in enumerate(mine)})  # fmt: skip
            hint = hints[path]  # (None: the folder's deps are unknown)
            known = inodes[first : first + len(mine)] if hint and len(mine) else None
            if known is None:
                asks.append((int(row["inode"]), None, None, None))
            else:
                asks.append((int(row["inode"]), known, hint, row["deps_spans"]))
            first += len(mine)
        answers = self.files.list_inodes(self.volume, asks, [t[0] for t in todo])
        for (path, row, _), was, ask, answer in zip(todo, wases, asks, answers, strict=True):
            self.folder(path, row, was, ask[0], answer)

    def folder(
        self,
        path: bytes,
        row: dict[str, Any],
        was: Was,
        inode: int,
        answer: Answer,
    ) -> None:
        """One folder read again: its row, and its entries' rows added, replaced or gone."""
        entries, deps, whole = answer
        prefix = b"/" if path == b"/" else path + b"/"
        self.rows[path] = {**row, "deps_spans": deps}
        if isinstance(whole, str):  # unreadable now: no entries, as a walk leaves it
            self.files.skipped.append(f"{describe(self.volume)}: {whole}")
            self.gone.update(prefix + name for name in was)
            return
        if not whole and _restat(self.volume, prefix, was, entries, self.rows):
            return
        if not whole:  # an entry changed kind under the same name and number: list it again
            ((entries, deps, _),) = self.files.list_inodes(self.volume, [(inode, None, None, None)])
            self.rows[path] = {**row, "deps_spans": deps}
        for entry in entries:
            child = prefix + entry.name
            w = was.pop(entry.name, None)
            if w is not None:
                if (w[0], w[1]) == (entry.kind, entry.inode):
                    self.rows[child] = _row(self.volume, child, entry, w[2])
                    continue
                self.gone.add(child)  # replaced by another entry of the same name
            if entry.is_dir:
                node = Node(b"/" + self.volume.name.encode() + child, self.volume, entry)
                self.extra.append(subtree(self.files, node))
            else:
                self.rows[child] = _row(self.volume, child, entry, None)
        self.gone.update(prefix + name for name in was)


def _linked(tables: list[pa.Table]) -> bool:
    """Does a folder's inode appear twice among the folders of ``tables`` (the listing made
    again: a damaged or hostile filesystem's hard-linked folder or loop)? A walk lists such a
    folder once, under its first name, which an incremental listing cannot tell."""
    dirs = [t.filter(pc.equal(t.column("kind"), "dir")).column("inode") for t in tables]
    inodes = pa.chunked_array([c for d in dirs for c in d.chunks], pa.uint64())
    return len(pc.unique(inodes)) != len(inodes)


def _restat(
    volume: Volume, prefix: bytes, was: Was, fresh: list[Entry], rows: dict[bytes, dict[str, Any]]
) -> bool:
    """The rows of a folder's entries read again by number (``fresh``, names empty) under their
    names (``was``); False, and nothing done, when one changed kind."""
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
