"""Assembling a point's manifest on the driver, leaf by leaf, as results stream in.

Results arrive in disk order. A leaf is final once every work item that could touch it has
returned (the watermark passed its end); it is then written, or shared with the parent when its
content did not change. Memory holds only leaves inside the in-flight window.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa

from catalog.index import ids_to_array
from catalog.manifest import EMPTY_LEAF, Leaf, LeafRef, ManifestReader, ManifestWriter

from .plan import Range


class ManifestAssembler:
    """Turns the writer's result rows (offset, id, zero) into leaves of the new manifest.

    Modes: without ``changed`` a leaf's content is exactly the non-zero chunks read in it (full
    backup or full re-read); with ``changed`` (aligned changed ranges), a leaf the changes touch
    is the parent's leaf with the changed slots replaced, and every other leaf is shared.
    """

    def __init__(
        self,
        writer: ManifestWriter,
        chunk_size: int,
        leaf_chunks: int,
        parent: ManifestReader | None,
        changed: list[Range] | None,
    ) -> None:
        self.writer = writer
        self.chunk = chunk_size
        self.leaf_chunks = leaf_chunks
        self.leaf_bytes = chunk_size * leaf_chunks
        self.parent = parent
        self.pending: OrderedDict[int, list[tuple[np.ndarray, np.ndarray]]] = OrderedDict()
        self.changed_slots: dict[int, int] | None = None
        self._candidates: list[int] = []
        self._cand_pos = 0
        if changed is not None:
            self._plan_changed(changed)

    def _plan_changed(self, changed: list[Range]) -> None:
        slots: dict[int, int] = {}
        for start, end in changed:
            for c in range(start // self.chunk, -(-end // self.chunk)):
                leaf, slot = divmod(c, self.leaf_chunks)
                slots[leaf] = slots.get(leaf, 0) | (1 << slot)
        self.changed_slots = slots
        parent_leaves = self.parent.leaf_nos.tolist() if self.parent is not None else []
        self._candidates = sorted(set(parent_leaves) | set(slots))

    def feed(self, written: pa.Table) -> None:
        """Take one result table (rows in disk order)."""
        if written.num_rows == 0:
            return
        zero = written.column("zero").to_numpy(zero_copy_only=False)
        keep = np.flatnonzero(~zero)
        offs = written.column("offset").to_numpy()
        # Make sure every touched leaf has an entry, even if all its chunks were zero.
        for leaf in np.unique(offs // self.leaf_bytes).tolist():
            self.pending.setdefault(int(leaf), [])
        if not len(keep):
            return
        offs = offs[keep]
        ids = ids_to_array(written.column("chunk_id"))[keep]
        leaves = offs // self.leaf_bytes
        slots = ((offs % self.leaf_bytes) // self.chunk).astype(np.int16)
        cuts = np.flatnonzero(np.diff(leaves)) + 1
        for part in np.split(np.arange(len(offs)), cuts):
            leaf = int(leaves[part[0]])
            self.pending[leaf].append((slots[part], ids[part].copy()))

    def advance(self, watermark: int) -> None:
        """Emit every leaf that ends at or before ``watermark`` (bytes)."""
        last_leaf = watermark // self.leaf_bytes - 1  # leaves [0, last_leaf] are complete
        if self.changed_slots is None:
            while self.pending:
                leaf = next(iter(self.pending))
                if leaf > last_leaf:
                    break
                self._emit_full(leaf, self.pending.pop(leaf))
        else:
            while self._cand_pos < len(self._candidates):
                leaf = self._candidates[self._cand_pos]
                if leaf > last_leaf:
                    break
                self._cand_pos += 1
                self._emit_changed(leaf, self.pending.pop(leaf, []))

    def finish(self) -> None:
        self.advance(1 << 62)

    def _pending_leaf(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> Leaf:
        if not parts:
            return EMPTY_LEAF
        slots = np.concatenate([p[0] for p in parts])
        ids = np.concatenate([p[1] for p in parts])
        order = np.argsort(slots, kind="stable")
        return Leaf(slots[order], ids[order])

    def _parent_ref(self, leaf: int) -> LeafRef | None:
        return self.parent.ref_at(leaf) if self.parent is not None else None

    def _emit(self, leaf: int, content: Leaf) -> None:
        ref = self._parent_ref(leaf)
        if ref is not None and self.parent is not None and self.parent.leaf(ref).same_as(content):
            self.writer.add_ref(ref)
        else:
            self.writer.add_leaf(leaf, content)

    def _emit_full(self, leaf: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._emit(leaf, self._pending_leaf(parts))

    def _emit_changed(self, leaf: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        assert self.changed_slots is not None
        mask = self.changed_slots.get(leaf, 0)
        ref = self._parent_ref(leaf)
        if mask == 0:
            if ref is not None:
                self.writer.add_ref(ref)
            return
        base = (
            self.parent.leaf(ref) if (ref is not None and self.parent is not None) else EMPTY_LEAF
        )
        keep = np.array([not (mask >> int(s)) & 1 for s in base.slots], bool)
        new = self._pending_leaf(parts)
        slots = np.concatenate([base.slots[keep] if len(keep) else base.slots, new.slots])
        ids = np.concatenate([base.ids[keep] if len(keep) else base.ids, new.ids])
        order = np.argsort(slots, kind="stable")
        self._emit(leaf, Leaf(slots[order].astype(np.int16), ids[order]))
