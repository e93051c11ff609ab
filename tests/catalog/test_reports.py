"""Named reports against values computed independently from known backups: the bytes a test
changed, and what garbage collection would free (chunks no remaining point's manifest holds)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from catalogtest import gc_frees, gc_truth
from combtest import TEST_PASSWORD, Image, MiB, api_backup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.catalog_gen import Spec, generate
from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import ReportOptions, run_report
from catalog.maint.retention import KeepPolicy, forget_mask
from catalog.repo import Repository
from catalog.store.points import PointStats, RecoveryPoint, commit_point, retire_point

C = 64 * 1024


def test_change_tables_record_exactly_the_changed_bytes(history) -> None:  # type: ignore[no-untyped-def]
    repo, points, changed = history
    assert [p.stats.bytes_changed for p in points[1:]] == changed
    # 6 MiB of data throughout: rewrites in place, and in step 1 one chunk zeroed while a
    # copied chunk fills a hole.
    assert [p.stats.bytes_data for p in points] == [6 * MiB] * 4


def test_unique_bytes_equal_what_gc_would_free(history) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    held, stored = gc_truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    got = run_report(cat, "unique", ReportOptions()).table.to_pylist()
    by_id = {r["point_id"]: r["unique_bytes"] for r in got}
    for p in points:
        assert by_id[p.id] == gc_frees(held, stored, {p.id}), p.id
    assert by_id[points[1].id] > 0  # its hot-spot content lived one point only


@pytest.mark.parametrize("forget", [[0], [1, 2], [0, 1, 2], [3], [1, 3], [0, 1, 2, 3]])
def test_retention_frees_what_gc_would_free(history, forget: list[int]) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    held, stored = gc_truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    opts = ReportOptions(forget=tuple(points[i].id for i in forget))
    result = run_report(cat, "retention", opts)
    assert result.table.column("freed_bytes").to_pylist() == [
        gc_frees(held, stored, {points[i].id for i in forget})
    ]
    assert result.table.column("forgotten").to_pylist() == [len(forget)]


def test_hot_regions_find_the_spot_changed_every_time(history) -> None:  # type: ignore[no-untyped-def]
    repo, _, _ = history
    cat = Catalog.open(repo.storage, repo.points())
    opts = ReportOptions(bucket_bytes=MiB, limit=None)
    rows = run_report(cat, "hot-regions", opts).table.to_pylist()
    assert rows[0]["region_offset"] == 1 * MiB
    assert (rows[0]["changes"], rows[0]["points"], rows[0]["changed_bytes"]) == (6, 3, 6 * C)
    assert sum(r["changes"] for r in rows) == 11  # 2+1 per point, + zeroed + dedup-hit chunk
    last = datetime.fromisoformat(repo.points()[-1].time)
    rows = run_report(cat, "hot-regions", ReportOptions(bucket_bytes=MiB, since=last)).table
    assert sorted(rows.column("changes").to_pylist()) == [1, 2]  # the last point alone


def test_growth_and_ratios_add_up(history) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    cat = Catalog.open(repo.storage, repo.points())
    rows = run_report(cat, "growth", ReportOptions()).table.to_pylist()
    assert rows[-1]["cumulative_stored_bytes"] == sum(p.stats.bytes_stored for p in points)
    assert rows[-1]["data_bytes"] == points[-1].stats.bytes_data
    ratios = run_report(cat, "ratios", ReportOptions()).table.to_pylist()[-1]
    logical = sum(p.stats.bytes_data for p in points)
    assert ratios["dedup_ratio"] == pytest.approx(logical / sum(p.stats.bytes_new for p in points))


# ---------------------------------------------------------------------------------------------
# Reports that read only point documents, on histories with chosen times and sizes


def _doc(source: str, t: datetime, stored: int, seconds: float = 1.0) -> RecoveryPoint:
    return RecoveryPoint(
        source=source,
        source_path="/dev/null",
        time=t.isoformat(timespec="microseconds"),
        size=1 << 30,
        chunk_size=C,
        leaf_chunks=16,
        root="0" * 64,
        leaves=None,
        parent=None,
        index_segment=None,
        engine="local",
        mode="full",
        stats=PointStats(bytes_read=stored * 2, bytes_stored=stored, seconds=seconds),
    )


def test_projection_recovers_the_slope_of_a_linear_history(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), C, 3, password=TEST_PASSWORD)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    for day in range(40):
        commit_point(repo.storage, _doc("a", t0 + timedelta(days=day), 5_000_000))
    cat = Catalog.open(repo.storage, repo.points())
    result = run_report(cat, "projection", ReportOptions(horizons=(30, 365)))
    rows = result.table.to_pylist()
    assert rows[0]["slope_bytes_per_day"] == pytest.approx(5_000_000)
    assert rows[0]["r2"] == pytest.approx(1.0)
    assert [r["horizon_days"] for r in rows] == [0, 30, 365]
    assert rows[2]["projected_bytes"] == pytest.approx(200_000_000 + 365 * 5_000_000)
    assert result.notes == []
    # The same line from three days of history: a year ahead is flagged as a guess.
    short = run_report(cat, "projection", ReportOptions(since=t0 + timedelta(days=37)))
    assert any("spans" in n for n in short.notes)


def test_projection_warns_when_the_fit_is_poor(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), C, 3, password=TEST_PASSWORD)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    # Nothing for ten days, one huge backup, then nothing again: a step, not a line.
    for day in range(20):
        commit_point(repo.storage, _doc("a", t0 + timedelta(days=day), 10**9 if day == 10 else 0))
    cat = Catalog.open(repo.storage, repo.points())
    result = run_report(cat, "projection", ReportOptions())
    r2 = result.table.column("r2")[0].as_py()
    assert r2 < 0.8
    assert any("poor fit" in n for n in result.notes)
    few = Repository.init(str(tmp_path / "few"), C, 3, password=TEST_PASSWORD)
    commit_point(few.storage, _doc("a", t0, 1))
    notes = run_report(Catalog.open(few.storage, few.points()), "projection", ReportOptions()).notes
    assert any("only 1 point" in n for n in notes)


def test_rpo_change_rate_and_throughput(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), C, 3, password=TEST_PASSWORD)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    hours = [0, 1, 2, 8, 9]  # the largest gap: 6 hours, from hour 2 to hour 8
    for h in hours:
        commit_point(repo.storage, _doc("a", t0 + timedelta(hours=h), 1000, seconds=2.0))
    commit_point(repo.storage, _doc("b", t0, 1000))
    cat = Catalog.open(repo.storage, repo.points())
    now = t0 + timedelta(hours=10)
    rows = {
        r["source"]: r for r in run_report(cat, "rpo", ReportOptions(now=now)).table.to_pylist()
    }
    assert rows["a"]["largest_gap_hours"] == pytest.approx(6.0)
    assert rows["a"]["gap_from"] == t0 + timedelta(hours=2)
    assert rows["a"]["hours_since_last"] == pytest.approx(1.0)
    assert rows["b"]["largest_gap_hours"] is None and rows["b"]["points"] == 1
    tp = run_report(cat, "throughput", ReportOptions(source="a")).table.to_pylist()
    assert [r["read_mb_per_s"] for r in tp] == [pytest.approx(2000 / 2.0 / 1e6)] * 5


def test_keep_policy_keeps_the_newest_of_each_period() -> None:
    t0 = datetime(2026, 3, 1, 10, tzinfo=UTC)
    pts = [_doc("a", t0 + timedelta(hours=6 * i), 1).with_id() for i in range(12)]  # 3 days
    kept = ~forget_mask(pts, KeepPolicy(daily=2), ())
    assert [p.time[:13] for p, k in zip(pts, kept, strict=True) if k] == [
        "2026-03-03T22",
        "2026-03-04T04",
    ]
    kept = ~forget_mask(pts, KeepPolicy(last=1, weekly=1), ())
    assert int(kept.sum()) == 1


# ---------------------------------------------------------------------------------------------
# Any synthetic history (dedup hits, zeros, hot regions): the arithmetic matches the manifests


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    forget=st.lists(st.booleans(), min_size=8, max_size=8),
    forgotten=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_any_history_frees_what_gc_would_free(
    tmp_path_factory: pytest.TempPathFactory, seed: int, forget: list[bool], forgotten: list[bool]
) -> None:
    """Also after some points were forgotten earlier (their change tables kept): the figures
    are those of the points left."""
    root = tmp_path_factory.mktemp("h")
    repo = Repository.init(str(root / "r"), C, 3, password=TEST_PASSWORD)
    spec = Spec(
        points=8,
        disk_bytes=8 * MiB,
        change=0.08,
        hot_regions=2,
        hot_region_bytes=MiB,
        dedup_share=0.2,
        zero_share=0.1,
        seed=seed,
    )
    generate(repo, spec)
    held, stored = gc_truth(repo)
    for p, drop in zip(repo.points(), forgotten, strict=True):
        if drop:
            retire_point(repo.storage, p.id)
            del held[p.id]
    cat = Catalog.open(repo.storage, repo.points())
    assert cat.history.complete.all()
    ids = [p.id for p in cat.history.points]
    assert set(ids) == set(held)
    lone = cat.unique_bytes()
    for i, pid in enumerate(ids):
        assert lone[i] == gc_frees(held, stored, {pid})
    mask = np.array(forget[: len(ids)], bool)
    assert sum(cat.freed(mask).values()) == gc_frees(
        held, stored, {ids[i] for i in range(len(ids)) if mask[i]}
    )


def test_unique_and_retention_across_sources_sharing_chunks(tmp_path: Path) -> None:
    """Two disks that share content (a clone): a chunk is freed only when no point of either
    source holds it."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    a = Image(tmp_path / "a.img", 8 * MiB)
    a.random(0, 2 * MiB, seed=5)
    a.compressible(4 * MiB, MiB, seed=6)
    api_backup(repo.location, a.path, name="a")
    b = a.clone(tmp_path / "b.img")
    b.random(6 * MiB, 3 * C, seed=7)  # b diverges a little
    api_backup(repo.location, b.path, name="b")
    a.take_changes()
    a.random(0, 4 * C, seed=8)  # a rewrites the start that b still holds
    api_backup(repo.location, a.path, a.changes_file(tmp_path / "ca.json"), name="a")
    b.take_changes()
    b.random(C, C, seed=9)
    api_backup(repo.location, b.path, b.changes_file(tmp_path / "cb.json"), name="b")
    held, stored = gc_truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    ids = [p.id for p in cat.history.points]
    assert list(cat.unique_bytes()) == [gc_frees(held, stored, {pid}) for pid in ids]
    for mask in ([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0]):
        gone = {pid for pid, m in zip(ids, mask, strict=True) if m}
        got = sum(cat.freed(np.array(mask, bool)).values())
        assert got == gc_frees(held, stored, gone), mask


def test_a_source_without_rows_and_a_clock_that_stepped_back(tmp_path: Path) -> None:
    """Regressions: a last source with no change rows (an all-zero disk) must not shift the
    sums of the others; points of a source are ordered by their parent chain, not by time."""
    from catalog.store.points import point_name

    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    a = Image(tmp_path / "a.img", 2 * MiB)
    a.random(0, MiB, seed=1)
    first = api_backup(repo.location, a.path, name="a")
    a.take_changes()
    a.random(0, C, seed=2)
    second = api_backup(repo.location, a.path, a.changes_file(tmp_path / "c.json"), name="a")
    # The second backup's clock was an hour behind: same document, earlier time.
    earlier = (datetime.fromisoformat(first.time) - timedelta(hours=1)).isoformat()
    Path(repo.location, point_name(second.id)).unlink()
    moved = commit_point(repo.storage, replace(second, time=earlier))
    api_backup(repo.location, Image(tmp_path / "z.img", MiB).path, name="zz")  # zeros only
    held, stored = gc_truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    ids = [p.id for p in cat.history.points]
    assert ids[:2] == [first.id, moved.id]  # down the chain, not by time
    assert list(cat.unique_bytes()) == [gc_frees(held, stored, {pid}) for pid in ids]
    for mask in ([1, 0, 0], [0, 1, 0], [1, 1, 1]):
        gone = {pid for pid, m in zip(ids, mask, strict=True) if m}
        assert sum(cat.freed(np.array(mask, bool)).values()) == gc_frees(held, stored, gone)


def test_forgotten_points_beside_an_incomplete_source_are_not_guessed(tmp_path: Path) -> None:
    """When another source is incomplete the figures come from walking the live rows, which
    cannot follow a chain through forgotten points: such a source's figures are then left
    empty (not exact), never wrong."""
    from combtest import flip_byte

    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    ids: dict[str, list[str]] = {"a": [], "b": []}
    for name in ("a", "b"):
        img = Image(tmp_path / f"{name}.img", 4 * MiB)
        img.random(0, 2 * MiB, seed=len(name))
        ids[name].append(api_backup(repo.location, img.path, name=name).id)
        for step in range(2):
            img.take_changes()
            img.random(step * MiB, MiB, seed=10 + step)
            changes = img.changes_file(tmp_path / f"{name}{step}.json")
            ids[name].append(api_backup(repo.location, img.path, changes, name=name).id)
    retire_point(repo.storage, ids["a"][1])
    cat = Catalog.open(repo.storage, repo.points())
    held, stored = gc_truth(repo)
    unique = dict(zip([p.id for p in cat.history.points], cat.unique_bytes().tolist(), strict=True))
    assert cat.history.complete.all()
    assert unique == {pid: gc_frees(held, stored, {pid}) for pid in held}
    b_last = next(p for p in repo.points() if p.id == ids["b"][2])
    flip_byte(Path(repo.location, "manifests", "changes", f"{b_last.changes}.parquet"), 40)
    cat = Catalog.open(repo.storage, repo.points())
    cat.unique_bytes()
    assert not cat.history.complete.any()  # b: damaged; a: only exact through its tombstone
    rows = run_report(cat, "unique", ReportOptions()).table.to_pylist()
    assert rows and all(r["unique_bytes"] is None for r in rows)
