"""The file catalog of a recovery point (``catalog.store.filecat``): after each backup, and
for older points with ``comb index``.

The catalog of a point whose parent (the point its backup read as parent) has one is built
from the parent's: the backup's change table says which disk chunks changed, those some
folder's listing came from are compared with the parent point's bytes
(``compare_chunks``), and only the folders whose listing came from bytes that changed are
listed again (``drive.files.listing``); when none did, nothing is walked at all. The
volumes must be the ones the parent's catalog found (same place, same filesystem), else that
volume is walked whole. Only the entries added, modified or removed are stored.

Owns when and how a catalog is built. Must not: parse a filesystem (``drive.files``), or know
the catalog's file layout (``catalog.store.filecat``).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CombError, ReaderChanged
from catalog.read.point import DEFAULT_CACHE_CHUNKS, PointSource
from catalog.repo import Repository
from catalog.store import filecat
from catalog.store.changes import read_changes
from catalog.store.points import RecoveryPoint, parse_point, point_name
from drive.files.listing import relist, walk_whole
from drive.files.view import READABLE, PointFiles
from drive.files.volumes import Volume


@dataclass
class Indexed:
    """What building one point's catalog did."""

    doc: filecat.FilesDoc
    walked: bool  # False: the parent's listing was reused (no folder's chunks changed)
    seconds: float
    existed: bool = False
    relisted: int = 0  # folders listed again (an incremental catalog)


def _summary(v: Volume) -> dict[str, object]:
    return {"name": v.name, "fstype": v.fstype, "size": v.size, "offset": v.offset,
            "label": v.label, "note": v.note}  # fmt: skip


COMPARE_SHARE = 0.5  # compare changed chunks with the base's when at most this share of touched
GRAIN = 16  # bytes: the unit of a compared chunk's changed ranges (two 8-byte words)
COMPARE_CACHE = 2048  # compared chunks kept decoded for the listing (128 MiB of 64 KiB ones)


class _Chunks:
    """Stored folder deps as the walk's volume spans, and which bytes of them changed:
    ``changed`` chunks, narrowed to the byte ranges of ``exact`` (disk offset, length pairs by
    chunk offset) for the chunks that were compared."""

    def __init__(
        self,
        chunk: int,
        changed: np.ndarray | None = None,
        exact: dict[int, list[tuple[int, int]]] | None = None,
    ) -> None:
        self.chunk = chunk
        self.changed = changed
        self.exact = exact or {}

    def spans(self, deps: bytes | None, exact: bytes | None, volume: Volume) -> list[int] | None:
        """A stored folder's volume spans: its exact ones (``spans``), else its whole chunks."""
        if exact is not None:
            pairs = np.frombuffer(exact, "<i8").reshape(-1, 2) - [volume.offset, 0]
            return [int(v) for v in pairs.ravel()]
        if deps is None:
            return None
        offsets = np.frombuffer(deps, "<i8") - volume.offset
        return [v for o in offsets.tolist() for v in (o, self.chunk)]

    def changes(self, volume: Volume) -> Callable[[list[int] | None], list[int] | None]:
        """Which bytes of a folder's deps spans changed, as volume offsets and lengths (empty:
        none did); None when its deps are unknown."""
        starts: list[int] = []
        ends: list[int] = []
        for c in sorted(self.changed.tolist()) if self.changed is not None else []:
            for at, n in self.exact.get(c, [(c, self.chunk)]):
                starts.append(at)
                ends.append(at + n)

        def check(spans: list[int] | None) -> list[int] | None:
            if spans is None:
                return None
            out: list[int] = []
            for at, n in zip(spans[::2], spans[1::2], strict=True):
                a = volume.offset + at
                b = a + max(n, 1)
                j = bisect.bisect_right(ends, a)  # the first changed range ending after a
                while j < len(starts) and starts[j] < b:
                    lo, hi = max(a, starts[j]), min(b, ends[j])
                    out += [lo - volume.offset, hi - lo]
                    j += 1
            return out

        return check


def _stored(table: pa.Table, volume: Volume, chunks: _Chunks) -> pa.Table:
    """A volume's listing from ``drive.files.listing`` in the catalog's columns: each folder's
    ``deps_spans`` (volume offset, length pairs, ascending) as its ``spans`` (disk offsets) and
    its ``deps`` (the chunks they lie in), worked out for all rows at once."""
    lists = table.column("deps_spans").combine_chunks()
    n = len(lists)
    bounds = lists.offsets.to_numpy()
    flat = lists.values.to_numpy()[bounds[0] : bounds[-1]].astype(np.int64)
    bounds = bounds - bounds[0]
    valid = lists.is_valid()
    validity = valid.buffers()[1] if lists.null_count else None
    at, length = flat[0::2] + volume.offset, flat[1::2]
    spans = np.empty_like(flat)
    spans[0::2], spans[1::2] = at, length
    rows = np.repeat(np.arange(n), np.diff(bounds) // 2)  # each pair's row
    first = at // chunks.chunk
    last = (at + np.maximum(length, 1) - 1) // chunks.chunk
    counts = last - first + 1
    starts = np.cumsum(counts) - counts
    index = np.repeat(first, counts) + np.arange(int(counts.sum())) - np.repeat(starts, counts)
    owner = np.repeat(rows, counts)
    keep = np.ones(len(index), bool)  # (a row's pairs ascend: repeats are neighbours)
    keep[1:] = (index[1:] != index[:-1]) | (owner[1:] != owner[:-1])
    index, owner = index[keep], owner[keep]
    if len(index) > 1 and ((np.diff(index) < 0) & (owner[1:] == owner[:-1])).any():
        raise ValueError("a folder's deps spans are not in ascending order")
    per_row = np.bincount(owner, minlength=n)
    deps_bounds = np.concatenate([[0], np.cumsum(per_row) * 8]).astype(np.int32)

    def binary(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
        buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
        return pa.Array.from_buffers(pa.binary(), n, buffers, null_count=lists.null_count)

    table = table.drop_columns(["deps_spans"])
    table = table.append_column("deps", binary(deps_bounds, (index * chunks.chunk).astype("<i8")))
    table = table.append_column("spans", binary(bounds * 8, spans.astype("<i8")))
    return table.select(filecat.LISTING_SCHEMA.names).cast(filecat.LISTING_SCHEMA)


def _walkable(table: pa.Table, volume: Volume, chunks: _Chunks) -> pa.Table:
    """A volume's rows of a stored listing, with ``deps_spans`` for ``relist``: each folder's
    ``spans`` in volume offsets (all rows at once), or where a folder has none (a catalog from
    before they were kept), its whole ``deps`` chunks."""
    column, exact = table.column("deps"), table.column("spans").combine_chunks()
    old = pc.and_(pc.is_valid(column), pc.is_null(exact))
    if pc.any(old).as_py():  # (rare: row by row)
        spans: list[list[int] | None] = [None] * table.num_rows
        known = pc.indices_nonzero(pc.or_(pc.is_valid(column), pc.is_valid(exact)))
        pairs = zip(column.take(known).to_pylist(), exact.take(known).to_pylist(), strict=True)
        for i, (deps, mine) in zip(known.to_pylist(), pairs, strict=True):
            spans[i] = chunks.spans(deps, mine, volume)
        lists = pa.array(spans, pa.list_(pa.int64()))
    else:
        _, offsets_buffer, data = exact.buffers()
        bounds = np.frombuffer(offsets_buffer, np.int32, len(exact) + 1, exact.offset * 4)
        flat = np.frombuffer(data, "<i8", (bounds[-1] - bounds[0]) // 8, bounds[0]).copy()
        flat[0::2] -= volume.offset
        validity = exact.is_valid().buffers()[1] if exact.null_count else None
        offsets = pa.py_buffer(((bounds - bounds[0]) // 8).astype(np.int32))
        lists = pa.ListArray.from_buffers(
            pa.list_(pa.int64()), len(exact), [validity, offsets], exact.null_count,
            children=[pa.array(flat, pa.int64())],
        )  # fmt: skip
    return table.drop_columns(list(filecat.WHERE_FROM)).append_column("deps_spans", lists)


def _touched(listing: pa.Table) -> list[int]:
    """Every chunk some folder's listing came from; empty when one folder's are unknown."""
    dirs = listing.filter(pc.equal(listing.column("kind"), "dir")).column("deps").to_pylist()
    if not dirs or any(d is None for d in dirs):
        return []
    return sorted({int(v) for d in dirs for v in np.frombuffer(d, "<i8").tolist()})


class Built(NamedTuple):
    """A point's listing as ``build_listing`` made it."""

    listing: pa.Table
    volumes: list[dict[str, Any]]
    skipped: list[str]
    relisted: int  # folders listed again; -1: walked whole
    touched: pa.Table | None  # the (volume, path) keys that may differ from the base's; None: any


def build_listing(
    repo: Repository,
    point: RecoveryPoint,
    base: filecat.FilesDoc | None = None,
    base_listing: pa.Table | None = None,
    changed: np.ndarray | None = None,
    exact: dict[int, list[tuple[int, int]]] | None = None,
    source: PointSource | None = None,
) -> Built:
    """The point's listing: walked whole, or (with a base and the changed chunks) the base's
    listing with the folders that changed listed again. Also the volumes, what could not be
    read, how many folders were listed again, and which entries may differ from the base's."""
    chunks = _Chunks(repo.config.chunk_size, changed, exact)
    tables: list[pa.Table] = []
    volumes: list[dict[str, Any]] = []
    skipped: list[str] = []
    relisted = -1 if base is None else 0
    keys: list[pa.Table] | None = [] if base_listing is not None else None
    with PointFiles(source or repo.reader(point)) as files:
        for volume in files.volumes():
            volumes.append(_summary(volume))
            if volume.fstype not in READABLE:
                continue
            before = None
            if base is not None and base_listing is not None and _summary(volume) in base.volumes:
                mine = pc.indices_nonzero(pc.equal(base_listing.column("volume"), volume.name))
                first, n = (mine[0].as_py(), len(mine)) if len(mine) else (0, 0)
                rows = base_listing.slice(first, n)  # (sorted by volume: one run, no copy)
                if rows.num_rows and rows.column("path")[0].as_py() == b"/":
                    before = _walkable(rows, volume, chunks)
            table = None
            if before is not None:
                said = len(files.skipped)
                try:  # (None: most folders changed, a walk costs less)
                    again = relist(files, volume, before, chunks.changes(volume))
                except ReaderChanged:
                    raise
                except CombError:
                    again = None  # a folder that is not one any more: walked whole instead
                if again is None:
                    del files.skipped[said:]  # (the walk says it again)
                if again is not None:
                    table, relisted = again.table, relisted + again.folders
                    if keys is not None:
                        name = pa.array([volume.name] * len(again.touched), pa.string())
                        keys.append(pa.table({"volume": name, "path": again.touched}))
            try:
                if table is None:
                    keys = None  # (a volume walked whole: compared whole)
                    table = walk_whole(files, files.volume_node(volume))
            except ReaderChanged:
                raise  # (comb's, not the volume's: no catalog rather than one without it)
            except CombError as err:  # one volume's failure is one line
                skipped.append(str(err))
                continue
            tables.append(_stored(table, volume, chunks))
        skipped += files.skipped
    listing = pa.concat_tables(tables) if tables else filecat.LISTING_SCHEMA.empty_table()
    if keys is not None and base_listing is not None:
        names = {t.column("volume")[0].as_py() for t in tables if t.num_rows}
        if set(pc.unique(base_listing.column("volume")).to_pylist()) != names:
            keys = None  # a volume came or went: compared whole
    touched = None if keys is None else filecat.keys_table(keys)
    return Built(listing, volumes, skipped, relisted, touched)


def walk_point(repo: Repository, point: RecoveryPoint) -> tuple[pa.Table, list, list, list]:
    """A full walk: the listing, its touched chunks, the volumes, what could not be read."""
    built = build_listing(repo, point)
    return built.listing, _touched(built.listing), built.volumes, built.skipped


def _changed(repo: Repository, point: RecoveryPoint, base: filecat.FilesDoc) -> np.ndarray | None:
    """The chunk offsets this backup changed against the base's point; None when unknown."""
    if point.parent != base.point or point.changes is None:
        return None
    if base.chunk_size != repo.config.chunk_size:
        return None
    offsets = read_changes(repo.storage, point.changes, ["offset"]).column("offset")
    return np.asarray(offsets.to_numpy(zero_copy_only=False), dtype=np.int64)


def compare_chunks(
    repo: Repository, point: RecoveryPoint, base: filecat.FilesDoc, changed: np.ndarray
) -> tuple[dict[int, list[tuple[int, int]]], PointSource | None]:
    """The byte ranges (disk offset, length) that really differ between the base's point and
    this one in each changed chunk some folder's listing came from (the base's ``touched``):
    a chunk of inode records changes when one inode in it does, and the folders whose records
    lie in the others need not be read again. Compared in ``GRAIN``-byte pieces. Also the
    point's reader that read them, which keeps them decoded: they are mostly what the folders
    read again are listed from. Nothing (every changed chunk counts whole) when most of them
    changed, or the base's point cannot be read."""
    todo = np.intersect1d(changed, np.asarray(base.touched, np.int64))
    if not len(todo) or len(todo) > COMPARE_SHARE * len(base.touched):
        return {}, None
    size, chunk = point.size, repo.config.chunk_size
    new = repo.reader(point, cache_chunks=DEFAULT_CACHE_CHUNKS + min(len(todo), COMPARE_CACHE))
    try:
        raw = repo.storage.read(point_name(base.point))
        parent = parse_point(raw, point_name(base.point), base.point, repo.storage.sealer)
        if parent.size != size:
            return {}, None
        old = repo.reader(parent)

        def diff(c: int) -> list[tuple[int, int]]:
            n = min(chunk, size - c)
            pad = bytes(-n % GRAIN)
            a = np.frombuffer(old.read(c, n) + pad, "<u8")  # (GRAIN bytes: two words)
            b = np.frombuffer(new.read(c, n) + pad, "<u8")
            words = a != b
            differs = words[0::2] | words[1::2]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], differs.view(np.int8), [0]])))
            runs = zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)
            return [(c + lo * GRAIN, min(hi * GRAIN, n) - lo * GRAIN) for lo, hi in runs]

        with ThreadPoolExecutor(2) as pool:
            return dict(zip(todo.tolist(), pool.map(diff, todo.tolist()), strict=True)), new
    except (CombError, OSError):
        return {}, None


def _volumes(repo: Repository, point: RecoveryPoint) -> list[dict[str, object]]:
    with PointFiles(repo.reader(point)) as files:
        return [_summary(v) for v in files.volumes()]


def index_point(repo: Repository, point: RecoveryPoint) -> Indexed:
    """The point's catalog: kept when it exists, else built (see the module)."""
    t0 = time.perf_counter()
    existing = filecat.read_doc(repo.storage, point.id)
    if existing is not None:
        return Indexed(existing, False, 0.0, existed=True)
    base = filecat.read_doc(repo.storage, point.parent) if point.parent else None
    changed = _changed(repo, point, base) if base is not None else None
    base_listing = filecat.read_listing(repo.storage, base.point, base) if base else None
    if (
        base is not None
        and base_listing is not None
        and changed is not None
        and base.touched
        and not np.isin(np.asarray(base.touched, np.int64), changed).any()
        and _volumes(repo, point) == base.volumes
    ):
        doc = filecat.write_catalog(
            repo.storage, point.id, base_listing, base, base_listing,
            repo.config.chunk_size, base.touched, base.volumes, base.skipped,
            filecat.keys_table([]),
        )  # fmt: skip
        return Indexed(doc, False, time.perf_counter() - t0)
    incremental = base if changed is not None else None
    exact: dict[int, list[tuple[int, int]]] = {}
    source: PointSource | None = None
    if base is not None and changed is not None:
        exact, source = compare_chunks(repo, point, base, changed)
    built = build_listing(repo, point, incremental, base_listing, changed, exact, source)
    doc = filecat.write_catalog(
        repo.storage, point.id, built.listing, base, base_listing,
        repo.config.chunk_size, _touched(built.listing), built.volumes, built.skipped,
        built.touched,
    )  # fmt: skip
    return Indexed(doc, True, time.perf_counter() - t0, relisted=max(built.relisted, 0))
