"""Checking a repository: structure always, every chunk's bytes with ``read_data``.

Errors are damage (a committed point cannot be read as it should). Warnings are harmless
leftovers of interrupted backups (temporary files, packs no index names), which prune removes.

Owns the checks and the report. Must not: change anything, or read a pack in coalesced ranges
(``catalog.read.coalesce`` is for readers of chunks): ``read_data`` reads each pack whole, as
its name is the BLAKE3 of every byte of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CombError, CorruptionError
from catalog.maint.gc import dead_temporary
from catalog.store import filecat
from catalog.store.blocks import BlockHasher, block_list_name
from catalog.store.changes import read_changes
from catalog.store.chunks import decode_chunk
from catalog.store.index import (
    INDEX_PREFIX,
    INDEX_SCHEMA,
    blob_rows,
    contains,
    id_keys,
    ids_to_array,
    segment_names,
)
from catalog.store.leaves import leaves_name
from catalog.store.manifest import ManifestReader
from catalog.store.packs import PACK_TRAILER_BYTES, pack_name, parse_pack
from catalog.store.parquet_io import load_block_list, read_parquet
from catalog.store.points import RecoveryPoint, load_forgotten, load_points_tolerant
from catalog.store.storage import Storage

Progress = Callable[[int, int], None]


@dataclass
class CheckReport:
    points: int = 0
    packs: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _where(storage: Storage, name: str) -> str:
    return storage.local_path(name) or name


def check_repository(
    storage: Storage, read_data: bool = False, progress: Progress | None = None
) -> CheckReport:
    report = CheckReport()
    # Points first, then the index: a backup committing meanwhile adds index rows before its
    # point, so every point seen here finds its chunks in the index read after it. Every
    # metadata file is checked against its BLAKE3 name as it is read (parquet_io.read_verified).
    points = _load_points(storage, report)
    index = _check_index(storage, report)
    known = np.unique(id_keys(ids_to_array(index.column("chunk_id"))))
    for point in points:
        _check_point(storage, point, known, report)
    # Forgotten points (FORMAT.md 9.1) keep only their change tables, which are analytics data.
    gone, bad = load_forgotten(storage, points)
    report.warnings.extend(f"forgotten point: {msg}" for msg in bad)
    for point in gone:
        _check_changes(storage, point, report, "forgotten point")
    _check_catalogs(storage, report)
    pack_ids = sorted(set(index.column("pack").to_pylist())) if index.num_rows else []
    _check_packs(storage, index, pack_ids, read_data, report, progress)
    leftovers = dead_temporary(storage)  # (a live writer's are not left over)
    if leftovers:
        report.warnings.append(
            f"{len(leftovers)} temporary file(s) left by interrupted writes "
            "(the next backup or prune removes them)"
        )
    return report


def _load_points(storage: Storage, report: CheckReport) -> list[RecoveryPoint]:
    points, bad = load_points_tolerant(storage)
    report.errors.extend(bad)
    return points


def _check_index(storage: Storage, report: CheckReport) -> pa.Table:
    good = []
    for name in segment_names(storage):
        try:
            good.append(read_parquet(storage, name, INDEX_SCHEMA.names))
        except CombError as err:
            report.errors.append(err.message)
    return pa.concat_tables(good) if good else INDEX_SCHEMA.empty_table()


def _check_point(
    storage: Storage, point: RecoveryPoint, known: np.ndarray, report: CheckReport
) -> None:
    try:
        manifest = ManifestReader(storage, point.root, point.leaves)
        missing = 0
        first_missing = ""
        for ref in manifest.refs():
            leaf = manifest.leaf(ref)
            if len(leaf.slots) and int(leaf.slots.max()) >= point.leaf_chunks:
                report.errors.append(f"point {point.id}: leaf {ref.leaf_no} has a bad slot")
            absent = ~contains(known, id_keys(leaf.ids))
            if absent.any():
                missing += int(absent.sum())
                first_missing = first_missing or leaf.ids[absent][0].tobytes().hex()[:16]
        if missing:
            report.errors.append(
                f"point {point.id}: {missing} chunk(s) not in the index (first {first_missing})"
            )
        report.points += 1
    except CombError as err:
        report.errors.append(f"point {point.id}: {err.message}")
    _check_changes(storage, point, report)
    _check_block_lists(storage, point, report)


def _check_block_lists(storage: Storage, point: RecoveryPoint, report: CheckReport) -> None:
    """A damaged block list (FORMAT.md 7.1) costs readers a whole-file check, no data: a
    warning. (The files themselves are checked against their names elsewhere.)"""
    lists = point.blocks if isinstance(point.blocks, dict) else {}
    files = {"leaves": point.leaves and leaves_name(point.leaves)}
    files["index_segment"] = point.index_segment and f"{INDEX_PREFIX}/{point.index_segment}.parquet"
    for what, name in files.items():
        blocks_id = lists.get(what)
        if not name or not isinstance(blocks_id, str) or not storage.exists(name):
            continue
        try:
            blocks = load_block_list(storage, name, blocks_id)
            hasher = BlockHasher(blocks.block_bytes)
            hasher.update(memoryview(storage.read(name)))
            if hasher.size != blocks.size or hasher.finish() != blocks.hashes:
                raise CorruptionError(f"{block_list_name(name)} does not match its file")
        except CombError as err:
            report.warnings.append(f"point {point.id}: block list: {err.message}")


def _check_changes(
    storage: Storage, point: RecoveryPoint, report: CheckReport, what: str = "point"
) -> None:
    """A damaged change table loses analytics, not disk content: a warning, not an error."""
    if point.changes is None:
        return
    try:
        offsets = read_changes(storage, point.changes, ["offset"]).column("offset").to_numpy()
    except CombError as err:
        report.warnings.append(f"{what} {point.id}: change table: {err.message}")
        return
    if len(offsets) and (
        np.any(np.diff(offsets) <= 0)
        or np.any(offsets % point.chunk_size)
        or int(offsets[0]) < 0
        or int(offsets[-1]) >= max(point.size, 1)
    ):
        report.warnings.append(f"{what} {point.id}: change table rows are out of order or range")


def _check_catalogs(storage: Storage, report: CheckReport) -> None:
    """A damaged file catalog (FORMAT.md 23) loses browsing of a point's files by catalog, not
    its content: a warning. Each document and each Parquet file it names is read once."""
    catalogs = filecat.survey(storage)
    report.warnings.extend(f"file catalog: {line}" for line in catalogs.problems)
    for name in sorted(catalogs.named):
        try:
            read_parquet(storage, name, ["path"])
        except CombError as err:
            report.warnings.append(f"file catalog: {err.message}")


def _check_packs(
    storage: Storage,
    index: pa.Table,
    pack_ids: list[str],
    read_data: bool,
    report: CheckReport,
    progress: Progress | None,
) -> None:
    on_disk = {
        n.rsplit("/", 1)[-1][: -len(".pack")] for n in storage.list("packs") if n.endswith(".pack")
    }
    for orphan in sorted(on_disk - set(pack_ids)):
        report.warnings.append(
            f"pack {orphan[:16]} is not in the index (left by an interrupted backup)"
        )
    index = index.sort_by("pack")
    packs_col = index.column("pack").to_pylist()
    starts: dict[str, int] = {}
    for i, p in enumerate(packs_col):
        starts.setdefault(p, i)
    total = len(pack_ids)
    for i, pid in enumerate(pack_ids):
        name = pack_name(pid)
        where = _where(storage, name)
        nxt = pack_ids[i + 1] if i + 1 < total else None
        rows = index.slice(starts[pid], (starts[nxt] if nxt else index.num_rows) - starts[pid])
        report.packs += 1
        if pid not in on_disk:
            report.errors.append(
                f"pack {where} is missing ({rows.num_rows} chunk(s) indexed in it; "
                "`comb repair index` forgets them, so a backup that reads them stores them again)"
            )
            continue
        try:
            if read_data:
                _read_pack(storage, name, where, pid, rows, report)
            else:
                size = storage.size(name)
                ends = pc.add(rows.column("offset"), rows.column("stored_len").cast(pa.int64()))
                if pc.max(ends).as_py() > size - PACK_TRAILER_BYTES:
                    report.errors.append(
                        f"pack {where} is shorter than its index says ({size} bytes)"
                    )
        except CombError as err:
            report.errors.append(err.message)
        if progress is not None:
            progress(i + 1, total)


def _read_pack(
    storage: Storage, name: str, where: str, pid: str, rows: pa.Table, report: CheckReport
) -> None:
    data = storage.read(name)
    report.bytes_checked += len(data)
    if blake3.blake3(data).hexdigest() != pid:
        report.errors.append(f"pack {where} does not match its name (content changed)")
    try:
        entries = {
            (e.chunk_id, e.offset): e for e in parse_pack(data, where, sealer=storage.sealer)
        }
    except CombError as err:
        report.errors.append(err.message)
        entries = {}
    view = memoryview(data)
    for cid, off, slen, rlen, codec in blob_rows(rows):
        report.chunks += 1
        if entries and (cid, off) not in entries:
            report.errors.append(f"pack {where} offset {off}: index entry not in the pack's table")
        if off + slen > len(data):
            report.errors.append(f"pack {where} offset {off}: beyond the end of the pack")
            continue
        try:
            decode_chunk(
                view[off : off + slen],
                codec,
                rlen,
                cid,
                f"pack {where} offset {off}",
                storage.sealer,
            )
        except CombError as err:
            report.errors.append(err.message)


def summary(report: CheckReport) -> str:
    state = "clean" if report.ok else f"{len(report.errors)} error(s)"
    return (
        f"{report.points} point(s), {report.packs} pack(s), {report.chunks} chunk(s) read: {state}"
        + (f", {len(report.warnings)} warning(s)" if report.warnings else "")
    )
