"""The manifest builder: a point's manifest assembled leaf by leaf as backup results stream in.

Results arrive in disk order. A leaf is final once every work item that could touch it has
returned (the watermark passed its end); it is then written, or shared with the parent when its
content did not change. Memory holds only leaves inside the in-flight window.

Owns which leaves a new point writes and which it shares, and its change rows. Must not: read
sources, run stages or commit the point (``pipeline.jobs.runner`` does, after the data is in).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa

from catalog.store.changes import ChangeTableWriter, chunk_keys
from catalog.store.index import ids_to_array
from catalog.store.leaves import EMPTY_LEAF, Leaf
from catalog.store.manifest import LeafRef, ManifestReader, ManifestWriter, concat_ranges

Range = tuple[int, int]  # (start, end) of the disk, end exclusive

# One result run inside a leaf: slots, ids (k, 32), stored-here flags, stored bytes.
_Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class ManifestAssembler:
    """Turns the writer's result rows (offset, id, zero) into leaves of the new manifest.

    Modes: without ``changed`` a leaf's content is exactly the non-zero chunks read in it (full
    backup or full re-read); with ``changed`` (aligned changed ranges), a leaf the changes touch
    is the parent's leaf with the changed slots replaced, and every other leaf is shared.

    With ``changes``, every slot whose content differs from the parent's is also recorded in
    the point's change table, from the ids already at hand (no manifest is compared later).
    """

    def __init__(
        self,
        writer: ManifestWriter,
        chunk_size: int,
        leaf_chunks: int,
        parent: ManifestReader | None,
        changed: list[Range] | None,
        changes: ChangeTableWriter | None = None,
        size: int = 0,
        parent_size: int = 0,
    ) -> None:
        self.writer = writer
        self.changes = changes
        self.size = size
        self.parent_size = parent_size
        # Data bytes gained minus data bytes lost by the changes (with ``changes`` only).
        self.data_delta = 0
        self.chunk = chunk_size
        self.leaf_chunks = leaf_chunks
        self.leaf_bytes = chunk_size * leaf_chunks
        self.parent = parent
        self.pending: OrderedDict[int, list[_Part]] = OrderedDict()
        self.changed_slots: dict[int, int] | None = None
        self._candidates: list[int] = []
        self._cand_pos = 0
        self._ref_pos = 0
        # Full mode: parent leaves nothing was read in became zeros (recorded as changes).
        self._parent_leaves: list[int] = []
        self._parent_pos = 0
        if changed is not None:
            self._plan_changed(changed)
        elif parent is not None and changes is not None:
            self._parent_leaves = parent.leaf_nos.tolist()

    def _plan_changed(self, changed: list[Range]) -> None:
        slots: dict[int, int] = {}
        for start, end in changed:
            for c in range(start // self.chunk, -(-end // self.chunk)):
                leaf, slot = divmod(c, self.leaf_chunks)
                slots[leaf] = slots.get(leaf, 0) | (1 << slot)
        self.changed_slots = slots
        # Only the touched leaves are visited; the parent's other root rows are copied in runs
        # (``_share_parent_below``), so an incremental costs per change, not per leaf of disk.
        self._candidates = sorted(slots)
        self._ref_pos = 0  # next parent root row not yet shared or replaced

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
        new = written.column("new").to_numpy(zero_copy_only=False)[keep]
        stored = written.column("stored_len").to_numpy()[keep]
        leaves = offs // self.leaf_bytes
        slots = ((offs % self.leaf_bytes) // self.chunk).astype(np.int16)
        cuts = np.flatnonzero(np.diff(leaves)) + 1
        for part in np.split(np.arange(len(offs)), cuts):
            leaf = int(leaves[part[0]])
            self.pending[leaf].append((slots[part], ids[part].copy(), new[part], stored[part]))

    def advance(self, watermark: int) -> None:
        """Emit every leaf that ends at or before ``watermark`` (bytes)."""
        last_leaf = watermark // self.leaf_bytes - 1  # leaves [0, last_leaf] are complete
        if self.changed_slots is None:
            ready: list[tuple[int, list[_Part]]] = []
            while self.pending:
                leaf = next(iter(self.pending))
                if leaf > last_leaf:
                    break
                ready.append((leaf, self.pending.pop(leaf)))
            unchanged = self._unchanged(ready)
            for (leaf, parts), same in zip(ready, unchanged.tolist(), strict=True):
                self._zeroed_before(leaf, emitting=True)
                ref = self._parent_ref(leaf) if same else None
                if ref is not None:
                    self.writer.add_ref(ref)  # what _emit does for a leaf equal to the parent's
                else:
                    self._emit_full(leaf, parts)
            self._zeroed_before(last_leaf + 1)
        else:
            while self._cand_pos < len(self._candidates):
                leaf = self._candidates[self._cand_pos]
                if leaf > last_leaf:
                    break
                self._cand_pos += 1
                self._share_parent_below(leaf)
                if self.parent is not None and self._ref_pos < len(self.parent.leaf_nos):
                    if self.parent.leaf_nos[self._ref_pos] == leaf:
                        self._ref_pos += 1  # replaced (or re-shared) by _emit_changed
                self._emit_changed(leaf, self.pending.pop(leaf, []))
            self._share_parent_below(last_leaf + 1)

    def _unchanged(self, ready: list[tuple[int, list[_Part]]]) -> np.ndarray:
        """Per ready leaf (full mode): True where it holds exactly the parent's chunks. One
        numpy pass over all of them against the parent's rows of their range, instead of a
        leaf-by-leaf load and compare (a full re-read finds most leaves unchanged)."""
        out = np.zeros(len(ready), bool)
        if self.parent is None or not ready:
            return out
        lc = self.leaf_chunks
        leaves = np.array([leaf for leaf, _ in ready], np.int64)
        parts = [(leaf, p) for leaf, ps in ready for p in ps]
        if not parts:
            return out
        new_nums = np.concatenate([leaf * lc + p[0].astype(np.int64) for leaf, p in parts])
        new_ids = np.concatenate([p[1] for _, p in parts])
        order = np.argsort(new_nums, kind="stable")
        new_nums, new_ids = new_nums[order], new_ids[order]
        old_nums, old_ids, _ = self.parent.chunks(int(leaves[0]), int(leaves[-1]) + 1, lc)
        new_at = np.searchsorted(new_nums // lc, leaves, "left")
        new_end = np.searchsorted(new_nums // lc, leaves, "right")
        old_at = np.searchsorted(old_nums // lc, leaves, "left")
        old_end = np.searchsorted(old_nums // lc, leaves, "right")
        counts = new_end - new_at
        # (an empty leaf is never "unchanged": the parent has no leaf there, or lost its data)
        cand = np.flatnonzero((counts == old_end - old_at) & (counts > 0))
        if not len(cand):
            return out
        a = concat_ranges(new_at[cand], new_end[cand])
        b = concat_ranges(old_at[cand], old_end[cand])
        bad = (new_nums[a] != old_nums[b]) | (new_ids[a] != old_ids[b]).any(axis=1)
        starts = np.concatenate([[0], np.cumsum(counts[cand])[:-1]])
        out[cand] = np.add.reduceat(bad.astype(np.int64), starts) == 0
        return out

    def _share_parent_below(self, limit: int) -> None:
        """Share, unchanged, the parent's leaves numbered below ``limit`` not yet handled."""
        if self.parent is None:
            return
        end = int(np.searchsorted(self.parent.leaf_nos, limit))
        if end > self._ref_pos:
            self.writer.add_refs(self.parent, self._ref_pos, end)
            self._ref_pos = end

    def finish(self) -> None:
        self.advance(1 << 62)

    def _pending_leaf(self, parts: list[_Part]) -> tuple[Leaf, np.ndarray, np.ndarray]:
        """The leaf read in this backup, with per-slot "stored here" flags and stored bytes."""
        new = np.zeros(self.leaf_chunks, bool)
        stored = np.zeros(self.leaf_chunks, np.int32)
        if not parts:
            return EMPTY_LEAF, new, stored
        if len(parts) == 1:  # the usual case: one result table covered the leaf, in disk order
            slots, ids, here, nbytes = parts[0]
            new[slots], stored[slots] = here, nbytes
            if len(slots) < 2 or bool((slots[1:] > slots[:-1]).all()):
                return Leaf(slots, ids), new, stored
        slots = np.concatenate([p[0] for p in parts])
        ids = np.concatenate([p[1] for p in parts])
        new[slots] = np.concatenate([p[2] for p in parts])
        stored[slots] = np.concatenate([p[3] for p in parts])
        order = np.argsort(slots, kind="stable")
        return Leaf(slots[order], ids[order]), new, stored

    def _parent_ref(self, leaf: int) -> LeafRef | None:
        return self.parent.ref_at(leaf) if self.parent is not None else None

    def _emit(self, leaf: int, content: Leaf, new: np.ndarray, stored: np.ndarray) -> None:
        ref = self._parent_ref(leaf)
        old = self.parent.leaf(ref) if (ref is not None and self.parent is not None) else None
        if old is not None and ref is not None and old.same_as(content):
            self.writer.add_ref(ref)
            return
        self.writer.add_leaf(leaf, content)
        if self.changes is not None:
            self._record(leaf, old if old is not None else EMPTY_LEAF, content, new, stored)

    def _record(
        self, leaf: int, old: Leaf, content: Leaf, new: np.ndarray, stored: np.ndarray
    ) -> None:
        """Change rows for the slots of ``leaf`` whose content differs from ``old``."""
        assert self.changes is not None
        n = self.leaf_chunks
        if len(old.slots) == len(content.slots) and np.array_equal(old.slots, content.slots):
            # Same slots (the usual leaf of a full re-read): compare the ids in place.
            hit = np.flatnonzero((old.ids != content.ids).any(axis=1))
            self._add_changes(leaf, content.slots[hit], content.ids[hit], new, stored)
            return
        old_has = np.zeros(n, bool)
        old_has[old.slots] = True
        now_has = np.zeros(n, bool)
        now_has[content.slots] = True
        old_ids = np.zeros((n, 32), np.uint8)
        old_ids[old.slots] = old.ids
        now_ids = np.zeros((n, 32), np.uint8)
        now_ids[content.slots] = content.ids
        differs = (old_has != now_has) | (now_has & (old_ids != now_ids).any(axis=1))
        slots = np.flatnonzero(differs)
        if not len(slots):
            return
        offsets = (leaf * n + slots).astype(np.int64) * self.chunk
        lengths = np.minimum(self.chunk, np.maximum(self.size - offsets, 0))
        old_lengths = np.minimum(self.chunk, np.maximum(self.parent_size - offsets, 0))
        self.data_delta += int(lengths[now_has[slots]].sum() - old_lengths[old_has[slots]].sum())
        self.changes.add(
            offsets,
            chunk_keys(now_ids[slots]),
            ~now_has[slots],
            new[slots] & now_has[slots],
            np.where(now_has[slots], stored[slots], 0),
            lengths,
        )

    def _add_changes(
        self,
        leaf: int,
        slots: np.ndarray,
        ids: np.ndarray,
        new: np.ndarray,
        stored: np.ndarray,
    ) -> None:
        """Change rows of ``slots`` of ``leaf``, which hold data now (``ids``) and held other
        data in the parent."""
        if not len(slots):
            return
        assert self.changes is not None
        slots = slots.astype(np.int64)
        offsets = (leaf * self.leaf_chunks + slots) * self.chunk
        lengths = np.minimum(self.chunk, np.maximum(self.size - offsets, 0))
        old = np.minimum(self.chunk, np.maximum(self.parent_size - offsets, 0))
        self.data_delta += int(lengths.sum() - old.sum())
        self.changes.add(
            offsets,
            chunk_keys(ids),
            np.zeros(len(slots), bool),
            new[slots],
            stored[slots],
            lengths,
        )

    def _zeroed_before(self, limit: int, emitting: bool = False) -> None:
        """Full mode: parent leaves before ``limit`` that nothing was read in are now zeros
        (``emitting``: leaf ``limit`` itself is about to be emitted and compared)."""
        leaves = self._parent_leaves
        while self._parent_pos < len(leaves) and leaves[self._parent_pos] < limit:
            leaf = leaves[self._parent_pos]
            self._parent_pos += 1
            assert self.parent is not None
            none = np.zeros(self.leaf_chunks, bool)
            self._record(leaf, self.parent.leaf_at(leaf), EMPTY_LEAF, none, none.astype(np.int32))
        if emitting and self._parent_pos < len(leaves) and leaves[self._parent_pos] == limit:
            self._parent_pos += 1

    def _emit_full(self, leaf: int, parts: list[_Part]) -> None:
        self._emit(leaf, *self._pending_leaf(parts))

    def _emit_changed(self, leaf: int, parts: list[_Part]) -> None:
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
        read, new, stored = self._pending_leaf(parts)
        slots = np.concatenate([base.slots[keep] if len(keep) else base.slots, read.slots])
        ids = np.concatenate([base.ids[keep] if len(keep) else base.ids, read.ids])
        order = np.argsort(slots, kind="stable")
        self._emit(leaf, Leaf(slots[order].astype(np.int16), ids[order]), new, stored)
