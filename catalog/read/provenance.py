"""Which backup wrote which metadata file, for the reads of one recovery point: the index
segment to search first for the chunks of a leaves file, the newest segments first for the
rest, and the block lists (``catalog.store.blocks``) of leaves files and segments.

All of it comes from point documents: the read point's own at once, the others (live and
forgotten: a forgotten point's leaves may still be in use) read once and only when a read needs
them, for leaves shared with earlier points or chunks found elsewhere (dedup hits). Leaves files
are older than the points that use them, so later points add nothing.

Owns that knowledge and the one reading of the point documents. Must not: read manifests, index
segments or packs, or change anything.
"""

from __future__ import annotations

import re

from catalog.read.lookup import segment_name
from catalog.store.points import RecoveryPoint, load_forgotten, load_points_tolerant
from catalog.store.storage import Storage

_HEX64 = re.compile(r"[0-9a-f]{64}")


class Provenance:
    """What the point documents say about the files a point's reads need. Not thread-safe
    (its reader serialises)."""

    def __init__(self, storage: Storage, point: RecoveryPoint, block_lists: bool = True) -> None:
        """``block_lists``: False ignores every block list (files are then checked whole)."""
        self._storage = storage
        self._use_block_lists = block_lists
        own = segment_name(point.index_segment) if point.index_segment else None
        self._segment_of: dict[str, str | None] = {point.leaves: own} if point.leaves else {}
        self._leaves_blocks: dict[str, str | None] = {}
        # Segment name -> its block list, as known so far: it grows when the point documents
        # are read (``catalog.read.locator.Locator`` holds this very mapping).
        self.segment_blocks: dict[str, str] = {}
        self._by_time: list[str] | None = None
        self._note_blocks(point)

    def segment_of(self, leaves_id: str) -> str | None:
        """The index segment of the backup that wrote a leaves file (None: its point is gone)."""
        if leaves_id not in self._segment_of:
            self._read_point_documents()
            self._segment_of.setdefault(leaves_id, None)  # its point is gone: search them all
        return self._segment_of[leaves_id]

    def leaves_blocks(self, leaves_id: str) -> str | None:
        """A leaves file's block list, if the point that wrote it names one."""
        if leaves_id not in self._leaves_blocks:
            self._read_point_documents()
            self._leaves_blocks.setdefault(leaves_id, None)  # its point is gone: checked whole
        return self._leaves_blocks[leaves_id]

    def segments_by_time(self) -> list[str]:
        """The index segments of the live points, newest first."""
        self._read_point_documents()
        return self._by_time or []

    def _note_blocks(self, p: RecoveryPoint) -> None:
        """The block lists a point document names for the files its backup wrote."""
        blocks = p.blocks if isinstance(p.blocks, dict) and self._use_block_lists else {}
        lists = {k: v for k, v in blocks.items() if isinstance(v, str) and _HEX64.fullmatch(v)}
        if p.leaves and "leaves" in lists:
            self._leaves_blocks.setdefault(p.leaves, lists["leaves"])
        if p.index_segment and "index_segment" in lists:
            self.segment_blocks.setdefault(segment_name(p.index_segment), lists["index_segment"])

    def _read_point_documents(self) -> None:
        if self._by_time is not None:
            return
        points, _damaged = load_points_tolerant(self._storage)
        forgotten, _damaged = load_forgotten(self._storage, points)
        for p in [*points, *forgotten]:
            self._note_blocks(p)
            if p.leaves:
                seg = segment_name(p.index_segment) if p.index_segment else None
                self._segment_of.setdefault(p.leaves, seg)
        newest = sorted(points, key=lambda p: p.time, reverse=True)
        self._by_time = [segment_name(p.index_segment) for p in newest if p.index_segment]
