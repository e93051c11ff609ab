"""Manifests: for one recovery point, disk offset -> chunk id over the whole disk.

A manifest is a two-level structure so that an incremental writes metadata in proportion to
what changed while every point still reads as a full image:

* **leaves** (``manifests/leaves/<id>.parquet``): one file per backup holding the leaves that
  backup created. A leaf covers ``leaf_chunks`` consecutive chunks (1 MiB of disk by default)
  and lists only its data chunks as (leaf ordinal, slot, chunk id); a missing slot is zeros.
* **root** (``manifests/roots/<id>.parquet``): one file per point with one row per non-empty
  leaf: (leaf number on disk, leaves file, ordinal in that file). A null leaves file means this
  point's own leaves file (named in the point document). Leaves untouched since the parent are
  referenced, not copied.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.errors import CorruptionError
from catalog.store.index import ids_to_array
from catalog.store.parquet_io import (
    ParquetStreamWriter,
    decryption,
    open_parquet,
    read_verified,
    unreadable,
)
from catalog.store.storage import Storage

LEAVES_PREFIX = "manifests/leaves"
ROOTS_PREFIX = "manifests/roots"
LEAF_SCHEMA = pa.schema(
    [
        pa.field("leaf", pa.int32(), nullable=False),
        pa.field("slot", pa.int16(), nullable=False),
        pa.field("chunk_id", pa.binary(32), nullable=False),
    ]
)
ROOT_SCHEMA = pa.schema(
    [
        pa.field("leaf_no", pa.int64(), nullable=False),
        pa.field("leaf_file", pa.string(), nullable=True),
        pa.field("leaf", pa.int32(), nullable=False),
    ]
)
LEAF_ROW_GROUP_ROWS = 16384
_FLUSH_ROWS = 8192


def leaves_name(file_id: str) -> str:
    return f"{LEAVES_PREFIX}/{file_id}.parquet"


def roots_name(file_id: str) -> str:
    return f"{ROOTS_PREFIX}/{file_id}.parquet"


@dataclass(frozen=True)
class Leaf:
    """The data chunks of one leaf: slots (int16 array) and ids ((k, 32) uint8 array)."""

    slots: np.ndarray
    ids: np.ndarray

    def same_as(self, other: Leaf) -> bool:
        return np.array_equal(self.slots, other.slots) and np.array_equal(self.ids, other.ids)


EMPTY_LEAF = Leaf(np.empty(0, np.int16), np.empty((0, 32), np.uint8))


@dataclass(frozen=True)
class LeafRef:
    leaf_no: int
    leaf_file: str  # resolved: never the "own file" null
    leaf: int


class ManifestWriter:
    """Streams one point's manifest: new leaves into one leaves file, refs into the root."""

    def __init__(self, storage: Storage) -> None:
        self._leaves = ParquetStreamWriter(
            storage,
            LEAF_SCHEMA,
            LEAF_ROW_GROUP_ROWS,
            delta_columns=("leaf", "slot"),
            block_list=True,
        )
        self._root = ParquetStreamWriter(
            storage,
            ROOT_SCHEMA,
            1 << 20,
            delta_columns=("leaf_no", "leaf"),
            dictionary_columns=("leaf_file",),
        )
        self._leaf_cols: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        self._leaf_rows = 0
        self._root_cols: tuple[list[int], list[str | None], list[int]] = ([], [], [])
        self.new_leaves = 0
        self.ref_leaves = 0
        self._last_leaf_no = -1

    def add_leaf(self, leaf_no: int, leaf: Leaf) -> None:
        """A leaf whose content this point defines (empty leaves are skipped: all zeros)."""
        if len(leaf.slots) == 0:
            self._check_order(leaf_no)
            return
        self._check_order(leaf_no)
        ordinal = self.new_leaves
        self.new_leaves += 1
        self._leaf_cols[0].append(np.full(len(leaf.slots), ordinal, np.int32))
        self._leaf_cols[1].append(leaf.slots.astype(np.int16, copy=False))
        self._leaf_cols[2].append(leaf.ids)
        self._leaf_rows += len(leaf.slots)
        self._root_row(leaf_no, None, ordinal)
        if self._leaf_rows >= _FLUSH_ROWS:
            self._flush_leaves()

    def add_ref(self, ref: LeafRef) -> None:
        """A leaf shared with an earlier point, unchanged."""
        self._check_order(ref.leaf_no)
        self.ref_leaves += 1
        self._root_row(ref.leaf_no, ref.leaf_file, ref.leaf)

    def add_refs(self, src: ManifestReader, start: int, end: int) -> None:
        """Root rows ``[start, end)`` of an earlier point's manifest, shared unchanged (the
        runs of leaves an incremental does not touch: one call, not one per leaf)."""
        if end <= start:
            return
        nos = src.leaf_nos[start:end]
        self._check_order(int(nos[0]))
        self._last_leaf_no = int(nos[-1])
        self.ref_leaves += end - start
        self._root_cols[0].extend(nos.tolist())
        self._root_cols[1].extend([src.file_ids[c] for c in src.file_codes[start:end].tolist()])
        self._root_cols[2].extend(src.leaf_ordinals[start:end].tolist())
        if len(self._root_cols[0]) >= _FLUSH_ROWS:
            self._flush_root()

    def _check_order(self, leaf_no: int) -> None:
        if leaf_no <= self._last_leaf_no:
            raise ValueError(f"leaf {leaf_no} added out of order")
        self._last_leaf_no = leaf_no

    def _root_row(self, leaf_no: int, leaf_file: str | None, ordinal: int) -> None:
        self._root_cols[0].append(leaf_no)
        self._root_cols[1].append(leaf_file)
        self._root_cols[2].append(ordinal)
        if len(self._root_cols[0]) >= _FLUSH_ROWS:
            self._flush_root()

    def _flush_leaves(self) -> None:
        if not self._leaf_rows:
            return
        ids = np.ascontiguousarray(np.concatenate(self._leaf_cols[2]))
        table = pa.table(
            [
                pa.array(np.concatenate(self._leaf_cols[0])),
                pa.array(np.concatenate(self._leaf_cols[1])),
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32), len(ids), [None, pa.py_buffer(ids.tobytes())]
                ),
            ],
            schema=LEAF_SCHEMA,
        )
        self._leaves.write(table)
        self._leaf_cols = ([], [], [])
        self._leaf_rows = 0

    def _flush_root(self) -> None:
        if not self._root_cols[0]:
            return
        self._root.write(
            pa.table(
                [
                    pa.array(self._root_cols[0], pa.int64()),
                    pa.array(self._root_cols[1], pa.string()),
                    pa.array(self._root_cols[2], pa.int32()),
                ],
                schema=ROOT_SCHEMA,
            )
        )
        self._root_cols = ([], [], [])

    def commit(self) -> tuple[str | None, str, int]:
        """Commit both files; returns (leaves id or None, root id, metadata bytes written)."""
        self._flush_leaves()
        self._flush_root()
        written = 0
        leaves_id: str | None = None
        if self._leaves.rows:
            leaves_id, size = self._leaves.commit(LEAVES_PREFIX)
            written += size
        else:
            self._leaves.abort()
        root_id, size = self._root.commit(ROOTS_PREFIX)
        return leaves_id, root_id, written + size

    @property
    def leaves_blocks(self) -> str | None:
        """The committed leaves file's block list (``catalog.store.blocks``)."""
        return self._leaves.blocks_id

    def abort(self) -> None:
        self._leaves.abort()
        self._root.abort()


class _LeafFile:
    """Random access to the leaves of one leaves file, by ordinal, through its row groups (the
    last one decoded is kept, as before: neighbouring leaves share it)."""

    GROUPS_KEPT = 1

    def __init__(self, storage: Storage, file_id: str, blocks_id: str | None = None) -> None:
        """``blocks_id``: the file's block list, to read it in part (``catalog.store.blocks``)."""
        self.name = leaves_name(file_id)
        self._pf: pq.ParquetFile = open_parquet(storage, self.name, blocks_id)
        md = self._pf.metadata
        col = md.schema.to_arrow_schema().get_field_index("leaf")
        ranges = []
        for rg in range(md.num_row_groups):
            stats = md.row_group(rg).column(col).statistics
            if stats is None or not stats.has_min_max:
                raise CorruptionError(f"{self.name}: row group {rg} has no leaf statistics")
            ranges.append((int(stats.min), int(stats.max)))
        # Rows are sorted by leaf, so both ends of the row groups' ranges ascend.
        self._rg_min = np.array([lo for lo, _ in ranges], np.int64)
        self._rg_max = np.array([hi for _, hi in ranges], np.int64)
        self._groups: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _group(self, rg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self._groups.get(rg)
        if got is not None:
            self._groups.move_to_end(rg)
            return got
        try:
            t = self._pf.read_row_group(rg)
        except (pa.ArrowException, OSError) as err:
            raise CorruptionError(f"{self.name}: row group {rg} unreadable ({err})") from None
        got = (
            t.column("leaf").to_numpy(),
            t.column("slot").to_numpy(),
            ids_to_array(t.column("chunk_id")).copy(),
        )
        self._groups[rg] = got
        if len(self._groups) > self.GROUPS_KEPT:
            self._groups.popitem(last=False)
        return got

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ordinal, slot, chunk id) of every row of the leaves ``lo`` to ``hi`` (inclusive), in
        file order, gathered from every row group whose range overlaps (a leaf may straddle)."""
        first = int(np.searchsorted(self._rg_max, lo, "left"))
        last = int(np.searchsorted(self._rg_min, hi, "right"))
        parts = []
        for rg in range(first, last):
            leaf_col, slot_col, ids = self._group(rg)
            a = int(np.searchsorted(leaf_col, lo, "left"))
            b = int(np.searchsorted(leaf_col, hi, "right"))
            if b > a:
                parts.append((leaf_col[a:b], slot_col[a:b], ids[a:b]))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, np.int32), np.empty(0, np.int16), np.empty((0, 32), np.uint8)
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )

    def leaf(self, ordinal: int) -> Leaf:
        _, slots, ids = self.rows(ordinal, ordinal)
        if not len(slots):
            raise CorruptionError(f"{self.name}: leaf {ordinal} is missing")
        return Leaf(slots, ids)


def _concat_ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The indices of every range [start[i], end[i]), concatenated in order."""
    counts = end - start
    return np.repeat(start - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


class ManifestReader:
    """Reads one point's manifest leaf by leaf, with a small cache of open leaves files.

    Opening reads only the root (a few bytes per MiB of disk with data; leaves files are kept as
    dictionary codes); leaves files are opened when a leaf of theirs is first wanted. Not
    thread-safe: concurrent readers serialise."""

    def __init__(self, storage: Storage, root_id: str, own_leaves: str | None) -> None:
        self._storage = storage
        self.root_name = roots_name(root_id)
        data = read_verified(storage, self.root_name)
        try:
            # Only the known columns: a later compat feature may add columns old readers ignore.
            root = pq.read_table(
                pa.BufferReader(data),
                columns=ROOT_SCHEMA.names,
                read_dictionary=["leaf_file"],
                page_checksum_verification=True,
                decryption_properties=decryption(storage),
            )
        except (pa.ArrowException, OSError) as err:
            raise unreadable(self.root_name, err, storage.keys is not None) from None
        self.leaf_nos = root.column("leaf_no").to_numpy()
        files = root.column("leaf_file").unify_dictionaries().combine_chunks()
        # Codes into ``file_ids``; the last entry stands for the point's own leaves (null).
        self.file_ids: list[str] = [*files.dictionary.to_pylist(), own_leaves or ""]
        self.file_codes = pc.fill_null(files.indices, len(self.file_ids) - 1).to_numpy()
        if own_leaves is None and files.null_count:
            raise CorruptionError(f"{self.root_name} refers to own leaves but the point has none")
        self.leaf_ordinals = root.column("leaf").to_numpy()
        if len(self.leaf_nos) > 1 and not np.all(np.diff(self.leaf_nos) > 0):
            raise CorruptionError(f"{self.root_name} is not sorted by leaf number")
        self._files: OrderedDict[str, _LeafFile] = OrderedDict()
        self.files_opened: set[str] = set()  # leaves files opened so far (tests, benchmarks)
        # Block list of a leaves file, when the caller knows it from the point that wrote it:
        # then only the blocks read are checked, not the whole file (catalog.store.blocks).
        self.block_list_of: Callable[[str], str | None] = lambda _file_id: None

    def __len__(self) -> int:
        return len(self.leaf_nos)

    @property
    def leaf_files(self) -> list[str]:
        """The leaves file of every root row (resolved: never the null of "own leaves")."""
        return [self.file_ids[c] for c in self.file_codes.tolist()]

    def refs(self) -> list[LeafRef]:
        return [
            LeafRef(int(n), f, int(o))
            for n, f, o in zip(self.leaf_nos, self.leaf_files, self.leaf_ordinals, strict=True)
        ]

    def ref_at(self, leaf_no: int) -> LeafRef | None:
        pos = int(np.searchsorted(self.leaf_nos, leaf_no))
        if pos < len(self.leaf_nos) and self.leaf_nos[pos] == leaf_no:
            file_id = self.file_ids[int(self.file_codes[pos])]
            return LeafRef(leaf_no, file_id, int(self.leaf_ordinals[pos]))
        return None

    def _file(self, file_id: str) -> _LeafFile:
        lf = self._files.get(file_id)
        if lf is None:
            lf = _LeafFile(self._storage, file_id, self.block_list_of(file_id))
            self._files[file_id] = lf
            self.files_opened.add(file_id)
            if len(self._files) > 32:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(file_id)
        return lf

    def leaf(self, ref: LeafRef) -> Leaf:
        return self._file(ref.leaf_file).leaf(ref.leaf)

    def leaf_at(self, leaf_no: int) -> Leaf:
        ref = self.ref_at(leaf_no)
        return EMPTY_LEAF if ref is None else self.leaf(ref)

    def chunks(
        self, leaf_lo: int, leaf_hi: int, leaf_chunks: int
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The data chunks of leaf numbers [leaf_lo, leaf_hi): their chunk numbers (int64,
        ascending), their ids ((k, 32) uint8) and the leaves files that were read. Costs the
        leaves in the range (their row groups), never the whole manifest."""
        a, b = np.searchsorted(self.leaf_nos, [leaf_lo, leaf_hi]).tolist()
        codes = self.file_codes[a:b]
        numbers, ids, used = [], [], []
        for code in np.unique(codes).tolist():
            sel = np.flatnonzero(codes == code) + a
            file_id = self.file_ids[code]
            used.append(file_id)
            ords = self.leaf_ordinals[sel]
            leaf_col, slots, rows = self._file(file_id).rows(int(ords.min()), int(ords.max()))
            start = np.searchsorted(leaf_col, ords, "left")
            end = np.searchsorted(leaf_col, ords, "right")
            if np.any(start == end):
                gone = int(ords[np.flatnonzero(start == end)[0]])
                raise CorruptionError(f"{leaves_name(file_id)}: leaf {gone} is missing")
            take = _concat_ranges(start, end)
            leaf_no = np.repeat(self.leaf_nos[sel].astype(np.int64), end - start)
            numbers.append(leaf_no * leaf_chunks + slots[take])
            ids.append(rows[take])
        if not numbers:
            return np.empty(0, np.int64), np.empty((0, 32), np.uint8), used
        nums = np.concatenate(numbers)
        order = np.argsort(nums, kind="stable")
        return nums[order], np.concatenate(ids)[order], used


def manifest_data_bytes(
    reader: ManifestReader, size: int, chunk_size: int, leaf_chunks: int
) -> int:
    """Bytes of data (non-zero chunks) in a whole image, counted leaf by leaf."""
    total = 0
    last_chunk = (size - 1) // chunk_size if size else -1
    for ref in reader.refs():
        leaf = reader.leaf(ref)
        total += len(leaf.slots) * chunk_size
        if ref.leaf_no == last_chunk // leaf_chunks and (last_chunk % leaf_chunks) in leaf.slots:
            total -= (last_chunk + 1) * chunk_size - size
    return total
