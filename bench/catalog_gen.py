"""A synthetic backup history written straight into a repository's catalog files.

Writes what real backups would write for a long history of one disk, except packs: point
documents, change tables, index segments, leaves and roots, each through the catalog's own
writers and schemas, so reports and sizes are measured on the real formats without spending
hours backing up terabytes. Packs are not written (reports never read them); their names in the
index are made up.

The disk model: the first backup holds ``allocated`` of the disk in 1 MiB runs; every later point
changes ``change`` of the disk's chunks, ``hot_share`` of them inside a few hot regions (logs,
databases) and the rest anywhere; a few changes write zeros or content that already exists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import blake3
import numpy as np
import pyarrow as pa

from catalog.repo import Repository
from catalog.store.changes import ChangeTableWriter, chunk_keys
from catalog.store.index import INDEX_SCHEMA, IndexSegmentWriter
from catalog.store.leaves import LEAVES_PREFIX
from catalog.store.manifest import LEAF_SCHEMA, ROOT_SCHEMA, ROOTS_PREFIX
from catalog.store.parquet_io import ParquetStreamWriter
from catalog.store.points import PointStats, RecoveryPoint, commit_point

GIB = 1 << 30


@dataclass(frozen=True)
class Spec:
    points: int = 1000
    disk_bytes: int = 256 * GIB
    change: float = 0.005
    chunk_bytes: int = 64 << 10
    allocated: float = 0.8
    hot_regions: int = 24
    hot_region_bytes: int = 256 << 20
    hot_share: float = 0.7
    zero_share: float = 0.02
    dedup_share: float = 0.05
    run_chunks: float = 4.0  # mean length of a write, in chunks (geometric): 256 KiB
    interval_s: float = 3600.0
    seed: int = 1


@dataclass
class _Disk:
    ids: np.ndarray  # (chunks, 32) uint8
    has: np.ndarray  # bool per chunk
    leaf_file: np.ndarray  # int32 per leaf: index into files, -1 = no leaf (all zeros)
    leaf_ord: np.ndarray  # int32 per leaf
    files: list[str]


def generate(repo: Repository, spec: Spec, progress: bool = False) -> list[RecoveryPoint]:
    rng = np.random.default_rng(spec.seed)
    lc = repo.config.leaf_chunks
    n = spec.disk_bytes // spec.chunk_bytes
    disk = _Disk(
        np.zeros((n, 32), np.uint8),
        np.zeros(n, bool),
        np.full(-(-n // lc), -1, np.int32),
        np.zeros(-(-n // lc), np.int32),
        [],
    )
    hot = rng.integers(0, max(1, n - spec.hot_region_bytes // spec.chunk_bytes), spec.hot_regions)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[RecoveryPoint] = []
    parent: RecoveryPoint | None = None
    for i in range(spec.points):
        if i == 0:
            leaves = rng.random(len(disk.leaf_file)) < spec.allocated
            changed = np.flatnonzero(np.repeat(leaves, lc)[:n])
        else:
            changed = _pick_changes(rng, spec, n, hot)
        point = _one_point(repo, spec, rng, disk, changed, parent, t, first=i == 0)
        out.append(point)
        parent = point
        gap = spec.interval_s * (1 + 0.2 * (rng.random() - 0.5))
        if rng.random() < 0.01:
            gap *= 6  # a missed backup now and then (the RPO report finds them)
        t += timedelta(seconds=gap)
        if progress and (i + 1) % 100 == 0:
            print(f"  {i + 1}/{spec.points} points", flush=True)
    return out


def _pick_changes(rng: np.random.Generator, spec: Spec, n: int, hot: np.ndarray) -> np.ndarray:
    """About ``change`` of the chunks, written in runs (file-system writes are extents, not
    single 64 KiB blocks), ``hot_share`` of them starting inside a hot region."""
    k = int(spec.change * n)
    runs = max(1, int(k / spec.run_chunks))
    lengths = rng.geometric(1 / spec.run_chunks, runs) if spec.run_chunks > 1 else np.ones(runs)
    lengths = lengths.astype(np.int64)
    k_hot = int(runs * spec.hot_share)
    region = spec.hot_region_bytes // spec.chunk_bytes
    starts = np.concatenate(
        [
            hot[rng.integers(0, len(hot), k_hot)] + rng.integers(0, region, k_hot),
            rng.integers(0, n, runs - k_hot),
        ]
    )
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    chunks = first + np.arange(int(lengths.sum()))
    return np.unique(chunks[chunks < n])


def _one_point(
    repo: Repository,
    spec: Spec,
    rng: np.random.Generator,
    disk: _Disk,
    changed: np.ndarray,
    parent: RecoveryPoint | None,
    t: datetime,
    first: bool,
) -> RecoveryPoint:
    m = len(changed)
    roll = rng.random(m)
    zero = np.zeros(m, bool) if first else roll < spec.zero_share
    dedup = ~zero & (roll < spec.zero_share + spec.dedup_share)
    ids = rng.integers(0, 256, (m, 32), dtype=np.uint8)
    donors = np.flatnonzero(disk.has)
    if len(donors):
        ids[dedup] = disk.ids[donors[rng.integers(0, len(donors), int(dedup.sum()))]]
    else:
        dedup[:] = False
    # Only real changes are rows: zeros over zeros and identical content are not changes.
    was = disk.has[changed]
    same = (zero & ~was) | (~zero & was & (disk.ids[changed] == ids).all(axis=1))
    changed, zero, dedup, ids = changed[~same], zero[~same], dedup[~same], ids[~same]
    new = ~zero & ~dedup
    raw = np.full(len(changed), spec.chunk_bytes, np.int64)
    stored = np.where(new, (raw * rng.uniform(0.3, 0.7, len(changed))).astype(np.int64), 0)
    old_data = int(was[~same].sum()) * spec.chunk_bytes
    disk.has[changed] = ~zero
    disk.ids[changed] = np.where(zero[:, None], 0, ids)

    storage = repo.storage
    changes = ChangeTableWriter(storage)
    changes.add(changed * spec.chunk_bytes, chunk_keys(ids), zero, new, stored, raw)
    changes_id, changes_bytes = changes.commit()
    seg_id, seg_bytes = _write_index(repo, ids[new], stored[new], raw[new])
    leaves_id, root_id, manifest_bytes, new_leaves, shared = _write_manifest(repo, disk, changed)
    data_before = parent.stats.bytes_data if parent is not None else 0
    changed_bytes = int(raw.sum())
    point = RecoveryPoint(
        source="vm-disk-0",
        source_path="/synthetic/vm-disk-0",
        time=t.isoformat(timespec="microseconds"),
        size=spec.disk_bytes,
        chunk_size=spec.chunk_bytes,
        leaf_chunks=repo.config.leaf_chunks,
        root=root_id,
        leaves=leaves_id,
        parent=parent.id if parent is not None else None,
        index_segment=seg_id,
        engine="local",
        mode="full" if first else "changed-extents",
        changes=changes_id,
        stats=PointStats(
            bytes_read=changed_bytes,
            bytes_new=int(raw[new].sum()),
            bytes_stored=int(stored.sum()),
            bytes_zero=int(raw[zero].sum()),
            bytes_changed=changed_bytes,
            bytes_data=data_before + int(raw[~zero].sum()) - old_data,
            chunks=len(changed),
            chunks_new=int(new.sum()),
            leaves_new=new_leaves,
            leaves_shared=shared,
            metadata_bytes=changes_bytes + seg_bytes + manifest_bytes,
            seconds=round(2.0 + changed_bytes / 400e6 * (1 + 0.3 * rng.random()), 3),
        ),
    )
    return commit_point(storage, point)


def _write_index(
    repo: Repository, ids: np.ndarray, stored: np.ndarray, raw: np.ndarray
) -> tuple[str | None, int]:
    """Index rows for the new chunks, in made-up packs of about 64 MiB."""
    if not len(ids):
        return None, 0
    pack_no = np.cumsum(stored) // (64 << 20)
    names = [
        blake3.blake3(ids[0].tobytes() + bytes([k % 256, k // 256])).hexdigest()
        for k in range(int(pack_no[-1]) + 1)
    ]
    starts = np.concatenate([[0], np.cumsum(stored)[:-1]])
    first_of_pack = np.searchsorted(pack_no, pack_no)
    offsets = 16 + starts - starts[first_of_pack]
    seg = IndexSegmentWriter(repo.storage)
    seg.add(
        pa.table(
            [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32), len(ids), [None, pa.py_buffer(np.ascontiguousarray(ids))]
                ),
                pa.DictionaryArray.from_arrays(pa.array(pack_no), pa.array(names)).cast(
                    pa.string()
                ),
                pa.array(offsets, pa.int64()),
                pa.array(stored, pa.int32()),
                pa.array(raw, pa.int32()),
                pa.array(np.ones(len(ids), np.int8)),
            ],
            schema=INDEX_SCHEMA,
        )
    )
    return seg.commit()


def _write_manifest(
    repo: Repository, disk: _Disk, changed: np.ndarray
) -> tuple[str | None, str, int, int, int]:
    """The leaves the changes touched (rewritten whole, as a backup does) and the root."""
    lc = repo.config.leaf_chunks
    touched = np.unique(changed // lc)
    slots = (touched[:, None] * lc + np.arange(lc)[None, :]).reshape(-1)
    slots = slots[slots < len(disk.has)]
    data = disk.has[slots]
    leaf_of = slots // lc
    live = np.unique(leaf_of[data])  # touched leaves that still hold data
    ordinal = np.full(len(disk.leaf_file), -1, np.int64)
    ordinal[live] = np.arange(len(live))
    writer = ParquetStreamWriter(repo.storage, LEAF_SCHEMA, 16384, delta_columns=("leaf", "slot"))
    rows = slots[data]
    ids = np.ascontiguousarray(disk.ids[rows])
    writer.write(
        pa.table(
            [
                pa.array(ordinal[rows // lc].astype(np.int32)),
                pa.array((rows % lc).astype(np.int16)),
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32), len(rows), [None, pa.py_buffer(ids)]
                ),
            ],
            schema=LEAF_SCHEMA,
        )
    )
    leaves_id, leaves_bytes = writer.commit(LEAVES_PREFIX) if len(rows) else (None, 0)
    if not len(rows):
        writer.abort()
    own = len(disk.files)
    disk.leaf_file[touched] = -1
    disk.leaf_file[live] = own
    disk.leaf_ord[live] = ordinal[live]
    if leaves_id is not None:
        disk.files.append(leaves_id)
    present = np.flatnonzero(disk.leaf_file >= 0)
    files = pa.array(disk.files or [""], pa.string())
    file_idx = disk.leaf_file[present]
    names = pa.DictionaryArray.from_arrays(pa.array(file_idx, mask=file_idx == own), files).cast(
        pa.string()
    )
    root = ParquetStreamWriter(
        repo.storage,
        ROOT_SCHEMA,
        1 << 20,
        delta_columns=("leaf_no", "leaf"),
        dictionary_columns=("leaf_file",),
    )
    root.write(
        pa.table(
            [pa.array(present, pa.int64()), names, pa.array(disk.leaf_ord[present], pa.int32())],
            schema=ROOT_SCHEMA,
        )
    )
    root_id, root_bytes = root.commit(ROOTS_PREFIX)
    return leaves_id, root_id, leaves_bytes + root_bytes, len(live), len(present) - len(live)


def scaled(spec: Spec, points: int | None, disk_bytes: int | None) -> Spec:
    return replace(
        spec,
        points=points if points is not None else spec.points,
        disk_bytes=disk_bytes if disk_bytes is not None else spec.disk_bytes,
    )
