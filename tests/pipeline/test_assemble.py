"""ManifestAssembler: leaves are emitted once complete, shared when unchanged; change tables
equal an independent diff of the two manifests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.store.assemble import ManifestAssembler
from catalog.store.changes import ChangeTableWriter, read_changes
from catalog.store.local import LocalStorage
from catalog.store.manifest import ManifestReader, ManifestWriter, manifest_data_bytes
from catalog.store.storage import TMP_DIR

C = 4096
LC = 4  # chunks per leaf in these tests
LB = C * LC


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def _cid(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * 8


def _written(rows: Sequence[tuple[int, int | None]], stored: set[int] | None = None) -> pa.Table:
    """Rows (disk offset, id tag or None for a zero chunk), as the writer reports them; the
    tags in ``stored`` (default: all) were stored by this backup (not dedup hits)."""
    new = [r[1] is not None and (stored is None or r[1] in stored) for r in rows]
    return pa.table(
        {
            "offset": pa.array([r[0] for r in rows], pa.int64()),
            "length": pa.array([C] * len(rows), pa.int32()),
            "chunk_id": pa.array(
                [bytes(32) if r[1] is None else _cid(r[1]) for r in rows], pa.binary(32)
            ),
            "zero": pa.array([r[1] is None for r in rows], pa.bool_()),
            "new": pa.array(new, pa.bool_()),
            "stored_len": pa.array(
                [100 + (r[1] or 0) if n else 0 for r, n in zip(rows, new, strict=True)], pa.int32()
            ),
        }
    )


def _content(reader: ManifestReader) -> dict[int, bytes]:
    """disk chunk number -> chunk id, over the whole manifest."""
    out: dict[int, bytes] = {}
    for ref in reader.refs():
        leaf = reader.leaf(ref)
        for slot, cid in zip(leaf.slots.tolist(), leaf.ids, strict=True):
            out[ref.leaf_no * LC + slot] = bytes(cid)
    return out


def _commit(w: ManifestWriter, storage: LocalStorage) -> ManifestReader:
    leaves, root, _ = w.commit()
    return ManifestReader(storage, root, leaves)


def _full(storage: LocalStorage, chunks: dict[int, int]) -> ManifestReader:
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, None, None)
    a.feed(_written([(n * C, tag) for n, tag in sorted(chunks.items())]))
    a.finish()
    return _commit(w, storage)


def test_full_backup_emits_leaves_only_when_complete(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, None, None)
    a.feed(_written([(0, 1), (C, None), (2 * C, 2), (3 * C, 3), (4 * C, 4)]))
    a.advance(5 * C)  # leaf 1 (chunks 4-7) is still open
    assert w.new_leaves == 1
    a.feed(_written([(5 * C, None), (6 * C, None), (7 * C, None)]))
    a.feed(_written([(40 * C, 9)]))
    a.advance(8 * C)
    assert w.new_leaves == 2
    a.finish()
    assert w.new_leaves == 3
    r = _commit(w, storage)
    assert r.leaf_nos.tolist() == [0, 1, 10]
    assert _content(r) == {0: _cid(1), 2: _cid(2), 3: _cid(3), 4: _cid(4), 40: _cid(9)}


def test_all_zero_leaves_are_not_written(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, None, None)
    a.feed(_written([(n * C, None) for n in range(8)] + [(8 * C, 5)]))
    a.finish()
    r = _commit(w, storage)
    assert r.leaf_nos.tolist() == [2]


def test_full_reread_shares_unchanged_leaves(storage: LocalStorage) -> None:
    before = {0: 1, 1: 2, 5: 3, 9: 4, 13: 5}
    parent = _full(storage, before)
    after = dict(before)
    after[5] = 33  # leaf 1 changes
    del after[13]  # leaf 3 becomes all zeros
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, parent, None)
    a.feed(_written([(n * C, after.get(n)) for n in range(16)]))
    a.finish()
    assert (w.new_leaves, w.ref_leaves) == (1, 2)
    r = _commit(w, storage)
    assert _content(r) == {n: _cid(t) for n, t in after.items()}


def test_changed_extents_patch_the_parent(storage: LocalStorage) -> None:
    before = {0: 1, 1: 2, 4: 3, 5: 4, 8: 5, 12: 6}
    parent = _full(storage, before)
    # Changed: chunk 1 (now zero), chunks 5-6 (5 rewritten, 6 new data), chunk 8 (zero, so
    # leaf 2 disappears), and chunk 21 in a leaf the parent never had.
    changed = [(C, 2 * C), (5 * C, 7 * C), (8 * C, 9 * C), (21 * C, 22 * C)]
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, parent, changed)
    a.feed(_written([(C, None), (5 * C, 40), (6 * C, 41)]))
    a.advance(8 * C)
    a.feed(_written([(8 * C, None), (21 * C, 50)]))
    a.finish()
    r = _commit(w, storage)
    expect = {0: 1, 4: 3, 5: 40, 6: 41, 12: 6, 21: 50}
    assert _content(r) == {n: _cid(t) for n, t in expect.items()}
    assert r.leaf_nos.tolist() == [0, 1, 3, 5]
    assert w.ref_leaves == 1  # leaf 3 only
    assert w.new_leaves == 3


def test_changed_range_over_a_hole_clears_the_chunks(storage: LocalStorage) -> None:
    """A changed range that reads nothing (now a hole) means zeros there."""
    parent = _full(storage, {0: 1, 1: 2, 2: 3})
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, parent, [(C, 3 * C)])
    a.finish()
    assert _content(_commit(w, storage)) == {0: _cid(1)}


def test_unchanged_content_in_a_changed_range_is_shared(storage: LocalStorage) -> None:
    parent = _full(storage, {0: 1, 1: 2})
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, parent, [(0, C)])
    a.feed(_written([(0, 1)]))  # rewritten with the same bytes
    a.finish()
    assert (w.new_leaves, w.ref_leaves) == (0, 1)
    assert _content(_commit(w, storage)) == {0: _cid(1), 1: _cid(2)}


def test_feed_accepts_unsorted_slots_within_a_leaf(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    a = ManifestAssembler(w, C, LC, None, None)
    a.feed(_written([(2 * C, 3)]))
    a.feed(_written([(0, 1)]))
    a.finish()
    r = _commit(w, storage)
    leaf = r.leaf_at(0)
    assert leaf.slots.tolist() == [0, 2]
    assert np.array_equal(leaf.ids[0], np.frombuffer(_cid(1), np.uint8))


# Change tables

SIZE = 24 * C - 100  # the last chunk is short


def _key(tag: int) -> int:
    return int.from_bytes(_cid(tag)[:8], "little", signed=True)


def _rows(storage: LocalStorage, changes: ChangeTableWriter) -> dict[int, tuple]:
    file_id, _ = changes.commit()
    t = read_changes(storage, file_id).to_pylist()
    offsets = [r["offset"] for r in t]
    assert offsets == sorted(offsets)
    return {r["offset"] // C: (r["chunk_key"], r["new"], r["stored_len"]) for r in t}


def _expected(
    before: dict[int, bytes], after: dict[int, bytes], stored: set[int]
) -> dict[int, tuple[int | None, bool, int]]:
    out: dict[int, tuple[int | None, bool, int]] = {}
    for n in sorted(set(before) | set(after)):
        if before.get(n) != after.get(n):
            if n not in after:
                out[n] = (None, False, 0)
            else:
                key = int.from_bytes(after[n][:8], "little", signed=True)
                tag = int.from_bytes(after[n][:4], "little")
                out[n] = (key, tag in stored, 100 + tag if tag in stored else 0)
    return out


def _run(
    storage: LocalStorage,
    parent: ManifestReader | None,
    changed: list[tuple[int, int]] | None,
    rows: Sequence[tuple[int, int | None]],
    stored: set[int],
) -> tuple[ManifestReader, dict]:
    w = ManifestWriter(storage)
    ch = ChangeTableWriter(storage)
    a = ManifestAssembler(w, C, LC, parent, changed, ch, SIZE, SIZE if parent else 0)
    a.feed(_written(rows, stored))
    a.finish()
    got = _rows(storage, ch)
    r = _commit(w, storage)
    before = _data_bytes(parent) if parent is not None else 0
    assert before + a.data_delta == _data_bytes(r)
    assert manifest_data_bytes(r, SIZE, C, LC) == _data_bytes(r)
    return r, got


def _data_bytes(r: ManifestReader) -> int:
    """Independently: the data bytes of the image, chunk by chunk (the last one is short)."""
    return sum(min(C, SIZE - n * C) for n in _content(r))


def test_first_backup_records_every_data_chunk(storage: LocalStorage) -> None:
    rows = [(0, 1), (C, None), (5 * C, 2), (23 * C, 3)]
    r, got = _run(storage, None, None, rows, {1, 3})
    assert got == _expected({}, _content(r), {1, 3})
    assert got[0] == (_key(1), True, 101) and got[5] == (_key(2), False, 0)


def test_full_reread_records_changes_and_leaves_that_were_not_read(
    storage: LocalStorage,
) -> None:
    before = {0: 1, 1: 2, 5: 3, 9: 4, 13: 5, 20: 6}
    parent = _full(storage, before)
    # Leaf 3 (chunk 13) and leaf 5 (chunk 20) are holes now: nothing is read there.
    rows = [(0, 1), (C, 7), (5 * C, 3), (9 * C, 4), (17 * C, 8)]
    r, got = _run(storage, parent, None, rows, {7, 8})
    assert got == _expected(_content(parent), _content(r), {7, 8})
    assert set(got) == {1, 13, 17, 20}


def test_changed_extents_record_only_real_changes(storage: LocalStorage) -> None:
    parent = _full(storage, {0: 1, 1: 2, 4: 3, 5: 4, 8: 5})
    changed = [(0, 2 * C), (5 * C, 7 * C), (8 * C, 9 * C)]
    rows = [(0, 1), (C, None), (5 * C, 40), (6 * C, 41), (8 * C, None)]
    r, got = _run(storage, parent, changed, rows, {40})
    assert got == _expected(_content(parent), _content(r), {40})
    assert set(got) == {1, 5, 6, 8}  # chunk 0 was rewritten with the same bytes


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.dictionaries(st.integers(0, 23), st.integers(1, 6), max_size=24),
    after=st.dictionaries(st.integers(0, 23), st.integers(1, 6), max_size=24),
    use_extents=st.booleans(),
)
def test_any_history_gives_the_exact_diff(
    storage: LocalStorage, before: dict[int, int], after: dict[int, int], use_extents: bool
) -> None:
    parent = _full(storage, before)
    if use_extents:
        touched = sorted(set(before) | set(after))
        changed = [(n * C, (n + 1) * C) for n in touched]
        rows = [(n * C, after.get(n)) for n in touched]
    else:
        changed = None
        rows = [(n * C, t) for n, t in sorted(after.items())]
    r, got = _run(storage, parent, changed, rows, {2, 4})
    assert _content(r) == {n: _cid(t) for n, t in after.items()}
    assert got == _expected(_content(parent), _content(r), {2, 4})
