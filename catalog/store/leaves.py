"""Leaves files (``manifests/leaves/<id>.parquet``): the leaves one backup created, each leaf the
data chunks of ``leaf_chunks`` consecutive chunks of the disk as (leaf ordinal, slot, chunk id)
rows, sorted by ordinal (``catalog.store.manifest`` writes them and puts them in order).

Owns a leaves file's name, a leaf in memory (``Leaf``) and random access to one leaves file by
ordinal (``LeafFile``). Must not: know roots or points (which leaf of which file is where on
a disk: ``catalog.store.manifest``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import CorruptionError
from catalog.store.index import ids_to_array
from catalog.store.parquet_io import open_parquet
from catalog.store.storage import Storage

LEAVES_PREFIX = "manifests/leaves"


def leaves_name(file_id: str) -> str:
    return f"{LEAVES_PREFIX}/{file_id}.parquet"


@dataclass(frozen=True)
class Leaf:
    """The data chunks of one leaf: slots (int16 array) and ids ((k, 32) uint8 array)."""

    slots: np.ndarray
    ids: np.ndarray

    def same_as(self, other: Leaf) -> bool:
        return np.array_equal(self.slots, other.slots) and np.array_equal(self.ids, other.ids)


EMPTY_LEAF = Leaf(np.empty(0, np.int16), np.empty((0, 32), np.uint8))


class LeafFile:
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
