"""A point's reader (catalog.read.point.PointSource) loads lazily: opening reads only the root,
a read loads only the span (here one leaf) it touches and the index segments that hold its
chunks; reads still equal the image, from any number of threads, with every chunk checked."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from combtest import TEST_PASSWORD, Image, MiB, api_backup, flip_byte
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catalog.read.lookup as lookup
from catalog.errors import CorruptionError
from catalog.read.lookup import SegmentCache, segment_name
from catalog.read.point import PointSource
from catalog.read.spans import MapOptions
from catalog.repo import Repository
from catalog.store.blocks import block_list_name
from catalog.store.index import load_locations
from catalog.store.leaves import LeafFile, leaves_name
from catalog.store.local import LocalStorage
from catalog.store.manifest import roots_name
from catalog.store.packs import pack_name
from catalog.store.parquet_io import read_parquet
from catalog.store.points import RecoveryPoint
from catalog.store.sealing import PLAIN, Sealer

CHUNK = 64 * 1024
SIZE = 24 * MiB + 777  # 24 leaves of 1 MiB and a partial last chunk
LEAF = 16  # chunks per leaf (the repository default)


@dataclass
class Points:
    repo: Repository
    full: RecoveryPoint
    incr: RecoveryPoint
    images: dict[str, bytes]  # point id -> the image it was taken from


@pytest.fixture(scope="module")
def points(tmp_path_factory: pytest.TempPathFactory) -> Points:
    """A full point and a changed-extents one over it. The second rewrites the whole leaf at
    13 MiB (new chunks: its own segment), two chunks of the leaf at 12 MiB, and writes at 16 MiB
    a copy of the chunk at 0 (a dedup hit: only in the first backup's segment); its other
    leaves are the first point's."""
    tmp = tmp_path_factory.mktemp("lazy")
    img = Image(tmp / "d.img", SIZE)
    img.random(0, 2 * MiB + 5000, seed=1)
    img.compressible(5 * MiB, 2 * MiB + 777, seed=2)
    img.zeros(9 * MiB, MiB)
    img.random(12 * MiB, 3 * MiB, seed=3)
    img.random(SIZE - 1000, 1000, seed=4)
    repo = Repository.init(str(tmp / "repo"), CHUNK, 3, password=TEST_PASSWORD)
    full = api_backup(repo.location, img.path)
    first = img.path.read_bytes()
    img.take_changes()
    img.random(12 * MiB + 3 * CHUNK, 2 * CHUNK, seed=5)
    img.random(13 * MiB, MiB, seed=6)
    img.write(16 * MiB, first[:CHUNK])
    incr = api_backup(repo.location, img.path, changed=img.changes_file(tmp / "c.json"))
    assert incr.mode == "changed-extents" and incr.index_segment != full.index_segment
    return Points(repo, full, incr, {full.id: first, incr.id: img.path.read_bytes()})


class RecordingStorage:
    """A LocalStorage that records the names it reads."""

    def __init__(self, root: str, sealer: Sealer = PLAIN) -> None:
        self._inner = LocalStorage(root, sealer=sealer)
        self.reads: list[str] = []

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        self.reads.append(name)
        return self._inner.read(name, offset, length)

    def __getattr__(self, attr: str) -> object:
        return getattr(self._inner, attr)

    def read_under(self, prefix: str) -> list[str]:
        return sorted({n for n in self.reads if n.startswith(prefix)})


def recording(points: Points) -> tuple[Repository, RecordingStorage]:
    storage = RecordingStorage(points.repo.location, points.repo.sealer)
    return Repository(storage, points.repo.config, points.repo.location), storage  # type: ignore[arg-type]


def data_runs(image: bytes) -> list[tuple[int, int]]:
    """The runs of non-zero chunks of an image, clipped to its end (what extents() must say)."""
    runs: list[tuple[int, int]] = []
    for at in range(0, len(image), CHUNK):
        if any(image[at : at + CHUNK]):
            end = min(len(image), at + CHUNK)
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((at, end - at))
    return runs


@pytest.fixture
def scanning(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every segment answers by scanning while its table builds in the background."""
    monkeypatch.setattr(lookup, "_PROBE_ROWS", 0)
    yield


# -- reads ------------------------------------------------------------------------------------


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["full", "incr"]),
    reads=st.lists(st.tuples(st.integers(0, SIZE + 10), st.integers(0, 3 * MiB)), max_size=4),
    span_leaves=st.sampled_from([1, 3, 64]),
    scan=st.booleans(),
)
def test_reads_anywhere_equal_the_image(  # type: ignore[no-untyped-def]
    points, monkeypatch, which, reads, span_leaves, scan
) -> None:
    """Any offset and length, spans of one leaf to many, a map cache of one span (evicting on
    every span change), segments looked up by table or by scan."""
    monkeypatch.setattr(lookup, "_PROBE_ROWS", 0 if scan else 1 << 30)
    point = getattr(points, which)
    image = points.images[point.id]
    segments = SegmentCache()
    src = PointSource(
        points.repo.storage,
        point,
        cache_chunks=2,
        maps=MapOptions(map_cache_bytes=1, span_chunks=span_leaves * LEAF, segments=segments),
    )
    for offset, length in reads:
        assert src.read(offset, length) == image[offset : offset + length]
    segments.wait()


def test_opening_reads_only_the_root(points: Points) -> None:
    repo, storage = recording(points)
    PointSource(repo.storage, points.incr, maps=MapOptions(segments=SegmentCache()))
    assert storage.reads == [roots_name(points.incr.root)]


def test_a_first_read_loads_only_the_leaf_it_needs(
    points: Points, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, int, int]] = []
    rows = LeafFile.rows

    def recorded(self: LeafFile, lo: int, hi: int):  # type: ignore[no-untyped-def]
        asked.append((self.name, lo, hi))
        return rows(self, lo, hi)

    monkeypatch.setattr(LeafFile, "rows", recorded)
    repo, storage = recording(points)
    incr, full = points.incr, points.full
    src = PointSource(
        repo.storage, incr, maps=MapOptions(span_chunks=LEAF, segments=SegmentCache())
    )
    at = 13 * MiB + 100  # in the leaf the second backup rewrote whole
    assert src.read(at, 4096) == points.images[incr.id][at : at + 4096]
    own = leaves_name(incr.leaves or "")
    assert len(asked) == 1 and asked[0][0] == own and asked[0][1] == asked[0][2]  # one leaf
    # Its leaves file through its block list: the list, then only the blocks needed.
    assert storage.read_under("manifests/leaves") == sorted([own, block_list_name(own)])
    assert storage.read_under("index") == [segment_name(incr.index_segment or "")]
    assert storage.read_under("points") == [] and len(storage.read_under("packs")) == 1
    assert src.leaves_files_read == {incr.leaves}

    # A leaf taken unchanged from the first point: its leaves file and segment, found through
    # the point documents; still one leaf. (A leaf that mixes old and new chunks needs both
    # segments: a span's locations load together.)
    asked.clear()
    at = 5 * MiB + 12345
    assert src.read(at, 4096) == points.images[incr.id][at : at + 4096]
    assert len(asked) == 1 and asked[0][0] == leaves_name(full.leaves or "")
    assert storage.read_under("index") == sorted(
        segment_name(p.index_segment or "") for p in (full, incr)
    )


def test_a_dedup_hit_is_found_in_an_older_segment(points: Points) -> None:
    """The chunk written at 16 MiB by the second backup was stored by the first."""
    src = PointSource(
        points.repo.storage, points.incr, maps=MapOptions(span_chunks=LEAF, segments=SegmentCache())
    )
    at = 16 * MiB
    assert src.read(at, CHUNK) == points.images[points.full.id][:CHUNK]
    assert src.leaves_files_read == {points.incr.leaves}
    assert segment_name(points.full.index_segment or "") in src.segments_read


@pytest.mark.parametrize("span_leaves", [1, 5, 64])
def test_extents_come_from_the_leaves_alone(points: Points, span_leaves: int) -> None:
    for point in (points.full, points.incr):
        repo, storage = recording(points)
        maps = MapOptions(span_chunks=span_leaves * LEAF, segments=SegmentCache())
        src = PointSource(repo.storage, point, maps=maps)
        assert src.extents() == data_runs(points.images[point.id])
        assert storage.read_under("index") == [] and storage.read_under("packs") == []


def test_threads_share_one_source(points: Points, scanning: None) -> None:
    """Sixteen threads read at once from a fresh source: every read is right and every span
    is loaded once (the map cache holds them all)."""
    image = points.images[points.incr.id]
    segments = SegmentCache()
    maps = MapOptions(span_chunks=LEAF, segments=segments)
    src = PointSource(points.repo.storage, points.incr, cache_chunks=4, maps=maps)
    loads: list[int] = []
    load = src._spans._load

    def counted(s: int):  # type: ignore[no-untyped-def]
        loads.append(s)
        return load(s)

    src._spans._load = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(7)
    sizes = [512, 4096, CHUNK + 1, 2 * MiB]
    jobs = [
        list(zip(rng.integers(0, SIZE, 40).tolist(), rng.choice(sizes, 40).tolist(), strict=True))
        for _ in range(16)
    ]
    wrong: list[tuple[int, int]] = []
    start = threading.Barrier(len(jobs))

    def run(job: list[tuple[int, int]]) -> None:
        start.wait()
        for offset, length in job:
            if src.read(offset, length) != image[offset : offset + length]:
                wrong.append((offset, length))

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    segments.wait()
    assert wrong == []
    assert sorted(loads) == sorted(set(loads))


# -- damage -----------------------------------------------------------------------------------


def _damaged_copy(points: Points, tmp_path: Path) -> tuple[Repository, RecoveryPoint]:
    """A copy of the repository with one bit flipped in the blob of the chunk at offset 0."""
    shutil.copytree(points.repo.location, tmp_path / "repo")
    repo = Repository.open(str(tmp_path / "repo"), password=TEST_PASSWORD)
    cid = repo.manifest(points.full).leaf_at(0).ids[0].tobytes()
    rows = load_locations(repo.storage).to_pylist()
    row = next(r for r in rows if r["chunk_id"] == cid)
    flip_byte(tmp_path / "repo" / pack_name(row["pack"]), row["offset"] + 7)
    return repo, points.full


@pytest.mark.parametrize("length", [4096, 2 * MiB])  # one chunk; a large read (pack ranges)
def test_a_corrupt_chunk_is_detected(points: Points, tmp_path: Path, length: int) -> None:
    repo, point = _damaged_copy(points, tmp_path)
    src = PointSource(
        repo.storage, point, maps=MapOptions(segments=SegmentCache())
    )  # opening reads no pack
    with pytest.raises(CorruptionError, match=rf"{point.id} at offset 0\b"):
        src.read(0, length)
    at = 5 * MiB
    assert src.read(at, length) == points.images[point.id][at : at + length]


def test_a_chunk_in_no_segment_is_an_error_when_read(points: Points, tmp_path: Path) -> None:
    """Without the second backup's segment, only what it stored is unreadable; the leaves it
    shares with the first point read as before, and nothing fails on opening."""
    shutil.copytree(points.repo.location, tmp_path / "repo")
    repo = Repository.open(str(tmp_path / "repo"), password=TEST_PASSWORD)
    (tmp_path / "repo" / segment_name(points.incr.index_segment or "")).unlink()
    src = PointSource(
        repo.storage, points.incr, maps=MapOptions(span_chunks=LEAF, segments=SegmentCache())
    )
    at = 5 * MiB
    assert src.read(at, 4096) == points.images[points.incr.id][at : at + 4096]
    with pytest.raises(
        CorruptionError, match=rf"{points.incr.id} at offset {13 * MiB}\b.*no index"
    ):
        src.read(13 * MiB, 4096)


def test_a_damaged_segment_is_reported_by_the_read_that_needs_it(
    points: Points, tmp_path: Path
) -> None:
    shutil.copytree(points.repo.location, tmp_path / "repo")
    repo = Repository.open(str(tmp_path / "repo"), password=TEST_PASSWORD)
    seg = tmp_path / "repo" / segment_name(points.full.index_segment or "")
    flip_byte(seg, seg.stat().st_size // 2)
    src = PointSource(
        repo.storage, points.incr, maps=MapOptions(span_chunks=LEAF, segments=SegmentCache())
    )
    at = 13 * MiB  # only in the second backup's (intact) segment
    assert src.read(at, 4096) == points.images[points.incr.id][at : at + 4096]
    with pytest.raises(CorruptionError, match="does not match its name"):
        src.read(5 * MiB, 4096)


# -- segment lookups --------------------------------------------------------------------------


def test_scan_and_table_find_the_same_rows(points: Points) -> None:
    storage = points.repo.storage
    name = segment_name(points.full.index_segment or "")
    data = storage.read(name)
    mine = read_parquet(storage, name, ["chunk_id"]).column("chunk_id").to_pylist()
    ids = np.frombuffer(b"".join(mine), np.uint8).reshape(-1, 32)[::3]
    absent = np.frombuffer(bytes(range(96)), np.uint8).reshape(3, 32)
    wanted = np.concatenate([ids, absent])
    dec = storage.sealer.parquet_decryption()
    by_table = lookup.SegmentTable(name, data, dec).lookup(wanted)
    by_scan = lookup._SegmentScan(name, name, data, dec).lookup(wanted)
    assert sorted(by_table.at.tolist()) == list(range(len(ids)))
    order = np.argsort(by_scan.at)
    for field in ("at", "offset", "stored_len", "raw_len", "codec"):
        assert list(getattr(by_table, field)) == list(getattr(by_scan, field)[order]), field
    packs = [list(h.names[h.code]) for h in (by_table, by_scan)]
    assert packs[0] == [packs[1][k] for k in order]


def test_segment_tables_are_bounded_and_shared(points: Points) -> None:
    cache = SegmentCache(budget_bytes=1)  # keeps only the newest table
    a = PointSource(
        points.repo.storage, points.full, maps=MapOptions(span_chunks=LEAF, segments=cache)
    )
    b = PointSource(
        points.repo.storage, points.incr, maps=MapOptions(span_chunks=LEAF, segments=cache)
    )
    for src, at in ((a, 0), (b, 13 * MiB), (a, 5 * MiB), (b, 12 * MiB)):
        image = points.images[src.point.id]
        assert src.read(at, 4096) == image[at : at + 4096]
    assert len(cache._tables) == 1
