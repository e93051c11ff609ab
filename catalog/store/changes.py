"""Change tables: what each recovery point changed, chunk by chunk, relative to its parent.

One Parquet file per point (``manifests/changes/<id>.parquet``), written by the backup that made
the point, with one row per chunk-sized region whose content differs from the parent's (for a
point without a parent: every data chunk). The manifest alone can answer "what is at offset X";
the change table answers "what changed, and when" without comparing manifests, so analytics over
a long history read data in proportion to the change, never points x disk size.

A row names the new content by a 64-bit key (the first 8 bytes of its chunk id, little-endian,
signed): enough to tell chunks apart across a history (collision odds about n^2 / 2^65 for n
chunks), and 4x smaller than the id. Null means the region became zeros.

Analytics only: nothing in the read or restore path depends on these files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from catalog.store.parquet_io import ParquetStreamWriter, read_parquet
from catalog.store.storage import Storage

CHANGES_PREFIX = "manifests/changes"
CHANGES_SCHEMA = pa.schema(
    [
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("chunk_key", pa.int64(), nullable=True),
        pa.field("new", pa.bool_(), nullable=False),
        pa.field("stored_len", pa.int32(), nullable=False),
    ]
)
CHANGES_ROW_GROUP_ROWS = 1 << 20
_FLUSH_ROWS = 65536


def changes_name(file_id: str) -> str:
    return f"{CHANGES_PREFIX}/{file_id}.parquet"


def chunk_keys(ids: np.ndarray) -> np.ndarray:
    """The 64-bit keys of chunk ids given as a (n, 32) uint8 array."""
    return np.ascontiguousarray(ids[:, :8]).view("<i8").reshape(-1)


class ChangeTableWriter:
    """Streams one point's change rows (added in offset order) into its change table."""

    def __init__(self, storage: Storage) -> None:
        self._file = ParquetStreamWriter(
            storage, CHANGES_SCHEMA, CHANGES_ROW_GROUP_ROWS, delta_columns=("offset", "stored_len")
        )
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0
        self._last_offset = -1
        self.rows = 0
        self.bytes_changed = 0

    def add(
        self,
        offsets: np.ndarray,
        keys: np.ndarray,
        zero: np.ndarray,
        new: np.ndarray,
        stored: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        """Rows for changed regions: ``zero`` marks regions that became zeros (key ignored)."""
        if not len(offsets):
            return
        if int(offsets[0]) <= self._last_offset or np.any(np.diff(offsets) <= 0):
            raise ValueError("change rows added out of order")
        self._last_offset = int(offsets[-1])
        self._parts.append((offsets, keys, zero, new, stored))
        self._pending += len(offsets)
        self.rows += len(offsets)
        self.bytes_changed += int(lengths.sum())
        if self._pending >= _FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        cols = [np.concatenate([p[i] for p in self._parts]) for i in range(5)]
        table = pa.table(
            [
                pa.array(cols[0].astype(np.int64, copy=False)),
                pa.array(cols[1].astype(np.int64, copy=False), mask=cols[2].astype(bool)),
                pa.array(cols[3].astype(bool, copy=False)),
                pa.array(cols[4].astype(np.int32, copy=False)),
            ],
            schema=CHANGES_SCHEMA,
        )
        self._file.write(table)
        self._parts = []
        self._pending = 0

    def commit(self) -> tuple[str, int]:
        """Commit the table (also when empty: "nothing changed" is known, not missing)."""
        self._flush()
        return self._file.commit(CHANGES_PREFIX)

    def abort(self) -> None:
        self._file.abort()


def read_changes(storage: Storage, file_id: str, columns: list[str] | None = None) -> pa.Table:
    """One point's change table, checked against its name before it is parsed."""
    return read_parquet(storage, changes_name(file_id), columns)
