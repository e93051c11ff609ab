"""The file catalog of a recovery point (``catalog.store.filecat``): after each backup, and
for older points with ``comb index``.

The catalog of a point whose parent has one is written as the change between the two: when
none of the disk chunks the parent's walk read changed in this backup (its change table says
which did), the listing is the same and nothing is walked; otherwise the point's filesystems
are walked (metadata only) and only the entries added, modified or removed are stored.

Owns when and how a catalog is built. Must not: parse a filesystem (``drive.files``), or know
the catalog's file layout (``catalog.store.filecat``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from catalog.repo import Repository
from catalog.store import filecat
from catalog.store.changes import read_changes
from catalog.store.points import RecoveryPoint
from drive.files.view import PointFiles


@dataclass
class Indexed:
    """What building one point's catalog did."""

    doc: filecat.FilesDoc
    walked: bool  # False: the parent's listing was reused (no metadata chunk changed)
    seconds: float
    existed: bool = False


def _unchanged(repo: Repository, point: RecoveryPoint, base: filecat.FilesDoc) -> bool:
    """Did this backup leave every chunk the base's walk read as it was?"""
    if point.parent != base.point or point.changes is None:
        return False
    if base.chunk_size != repo.config.chunk_size or not base.touched:
        return False
    offsets = read_changes(repo.storage, point.changes, ["offset"]).column("offset")
    changed = np.asarray(offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    return not np.isin(np.asarray(base.touched, dtype=np.int64), changed).any()


def _touched(reads: list[tuple[int, int]], chunk: int) -> list[int]:
    out: set[int] = set()
    for offset, length in reads:
        first, last = offset // chunk, (offset + max(length, 1) - 1) // chunk
        out.update(range(first * chunk, (last + 1) * chunk, chunk))
    return sorted(out)


def walk_point(repo: Repository, point: RecoveryPoint) -> tuple[pa.Table, list[int], list, list]:
    """Every entry of the point's readable filesystems (``filecat.LISTING_SCHEMA``), the chunk
    offsets the walk read, the volumes, and what could not be read (one line each)."""
    tables: list[pa.Table] = []
    volumes: list[dict[str, object]] = []
    skipped: list[str] = []
    with PointFiles(repo.reader(point)) as files:
        for volume, table, error in files.volume_listings():
            volumes.append(
                {
                    "name": volume.name,
                    "fstype": volume.fstype,
                    "size": volume.size,
                    "offset": volume.offset,
                    "label": volume.label,
                    "note": volume.note,
                }
            )
            if error is not None:
                skipped.append(error)
            if table is not None:
                tables.append(table)
        skipped += files.skipped
        touched = _touched(files.walk_reads, repo.config.chunk_size)
    listing = (
        pa.concat_tables([t.select(filecat.LISTING_SCHEMA.names) for t in tables])
        if tables
        else filecat.LISTING_SCHEMA.empty_table()
    )
    return listing, touched, volumes, skipped


def index_point(repo: Repository, point: RecoveryPoint) -> Indexed:
    """The point's catalog: kept when it exists, else built (see the module)."""
    t0 = time.perf_counter()
    existing = filecat.read_doc(repo.storage, point.id)
    if existing is not None:
        return Indexed(existing, False, 0.0, existed=True)
    base = filecat.read_doc(repo.storage, point.parent) if point.parent else None
    if base is not None and _unchanged(repo, point, base):
        base_listing = filecat.read_listing(repo.storage, base.point)
        assert base_listing is not None
        doc = filecat.write_catalog(
            repo.storage,
            point.id,
            base_listing,
            base,
            base_listing,
            repo.config.chunk_size,
            base.touched,
            base.volumes,
            base.skipped,
        )
        return Indexed(doc, False, time.perf_counter() - t0)
    listing, touched, volumes, skipped = walk_point(repo, point)
    base_listing = filecat.read_listing(repo.storage, base.point) if base is not None else None
    doc = filecat.write_catalog(
        repo.storage,
        point.id,
        listing,
        base,
        base_listing,
        repo.config.chunk_size,
        touched,
        volumes,
        skipped,
    )
    return Indexed(doc, True, time.perf_counter() - t0)
