"""Two-level manifests: leaves files and roots; shared leaves; leaves across row groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.errors import CorruptionError
from catalog.store.blocks import block_list_name
from catalog.store.leaves import EMPTY_LEAF, Leaf, leaves_name
from catalog.store.local import LocalStorage
from catalog.store.manifest import (
    LEAF_ROW_GROUP_ROWS,
    ROOT_SCHEMA,
    LeafRef,
    ManifestReader,
    ManifestWriter,
    roots_name,
)
from catalog.store.parquet_io import ParquetStreamWriter, open_parquet
from catalog.store.storage import TMP_DIR


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def _leaf(n_slots: int, seed: int, leaf_chunks: int = 16) -> Leaf:
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(leaf_chunks, n_slots, replace=False)).astype(np.int16)
    return Leaf(slots, rng.integers(0, 256, (n_slots, 32), dtype=np.uint8))


def _big_leaf(n: int, seed: int) -> Leaf:
    rng = np.random.default_rng(seed)
    return Leaf(np.arange(n, dtype=np.int16), rng.integers(0, 256, (n, 32), dtype=np.uint8))


def test_round_trip_with_empty_leaves_skipped(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    leaves = {0: _leaf(16, 1), 3: _leaf(1, 2), 4: _leaf(7, 3), 1000: _leaf(2, 4)}
    w.add_leaf(0, leaves[0])
    w.add_leaf(2, EMPTY_LEAF)
    for n in (3, 4, 1000):
        w.add_leaf(n, leaves[n])
    leaves_id, root_id, written = w.commit()
    assert leaves_id is not None
    assert w.new_leaves == 4 and w.ref_leaves == 0
    files = [leaves_name(leaves_id), block_list_name(leaves_name(leaves_id)), roots_name(root_id)]
    assert written == sum(storage.size(f) for f in files)
    r = ManifestReader(storage, root_id, leaves_id)
    assert len(r) == 4
    assert r.leaf_nos.tolist() == [0, 3, 4, 1000]
    for n, leaf in leaves.items():
        assert r.leaf_at(n).same_as(leaf)
    assert r.leaf_at(2).same_as(EMPTY_LEAF)
    assert r.leaf_at(5000).same_as(EMPTY_LEAF)
    assert r.ref_at(1) is None
    assert storage.tmp_files() == []


def test_out_of_order_leaves_are_refused(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    w.add_leaf(5, _leaf(1, 1))
    with pytest.raises(ValueError, match="out of order"):
        w.add_leaf(5, _leaf(1, 2))
    with pytest.raises(ValueError, match="out of order"):
        w.add_ref(LeafRef(3, "x", 0))
    w.abort()
    assert storage.tmp_files() == []


def test_an_incremental_shares_unchanged_leaves(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    base = {n: _leaf(4, n) for n in range(10)}
    for n, leaf in base.items():
        w.add_leaf(n, leaf)
    l1, r1, _ = w.commit()
    assert l1 is not None
    parent = ManifestReader(storage, r1, l1)

    w2 = ManifestWriter(storage)
    changed = _leaf(5, 99)
    for n in range(10):
        if n == 6:
            w2.add_leaf(n, changed)
        else:
            ref = parent.ref_at(n)
            assert ref is not None
            w2.add_ref(ref)
    l2, r2, _ = w2.commit()
    assert l2 is not None and l2 != l1
    assert (w2.new_leaves, w2.ref_leaves) == (1, 9)
    child = ManifestReader(storage, r2, l2)
    for n in range(10):
        assert child.leaf_at(n).same_as(changed if n == 6 else base[n])
    # The new leaves file holds only the changed leaf.
    assert pq.read_table(storage.path(leaves_name(l2))).num_rows == 5
    # Shared refs name the parent's leaves file; the new leaf is "own" (null) in the root.
    root = pq.read_table(storage.path(roots_name(r2)))
    files = root.column("leaf_file").to_pylist()
    assert files.count(None) == 1 and files.count(l1) == 9


def test_an_all_shared_manifest_has_no_leaves_file(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    w.add_leaf(1, _leaf(3, 1))
    l1, r1, _ = w.commit()
    assert l1 is not None
    parent = ManifestReader(storage, r1, l1)
    w2 = ManifestWriter(storage)
    for ref in parent.refs():
        w2.add_ref(ref)
    l2, r2, _ = w2.commit()
    assert l2 is None
    assert ManifestReader(storage, r2, None).leaf_at(1).same_as(parent.leaf_at(1))
    empty = ManifestWriter(storage)
    l3, r3, _ = empty.commit()
    assert l3 is None and len(ManifestReader(storage, r3, None)) == 0


def test_many_small_leaves_across_flushes_and_row_groups(storage: LocalStorage) -> None:
    """3,000 full leaves = 48,000 rows: several flushes of 8,192 rows, several row groups."""
    w = ManifestWriter(storage)
    leaves = {}
    for n in range(0, 6000, 2):
        leaves[n] = _leaf(16, n)
        w.add_leaf(n, leaves[n])
    l1, r1, _ = w.commit()
    assert l1 is not None
    assert open_parquet(storage, leaves_name(l1)).metadata.num_row_groups > 2
    r = ManifestReader(storage, r1, l1)
    order = np.random.default_rng(0).permutation(sorted(leaves))
    for n in order[:400].tolist() + [0, 5998]:
        assert r.leaf_at(n).same_as(leaves[n]), n


def test_leaves_straddling_row_groups(storage: LocalStorage) -> None:
    """Leaves with more rows than a row group: each must be gathered from several groups."""
    w = ManifestWriter(storage)
    # Slots are int16, so a leaf has at most 32,768 rows. Leaf 6 spans three row groups.
    sizes = {0: 5000, 1: LEAF_ROW_GROUP_ROWS + 3000, 2: 3, 3: 32000, 4: 7, 5: 8000, 6: 30000, 7: 1}
    leaves = {n: _big_leaf(k, n) for n, k in sizes.items()}
    for n, leaf in leaves.items():
        w.add_leaf(n, leaf)
    l1, r1, _ = w.commit()
    assert l1 is not None
    md = open_parquet(storage, leaves_name(l1)).metadata
    assert md.num_row_groups >= 7
    assert max(md.row_group(i).num_rows for i in range(md.num_row_groups)) == LEAF_ROW_GROUP_ROWS
    r = ManifestReader(storage, r1, l1)
    for n in [3, 0, 1, 4, 6, 2, 3, 7, 1, 5, 6, 1, 0]:
        got = r.leaf_at(n)
        assert got.same_as(leaves[n]), (n, len(got.slots), len(leaves[n].slots))


def test_reader_cache_of_many_leaves_files(storage: LocalStorage) -> None:
    """More leaves files than the reader keeps open (32): evicted files reopen correctly."""
    refs = []
    leaves = {}
    for n in range(40):
        w = ManifestWriter(storage)
        leaves[n] = _leaf(3, 1000 + n)
        w.add_leaf(n, leaves[n])
        lid, _rid, _ = w.commit()
        assert lid is not None
        refs.append(LeafRef(n, lid, 0))
    w = ManifestWriter(storage)
    for ref in refs:
        w.add_ref(ref)
    lid, rid, _ = w.commit()
    r = ManifestReader(storage, rid, lid)
    for n in list(range(40)) + list(range(39, -1, -3)):
        assert r.leaf_at(n).same_as(leaves[n])


def _raw_root(storage: LocalStorage, rows: list[tuple[int, str | None, int]]) -> str:
    w = ParquetStreamWriter(storage, ROOT_SCHEMA)
    w.write(
        pa.table(
            [
                pa.array([r[0] for r in rows], pa.int64()),
                pa.array([r[1] for r in rows], pa.string()),
                pa.array([r[2] for r in rows], pa.int32()),
            ],
            schema=ROOT_SCHEMA,
        )
    )
    return w.commit("manifests/roots")[0]


def test_damaged_roots_are_corruption_errors(storage: LocalStorage) -> None:
    own = _raw_root(storage, [(1, None, 0)])
    with pytest.raises(CorruptionError, match="refers to own leaves but the point has none"):
        ManifestReader(storage, own, None)
    unsorted = _raw_root(storage, [(5, "x", 0), (2, "x", 1)])
    with pytest.raises(CorruptionError, match="not sorted by leaf number"):
        ManifestReader(storage, unsorted, "y")
    garbage = storage.create()
    garbage.write(b"PAR1 this is not parquet")
    garbage.commit(roots_name("f" * 64))
    with pytest.raises(
        CorruptionError, match="not a readable Parquet file|does not match its name"
    ):
        ManifestReader(storage, "f" * 64, None)


def test_missing_leaf_ordinal_is_a_corruption_error(storage: LocalStorage) -> None:
    w = ManifestWriter(storage)
    w.add_leaf(0, _leaf(2, 1))
    lid, _rid, _ = w.commit()
    assert lid is not None
    bad = _raw_root(storage, [(0, lid, 7)])
    r = ManifestReader(storage, bad, None)
    with pytest.raises(CorruptionError, match="leaf 7 is missing"):
        r.leaf_at(0)
