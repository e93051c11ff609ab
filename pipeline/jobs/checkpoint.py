"""Checkpoints of a running backup or copy, so that one killed half-way resumes.

Every ``COMB_CHECKPOINT_SECONDS`` (default 300) the index rows of the packs sealed since the
last checkpoint are committed as an index segment of their own (FORMAT.md 11: a pack is durable
before any row names it). A backup killed later leaves its sealed packs indexed, so the next
backup or copy of the same data deduplicates against them and sends only the rest. Such a
segment is an ordinary one: a prune treats it by the packs it lists (they are garbage until a
point uses them, and a running backup's session protects them, FORMAT.md 13). The backup's own
segment still lists every row it wrote, so once its points are committed it removes its
checkpoints (a crash in between leaves rows listed twice, which readers allow).

Owns when checkpoints are written and their removal. Must not: decide what a backup stores or
commit points (``pipeline.jobs.runner``).
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from catalog.errors import CombError, UsageError
from catalog.store.blocks import block_list_name
from catalog.store.index import INDEX_PREFIX, IndexSegmentWriter
from catalog.store.storage import Storage

CHECKPOINT_ENV = "COMB_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_S = 300.0


def checkpoint_seconds() -> float | None:
    """Seconds between checkpoints (``COMB_CHECKPOINT_SECONDS``; 0: after every sealed pack;
    ``off``: none)."""
    raw = os.environ.get(CHECKPOINT_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_S
    if raw.lower() == "off":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{CHECKPOINT_ENV} must be a number of seconds >= 0 or off, not {raw!r}")
    return value


class Checkpoints:
    """The checkpoint segments of one engine run."""

    def __init__(self, storage: Storage, every_s: float | None) -> None:
        self._storage = storage
        self._every = every_s
        self._open: IndexSegmentWriter | None = None
        self._since = time.monotonic()
        self.committed: list[str] = []  # segment ids

    def add(self, rows: pa.Table) -> None:
        """Index rows of packs just sealed; commits a checkpoint when one is due."""
        if self._every is None or not rows.num_rows:
            return
        if self._open is None:
            self._open = IndexSegmentWriter(self._storage)
        self._open.add(rows)
        if time.monotonic() - self._since >= self._every:
            segment_id, _bytes = self._open.commit()
            self._open = None
            self._since = time.monotonic()
            if segment_id is not None:
                self.committed.append(segment_id)

    def abort(self) -> None:
        """A failed run: the open checkpoint goes, the committed ones stay (to resume from)."""
        if self._open is not None:
            self._open.abort()
            self._open = None

    def discard(self, final: str | None) -> None:
        """The run's points are committed, its own segment (``final``) lists every row: its
        checkpoints go (a failed removal leaves rows listed twice; never an error)."""
        self.abort()
        for segment_id in self.committed:
            if segment_id == final:  # (the same rows, hence the same name: it is the final)
                continue
            name = f"{INDEX_PREFIX}/{segment_id}.parquet"
            for each in (name, block_list_name(name)):
                try:
                    self._storage.remove(each)
                except (OSError, CombError):
                    pass
        self.committed = []
