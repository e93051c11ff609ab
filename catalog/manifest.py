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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptionError
from .index import ids_to_array
from .parquet_io import ParquetStreamWriter, open_parquet, read_parquet
from .storage import Storage

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
            storage, LEAF_SCHEMA, LEAF_ROW_GROUP_ROWS, delta_columns=("leaf", "slot")
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

    def abort(self) -> None:
        self._leaves.abort()
        self._root.abort()


class _LeafFile:
    """Random access to the leaves of one leaves file, by ordinal, through its row groups."""

    def __init__(self, storage: Storage, file_id: str) -> None:
        self.name = leaves_name(file_id)
        self._pf: pq.ParquetFile = open_parquet(storage, self.name)
        md = self._pf.metadata
        col = md.schema.to_arrow_schema().get_field_index("leaf")
        self._ranges: list[tuple[int, int]] = []
        for rg in range(md.num_row_groups):
            stats = md.row_group(rg).column(col).statistics
            if stats is None or not stats.has_min_max:
                raise CorruptionError(f"{self.name}: row group {rg} has no leaf statistics")
            self._ranges.append((int(stats.min), int(stats.max)))
        self._cached_rg = -1
        self._leaf_col = np.empty(0, np.int32)
        self._slot_col = np.empty(0, np.int16)
        self._ids = np.empty((0, 32), np.uint8)

    def _load(self, rg: int) -> None:
        try:
            t = self._pf.read_row_group(rg)
        except (pa.ArrowException, OSError) as err:
            raise CorruptionError(f"{self.name}: row group {rg} unreadable ({err})") from None
        self._leaf_col = t.column("leaf").to_numpy()
        self._slot_col = t.column("slot").to_numpy()
        self._ids = ids_to_array(t.column("chunk_id")).copy()
        self._cached_rg = rg

    def leaf(self, ordinal: int) -> Leaf:
        if not (self._cached_rg >= 0 and self._in(self._cached_rg, ordinal)):
            for rg in range(len(self._ranges)):
                if self._in(rg, ordinal):
                    self._load(rg)
                    break
            else:
                raise CorruptionError(f"{self.name}: leaf {ordinal} is missing")
        lo = int(np.searchsorted(self._leaf_col, ordinal, "left"))
        hi = int(np.searchsorted(self._leaf_col, ordinal, "right"))
        if lo == hi:
            # A leaf may straddle row groups: gather it from every row group that has it.
            raise CorruptionError(f"{self.name}: leaf {ordinal} is missing")
        slots, ids = self._slot_col[lo:hi], self._ids[lo:hi]
        more = [
            rg for rg in range(len(self._ranges)) if rg != self._cached_rg and self._in(rg, ordinal)
        ]
        if more:
            parts_s, parts_i = [slots.copy()], [ids.copy()]
            for rg in more:
                self._load(rg)
                lo = int(np.searchsorted(self._leaf_col, ordinal, "left"))
                hi = int(np.searchsorted(self._leaf_col, ordinal, "right"))
                parts_s.append(self._slot_col[lo:hi].copy())
                parts_i.append(self._ids[lo:hi].copy())
            order = np.argsort(np.concatenate(parts_s), kind="stable")
            return Leaf(np.concatenate(parts_s)[order], np.concatenate(parts_i)[order])
        return Leaf(slots, ids)

    def _in(self, rg: int, ordinal: int) -> bool:
        lo, hi = self._ranges[rg]
        return lo <= ordinal <= hi


class ManifestReader:
    """Reads one point's manifest leaf by leaf, with a small cache of open leaves files."""

    def __init__(self, storage: Storage, root_id: str, own_leaves: str | None) -> None:
        self._storage = storage
        self.root_name = roots_name(root_id)
        # Only the known columns: a later compat feature may add columns old readers ignore.
        root = read_parquet(storage, self.root_name, ROOT_SCHEMA.names)
        self.leaf_nos = root.column("leaf_no").to_numpy()
        files = root.column("leaf_file").to_pylist()
        if own_leaves is None and any(f is None for f in files):
            raise CorruptionError(f"{self.root_name} refers to own leaves but the point has none")
        self.leaf_files: list[str] = [own_leaves if f is None else f for f in files]  # type: ignore[misc]
        self.leaf_ordinals = root.column("leaf").to_numpy()
        if len(self.leaf_nos) > 1 and not np.all(np.diff(self.leaf_nos) > 0):
            raise CorruptionError(f"{self.root_name} is not sorted by leaf number")
        self._files: OrderedDict[str, _LeafFile] = OrderedDict()

    def __len__(self) -> int:
        return len(self.leaf_nos)

    def refs(self) -> list[LeafRef]:
        return [
            LeafRef(int(n), f, int(o))
            for n, f, o in zip(self.leaf_nos, self.leaf_files, self.leaf_ordinals, strict=True)
        ]

    def ref_at(self, leaf_no: int) -> LeafRef | None:
        pos = int(np.searchsorted(self.leaf_nos, leaf_no))
        if pos < len(self.leaf_nos) and self.leaf_nos[pos] == leaf_no:
            return LeafRef(leaf_no, self.leaf_files[pos], int(self.leaf_ordinals[pos]))
        return None

    def leaf(self, ref: LeafRef) -> Leaf:
        lf = self._files.get(ref.leaf_file)
        if lf is None:
            lf = _LeafFile(self._storage, ref.leaf_file)
            self._files[ref.leaf_file] = lf
            if len(self._files) > 32:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(ref.leaf_file)
        return lf.leaf(ref.leaf)

    def leaf_at(self, leaf_no: int) -> Leaf:
        ref = self.ref_at(leaf_no)
        return EMPTY_LEAF if ref is None else self.leaf(ref)


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
