"""The chunk index: segments, locations, and the dedup claim (16-byte prefixes)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog.store.index import (
    DEDUP_KEY_BYTES,
    INDEX_SCHEMA,
    DedupIndex,
    IndexSegmentWriter,
    ids_to_array,
    load_index,
    load_locations,
    sealed_to_table,
    segment_names,
    shard_of,
)
from catalog.store.local import LocalStorage
from catalog.store.packs import SealedPack, pack_name
from catalog.store.storage import TMP_DIR


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32), dtype=np.uint8)


def _sealed(pack: str, ids: np.ndarray, base: int = 16) -> SealedPack:
    n = len(ids)
    return SealedPack(
        pack_id=pack,
        chunk_ids=[bytes(r) for r in ids],
        offsets=[base + 100 * i for i in range(n)],
        stored_lens=[100] * n,
        raw_lens=[4096] * n,
        codecs=[1] * n,
        size=base + 100 * n,
    )


def _segment(storage: LocalStorage, *sealed: SealedPack) -> str | None:
    w = IndexSegmentWriter(storage)
    w.add(sealed_to_table(sealed))
    seg, size = w.commit()
    assert (seg is None) == (size == 0)
    return seg


def test_segment_round_trip(storage: LocalStorage) -> None:
    a, b = _ids(5, 1), _ids(3, 2)
    seg = _segment(storage, _sealed("p" * 64, a), _sealed("q" * 64, b))
    assert segment_names(storage) == [f"index/{seg}.parquet"]
    table = load_index(storage)
    assert table.schema.equals(INDEX_SCHEMA)
    assert table.num_rows == 8
    assert table.column("chunk_id").to_pylist() == [bytes(r) for r in np.concatenate([a, b])]
    assert table.column("pack").to_pylist() == ["p" * 64] * 5 + ["q" * 64] * 3
    assert load_index(storage, ["pack"]).column_names == ["pack"]


def test_empty_segment_is_not_written(storage: LocalStorage) -> None:
    w = IndexSegmentWriter(storage)
    assert w.commit() == (None, 0)
    assert segment_names(storage) == []
    assert storage.tmp_files() == []
    empty = load_index(storage)
    assert empty.num_rows == 0 and empty.schema.equals(INDEX_SCHEMA)
    assert load_index(storage, ["chunk_id"]).column_names == ["chunk_id"]


def test_load_locations_gives_one_row_per_chunk(storage: LocalStorage) -> None:
    a, b = _ids(4, 1), _ids(2, 2)
    _segment(storage, _sealed("p" * 64, a))
    # A second backup stored two of the same chunks again (concurrent backups may).
    _segment(storage, _sealed("q" * 64, np.concatenate([a[:2], b]), base=1000))
    locs = load_locations(storage)
    assert sorted(locs.column_names) == sorted(INDEX_SCHEMA.names)
    assert locs.num_rows == 6
    by_id = {r["chunk_id"]: r for r in locs.to_pylist()}
    assert set(by_id) == {bytes(r) for r in np.concatenate([a, b])}
    for i, cid in enumerate(bytes(r) for r in a):
        row = by_id[cid]
        if row["pack"] == "p" * 64:
            assert row["offset"] == 16 + 100 * i
        else:
            assert i < 2 and row["offset"] == 1000 + 100 * i
    for i, cid in enumerate(bytes(r) for r in b):
        assert by_id[cid]["pack"] == "q" * 64
        assert by_id[cid]["offset"] == 1000 + 100 * (i + 2)
    assert load_locations(LocalStorage(str(storage.root) + "-none")).num_rows == 0


def test_ids_to_array_respects_slices() -> None:
    ids = _ids(10, 3)
    arr = pa.array([bytes(r) for r in ids], pa.binary(32))
    assert np.array_equal(ids_to_array(arr.slice(3, 4)), ids[3:7])
    chunked = pa.chunked_array([arr.slice(0, 2), arr.slice(5, 3)])
    assert np.array_equal(ids_to_array(chunked), np.concatenate([ids[:2], ids[5:8]]))
    assert ids_to_array(pa.array([], pa.binary(32))).shape == (0, 32)


def test_claim_known_new_and_repeated(storage: LocalStorage) -> None:
    stored = _ids(50, 4)
    _segment(storage, _sealed("p" * 64, stored))
    # Only chunks in packs that exist count as stored.
    assert len(DedupIndex.load(storage)) == 0
    storage.write_atomic(pack_name("p" * 64), b"pack bytes")
    index = DedupIndex.load(storage)
    assert len(index) == 50
    assert index.resident_bytes == 50 * DEDUP_KEY_BYTES
    fresh = _ids(20, 5)
    batch = np.concatenate([stored[:10], fresh])
    out = index.claim(batch)
    assert out.dtype == bool
    assert not out[:10].any()
    assert out[10:].all()
    # Claimed ids are now known: nobody stores them again.
    assert not index.claim(batch).any()
    assert len(index) == 70
    assert index.claim(np.empty((0, 32), np.uint8)).shape == (0,)


def test_duplicates_inside_one_claim_are_stored_once() -> None:
    index = DedupIndex()
    ids = _ids(5, 6)
    batch = np.concatenate([ids, ids[::-1], ids[:2]])
    out = index.claim(batch)
    assert out.sum() == 5
    for row in ids:
        hits = [i for i in range(len(batch)) if np.array_equal(batch[i], row)]
        assert sum(bool(out[i]) for i in hits) == 1


def test_two_claimers_never_both_store_a_chunk() -> None:
    index = DedupIndex(np.unique(_ids(1000, 7)[:, :DEDUP_KEY_BYTES].copy().view("S16").ravel()))
    shared = _ids(4000, 8)
    rng = np.random.default_rng(9)
    orders = [rng.permutation(len(shared)) for _ in range(4)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(orders))

    def claimer(k: int) -> None:
        mine = np.zeros(len(shared), bool)
        barrier.wait()
        for part in np.array_split(orders[k], 40):
            mine[part] = index.claim(np.ascontiguousarray(shared[part]))
        results[k] = mine

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(len(orders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = sum(results[k].astype(int) for k in results)
    assert np.array_equal(winners, np.ones(len(shared), int))


def test_claim_decides_on_the_16_byte_prefix() -> None:
    known = _ids(1, 10)
    index = DedupIndex(known[:, :DEDUP_KEY_BYTES].copy().view("S16").ravel())
    same_prefix = known.copy()
    same_prefix[0, 31] ^= 0xFF
    other_prefix = known.copy()
    other_prefix[0, 15] ^= 0xFF
    assert not index.claim(same_prefix)[0]
    assert index.claim(other_prefix)[0]


def test_claim_against_ids_beyond_the_largest_known() -> None:
    base = np.zeros((3, 32), np.uint8)
    base[:, 0] = [10, 20, 30]
    index = DedupIndex(base[:, :DEDUP_KEY_BYTES].copy().view("S16").ravel())
    probe = np.zeros((4, 32), np.uint8)
    probe[:, 0] = [5, 20, 31, 255]
    assert index.claim(probe).tolist() == [True, False, True, True]


def test_claims_stay_exclusive_across_folds() -> None:
    """Claimed ids are folded into sorted arrays; nothing is forgotten or claimed twice."""
    known = _ids(300, 11)
    index = DedupIndex(np.unique(known[:, :DEDUP_KEY_BYTES].copy().view("S16").ravel()))
    index.SET_LIMIT = 7  # fold often: many levels, many merges
    fresh = _ids(500, 12)
    claimed = np.zeros(len(fresh), int)
    for part in np.array_split(np.arange(len(fresh)), 37):
        claimed[part] += index.claim(np.ascontiguousarray(fresh[part]))
        # Everything known, and everything claimed so far, is never new again.
        assert not index.claim(known[part % len(known)]).any()
        assert not index.claim(np.ascontiguousarray(fresh[: part[-1] + 1])).any()
    assert claimed.tolist() == [1] * len(fresh)
    assert len(index) == 800
    assert index.resident_bytes >= (800 - 7) * DEDUP_KEY_BYTES


def test_load_locations_only_what_is_needed(storage: LocalStorage) -> None:
    a, b = _ids(6, 13), _ids(4, 14)
    _segment(storage, _sealed("p" * 64, a))
    _segment(storage, _sealed("q" * 64, b))
    wanted = np.unique(np.concatenate([a[[1, 4]], b[[0]]]).view("S32").ravel())
    locs = load_locations(storage, wanted)
    assert sorted(locs.column("chunk_id").to_pylist()) == sorted(
        bytes(r) for r in [a[1], a[4], b[0]]
    )
    assert locs.column_names == INDEX_SCHEMA.names
    assert load_locations(storage, np.empty(0, "S32")).num_rows == 0


def test_shards_split_the_stored_chunks_by_prefix(storage: LocalStorage) -> None:
    """Each shard loads the chunks whose first two bytes name it: together all, none twice,
    about evenly; a shard knows its own chunks only."""
    stored = _ids(4000, 6)
    _segment(storage, _sealed("p" * 64, stored))
    storage.write_atomic(pack_name("p" * 64), b"pack bytes")
    shards = [DedupIndex.load(storage, i, 4) for i in range(4)]
    assert sum(len(s) for s in shards) == 4000
    assert all(800 < len(s) < 1200 for s in shards)
    which = shard_of(stored, 4)
    assert set(which.tolist()) == {0, 1, 2, 3}
    assert (which == ((stored[:, 0].astype(int) * 256 + stored[:, 1]) % 4)).all()
    for i, shard in enumerate(shards):
        assert shard.holds(stored[which == i]).all()
        assert not shard.holds(stored[which != i]).any()
