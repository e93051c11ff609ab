"""Chunk lives (``catalog.analytics.lives.model``) and their local cache: the same unique and freed
bytes as walking every change row, whether built afresh, loaded, extended by new points or rebuilt
after damage; histories a cache cannot cover (incomplete sources) take the walk."""

from __future__ import annotations

import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from catalogtest import make_history
from combtest import TEST_PASSWORD, Image, MiB, api_backup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.catalog_gen import Spec, generate
from catalog.analytics.history import History
from catalog.analytics.lives import build as lives_build
from catalog.analytics.lives import cache as lives_cache
from catalog.analytics.lives import model as lives
from catalog.repo import Repository
from catalog.store.cachedir import CACHE_ENV
from catalog.store.points import commit_point, load_forgotten, point_name, retire_point

C = 64 * 1024
MASKS = 6


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every history is cached (no size threshold), in a directory of the test's own."""
    where = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(where))
    monkeypatch.setattr(lives_cache, "CACHE_MIN_ROWS", 0)
    return where


def _walked(repo: Repository) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique bytes and freed bytes for fixed masks by walking the rows (no lives)."""
    h = History.of(repo.storage, repo.points())
    h.lives = lambda: None  # type: ignore[method-assign]
    return h.lone_bytes(), [h.freed_by(m) for m in _masks(len(h.points))]


def _from_lives(repo: Repository) -> tuple[History, np.ndarray, list[np.ndarray]]:
    h = History.of(repo.storage, repo.points())
    lone = h.lone_bytes()
    return h, lone, [h.freed_by(m) for m in _masks(len(h.points))]


def _masks(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [np.zeros(n, bool), np.ones(n, bool)] + [rng.random(n) < 0.5 for _ in range(MASKS)]


def _same(repo: Repository) -> History:
    lone, freed = _walked(repo)
    h, lone2, freed2 = _from_lives(repo)
    assert h._lives is not None
    assert lone2.tolist() == lone.tolist()
    for a, b in zip(freed2, freed, strict=True):
        assert a.tolist() == b.tolist()
    return h


def _synthetic(root: Path, points: int, seed: int, dedup: float = 0.2) -> Repository:
    repo = Repository.init(str(root / "r"), C, 3, password=TEST_PASSWORD)
    spec = Spec(
        points=points,
        disk_bytes=8 * MiB,
        change=0.08,
        hot_regions=2,
        hot_region_bytes=MiB,
        dedup_share=dedup,
        zero_share=0.1,
        seed=seed,
    )
    generate(repo, spec)
    return repo


def _cache_file(repo: Repository) -> str:
    return lives_cache.cache_path(repo.config.id)


def test_real_backups_lives_equal_the_walk_and_are_cached(tmp_path: Path, cache: Path) -> None:
    repo, _points, _ = make_history(tmp_path)
    _same(repo)
    assert os.path.exists(_cache_file(repo))
    h = _same(repo)  # now from the cache, without its state
    assert h._lives is not None and not h._lives.held


def test_cache_is_extended_by_new_points(tmp_path: Path, cache: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    img = Image(tmp_path / "disk.img", 8 * MiB)
    img.random(0, 4 * MiB, seed=1)
    api_backup(repo.location, img.path)
    _same(repo)
    for step in range(3):
        img.take_changes()
        img.random(step * C, 3 * C, seed=10 + step)
        img.write(6 * MiB + step * C, open(img.path, "rb").read(C))  # a hit of live content
        api_backup(repo.location, img.path, img.changes_file(tmp_path / f"c{step}.json"))
        before = os.stat(_cache_file(repo)).st_mtime_ns
        h = _same(repo)
        assert os.stat(_cache_file(repo)).st_mtime_ns != before
        assert h._lives is not None and [len(c) for c in h._lives.chains] == [step + 2]


def test_a_hit_of_ended_content_rebuilds(tmp_path: Path, cache: Path) -> None:
    """A dedup hit of a chunk whose only life ended before the cached point cannot be placed
    by extending: the lives are built again, with the same figures as the walk."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    img = Image(tmp_path / "disk.img", 4 * MiB)
    img.random(0, MiB, seed=1)
    old = open(img.path, "rb").read(C)
    api_backup(repo.location, img.path)
    img.take_changes()
    img.random(0, C, seed=2)  # the first chunk's content ends here
    api_backup(repo.location, img.path, img.changes_file(tmp_path / "c1.json"))
    _same(repo)
    img.take_changes()
    img.write(2 * MiB, old)  # ... and comes back elsewhere: a hit of ended content
    api_backup(repo.location, img.path, img.changes_file(tmp_path / "c2.json"))
    h = History.of(repo.storage, repo.points())
    last = str(h.points[-1].changes)
    cached = lives_cache.CacheFile(_cache_file(repo)).lives(with_state=True)
    with pytest.raises(lives.Rebuild):
        cached.extend([(h.points[-1].source, last, h._rows_of(last))])
    _same(repo)
    assert lives_cache.CacheFile(_cache_file(repo)).chains[0] == [
        p.changes for p in History.of(repo.storage, repo.points()).points
    ]


def test_a_damaged_or_foreign_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    repo, _points, _ = make_history(tmp_path)
    _same(repo)
    path = _cache_file(repo)
    with zipfile.ZipFile(path) as zf:
        names = [i for i in zf.infolist() if i.filename.startswith("pairs.")]
    data = bytearray(Path(path).read_bytes())
    data[names[-1].header_offset + 100] ^= 0xFF  # inside a member: its BLAKE3 fails
    Path(path).write_bytes(bytes(data))
    _same(repo)
    Path(path).write_bytes(b"not a zip")
    _same(repo)
    # A cache of another history under this id (a copied repository that went its own way).
    other = _synthetic(tmp_path / "o", 4, seed=3)
    _same(other)
    os.replace(_cache_file(other), path)
    _same(repo)
    mine = [p.changes for p in History.of(repo.storage, repo.points()).points]
    assert lives_cache.CacheFile(path).chains == [mine]  # rewritten for this history


def test_a_removed_point_is_not_served_from_the_cache(tmp_path: Path, cache: Path) -> None:
    repo = _synthetic(tmp_path, 6, seed=4)
    _same(repo)
    last = History.of(repo.storage, repo.points()).points[-1]
    Path(repo.location, point_name(last.id)).unlink()
    h = _same(repo)
    assert h._lives is not None and len(h._lives.chains[0]) == 5


def test_an_incomplete_source_takes_the_walk(tmp_path: Path, cache: Path) -> None:
    """A point without a change table (comb 0.1) makes its source incomplete: no lives, no
    cache, and the walk as before; the other, complete source does not change that."""
    repo, points, _ = make_history(tmp_path)
    b = Image(tmp_path / "b.img", 2 * MiB)
    b.random(0, MiB, seed=3)
    api_backup(repo.location, b.path, name="b")
    Path(repo.location, point_name(points[1].id)).unlink()
    moved = commit_point(repo.storage, replace(points[1], changes=None))
    assert moved.changes is None
    h = History.of(repo.storage, repo.points())
    assert h.lives() is None and not h.complete.all()
    assert not os.path.exists(_cache_file(repo))


def test_two_sources_extended_in_turn(tmp_path: Path, cache: Path) -> None:
    """Sources sharing chunks, cached after each backup: a hit across sources is placed."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    a = Image(tmp_path / "a.img", 4 * MiB)
    a.random(0, 2 * MiB, seed=5)
    api_backup(repo.location, a.path, name="a")
    _same(repo)
    b = a.clone(tmp_path / "b.img")
    b.random(3 * MiB, 2 * C, seed=7)
    api_backup(repo.location, b.path, name="b")  # all hits of a's live content
    _same(repo)
    a.take_changes()
    a.random(0, 4 * C, seed=8)
    api_backup(repo.location, a.path, a.changes_file(tmp_path / "ca.json"), name="a")
    _same(repo)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 9))
def test_any_history_cached_then_extended_equals_the_walk(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    cut: int,
) -> None:
    """Lives cached for the first ``cut`` points, then extended (or rebuilt) to all ten."""
    root = tmp_path_factory.mktemp("h")
    monkeypatch.setenv(CACHE_ENV, str(root / "cache"))
    monkeypatch.setattr(lives_cache, "CACHE_MIN_ROWS", 0)
    repo = _synthetic(root, 10, seed)
    h = History.of(repo.storage, repo.points())
    hidden = [Path(repo.location, point_name(p.id)) for p in h.points[cut:]]
    saved = [(p, p.read_bytes()) for p in hidden]
    for p in hidden:
        p.unlink()
    _same(repo)
    for p, data in saved:
        p.write_bytes(data)
    _same(repo)


def test_the_cache_outlives_forgetting(tmp_path: Path, cache: Path) -> None:
    """Forgetting points keeps the cached chains (they run through the forgotten points'
    change tables): the cache is used as it is, and gives the figures of a fresh build."""
    repo = _synthetic(tmp_path, 8, seed=3)
    _same(repo)
    path = _cache_file(repo)
    before = os.stat(path).st_mtime_ns
    for p in repo.points()[1:6:2]:
        retire_point(repo.storage, p.id)
    live = repo.points()
    gone, _ = load_forgotten(repo.storage, live)
    h = History.of(repo.storage, live, gone)
    lone, freed = h.lone_bytes(), h.freed_by(np.zeros(len(live), bool))
    assert os.stat(path).st_mtime_ns == before and h._full is not None and h._full._lives
    os.unlink(path)
    fresh = History.of(repo.storage, live, gone)
    assert fresh.lone_bytes().tolist() == lone.tolist() and not freed.any()
    assert os.stat(path).st_mtime_ns != before


def _two_sources(tmp_path: Path) -> Repository:
    """Two disks sharing content (a clone), each changed twice, with hits across them."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    a = Image(tmp_path / "a.img", 8 * MiB)
    a.random(0, 2 * MiB, seed=5)
    api_backup(repo.location, a.path, name="a")
    b = a.clone(tmp_path / "b.img")
    for step in range(2):
        for img, name in ((a, "a"), (b, "b")):
            img.take_changes()
            img.random(step * MiB, 3 * C, seed=20 + step + len(name))
            img.write(4 * MiB + step * C, open(a.path, "rb").read(C))  # a hit of a's chunk 0
            changes = (
                img.changes_file(tmp_path / f"{name}{step}.json") if step or name == "a" else None
            )
            api_backup(repo.location, img.path, changes, name=name)
    return repo


@pytest.mark.parametrize("seed", [1, 2, 0])
def test_building_at_once_equals_adding_point_by_point(tmp_path: Path, seed: int) -> None:
    """``lives_build.build`` (every row at once) gives the very lives ``Lives.extend`` gives
    point by point: the same sums, group lives and latest content, so either can be cached
    and extended. (Seed 0: two real sources sharing chunks.)"""
    repo = _synthetic(tmp_path, 12, seed=seed, dedup=0.3) if seed else _two_sources(tmp_path)
    h = History.of(repo.storage, repo.points())
    assert len(h.sources) == (1 if seed else 2) and h.complete.all()
    c = h._columns()
    stepwise = lives.Lives(C)
    stepwise.extend([(p.source, str(p.changes), c.rows(i)) for i, p in enumerate(h.points)])
    chains = [(p.source, str(p.changes)) for p in h.points]
    at_once = lives_build.build(C, chains, c.chunk_no, c.key, c.kind, c.stored, c.starts)
    assert at_once.sources == stepwise.sources and at_once.chains == stepwise.chains

    def pairs(lv: lives.Lives) -> list[tuple[int, ...]]:
        g = lv.pairs
        return sorted(zip(*(g[n].tolist() for n in g.names), strict=True))

    assert pairs(at_once) == pairs(stepwise) and pairs(at_once)
    for name in ("group_keys", "gnew", "ghit"):
        a, b = getattr(at_once, name), getattr(stepwise, name)
        assert a.n == b.n > 0, name
        for col in a.names:
            assert a[col].tolist() == b[col].tolist(), (name, col)
    for a, b in zip(at_once.held, stepwise.held, strict=True):
        for col in ("birth", "key", "stored", "kind"):
            assert getattr(a, col).tolist() == getattr(b, col).tolist(), col
        grouped = a.kind >= 2  # (the ref of other slots is not looked at, and may be stale)
        assert a.ref[grouped].tolist() == b.ref[grouped].tolist()
    for col in ("open_src", "open_birth", "open_bytes"):
        assert getattr(at_once, col).tolist() == getattr(stepwise, col).tolist()
