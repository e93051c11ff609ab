"""Manifests: for one recovery point, disk offset -> chunk id over the whole disk.

A manifest is a two-level structure so that an incremental writes metadata in proportion to
what changed while every point still reads as a full image:

* **leaves** (``manifests/leaves/<id>.parquet``): one file per backup holding the leaves that
  backup created. A leaf covers ``leaf_chunks`` consecutive chunks (1 MiB of disk by default)
  and lists only its data chunks as (leaf ordinal, slot, chunk id); a missing slot is zeros.
* **root** (``manifests/roots/<id>.parquet``): one file per point with one row per non-empty
  leaf: (leaf number on disk, leaves file, ordinal in that file). A null leaves file means this
  point's own leaves file (named in the point document). Leaves untouched since the parent are
  referenced, not copied. One leaves file, read by itself, is ``catalog.store.leaves``.

Must not: know which point wrote a leaves file (a reader's caller passes its block list).
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
from catalog.store.leaves import EMPTY_LEAF, LEAVES_PREFIX, Leaf, LeafFile, leaves_name
from catalog.store.parquet_io import ParquetStreamWriter, read_verified, unreadable
from catalog.store.storage import Storage

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


def roots_name(file_id: str) -> str:
    return f"{ROOTS_PREFIX}/{file_id}.parquet"


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


def concat_ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The indices of every range [start[i], end[i]), concatenated in order."""
    counts = end - start
    return np.repeat(start - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


class ManifestReader:
    """Reads one point's manifest leaf by leaf, with a small cache of open leaves files.

    Opening reads only the root (a few bytes per MiB of disk with data; leaves files are kept as
    dictionary codes); leaves files are opened when a leaf of theirs is first wanted. Not
    thread-safe: concurrent readers serialise."""

    def __init__(
        self,
        storage: Storage,
        root_id: str,
        own_leaves: str | None,
        block_list_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """``block_list_of``: a leaves file's block list, if the point that wrote it names one
        (then only the blocks read are checked, not the whole file: ``catalog.store.blocks``)."""
        self._storage = storage
        self._block_list_of = block_list_of
        self.root_name = roots_name(root_id)
        data = read_verified(storage, self.root_name)
        try:
            # Only the known columns: a later compat feature may add columns old readers ignore.
            root = pq.read_table(
                pa.BufferReader(data),
                columns=ROOT_SCHEMA.names,
                read_dictionary=["leaf_file"],
                page_checksum_verification=True,
                decryption_properties=storage.sealer.parquet_decryption(),
            )
        except (pa.ArrowException, OSError) as err:
            raise unreadable(self.root_name, err, storage.sealer.encrypted) from None
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
        self._files: OrderedDict[str, LeafFile] = OrderedDict()
        self.files_opened: set[str] = set()  # leaves files opened so far (tests, benchmarks)

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

    def _file(self, file_id: str) -> LeafFile:
        lf = self._files.get(file_id)
        if lf is None:
            blocks = self._block_list_of(file_id) if self._block_list_of is not None else None
            lf = LeafFile(self._storage, file_id, blocks)
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
            take = concat_ranges(start, end)
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
