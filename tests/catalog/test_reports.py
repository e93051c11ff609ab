"""Named reports against values computed independently from known backups: the bytes a test
changed, and what garbage collection would free (chunks no remaining point's manifest holds)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from combtest import CliRunner, Image, MiB, api_backup, assert_one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.catalog_gen import Spec, generate
from catalog.analytics import Catalog
from catalog.index import load_index
from catalog.points import PointStats, RecoveryPoint, commit_point
from catalog.repo import Repository
from catalog.reports import ReportOptions, run_report
from catalog.retention import KeepPolicy, forget_mask

C = 64 * 1024


def _truth(repo: Repository) -> tuple[dict[str, set[bytes]], dict[bytes, int]]:
    """Per point the set of chunk ids its manifest holds, and the stored bytes of each chunk
    (summed over its stored copies): read from manifests and the index, not change tables."""
    held = {}
    for p in repo.points():
        m = repo.manifest(p)
        ids: set[bytes] = set()
        for ref in m.refs():
            ids.update(bytes(row) for row in m.leaf(ref).ids)
        held[p.id] = ids
    stored: dict[bytes, int] = {}
    index = load_index(repo.storage, ["chunk_id", "stored_len"]).to_pylist()
    for row in index:
        stored[row["chunk_id"]] = stored.get(row["chunk_id"], 0) + row["stored_len"]
    return held, stored


def _gc_frees(held: dict[str, set[bytes]], stored: dict[bytes, int], gone: set[str]) -> int:
    kept: set[bytes] = set().union(*(ids for pid, ids in held.items() if pid not in gone))
    freed: set[bytes] = set().union(*(held[pid] for pid in gone)) - kept
    return sum(stored[c] for c in freed)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Repository, list[RecoveryPoint], list[int]]:
    """Four real backups of one disk: full, then three with known changes (two hot spots,
    one zeroed chunk, a rewrite with identical bytes, one copied chunk = a dedup hit)."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3)
    img = Image(tmp_path / "disk.img", 16 * MiB)
    img.random(0, 4 * MiB, seed=1)
    img.compressible(8 * MiB, 2 * MiB, seed=2)
    points = [api_backup(repo.location, img.path)]
    changed = []
    for step in range(3):
        img.take_changes()
        img.random(1 * MiB, 2 * C, seed=10 + step)  # the hot spot: every point
        img.random(9 * MiB + step * C, C, seed=20 + step)  # a new place each time
        data = open(img.path, "rb").read(C)
        img.write(0, data)  # same bytes: not a change
        if step == 1:
            img.zeros(2 * MiB, C)  # data -> zeros
            img.write(12 * MiB, open(img.path, "rb").read(5 * C)[4 * C :])  # a dedup hit
        changes = img.changes_file(tmp_path / f"c{step}.json")
        points.append(api_backup(repo.location, img.path, changes))
        changed.append(3 * C + (2 * C if step == 1 else 0))
    return repo, points, changed


def test_change_tables_record_exactly_the_changed_bytes(history) -> None:  # type: ignore[no-untyped-def]
    repo, points, changed = history
    assert [p.stats.bytes_changed for p in points[1:]] == changed
    # 6 MiB of data throughout: rewrites in place, and in step 1 one chunk zeroed while a
    # copied chunk fills a hole.
    assert [p.stats.bytes_data for p in points] == [6 * MiB] * 4


def test_unique_bytes_equal_what_gc_would_free(history) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    held, stored = _truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    got = run_report(cat, "unique", ReportOptions()).table.to_pylist()
    by_id = {r["point_id"]: r["unique_bytes"] for r in got}
    for p in points:
        assert by_id[p.id] == _gc_frees(held, stored, {p.id}), p.id
    assert by_id[points[1].id] > 0  # its hot-spot content lived one point only


@pytest.mark.parametrize("forget", [[0], [1, 2], [0, 1, 2], [3], [1, 3], [0, 1, 2, 3]])
def test_retention_frees_what_gc_would_free(history, forget: list[int]) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    held, stored = _truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    opts = ReportOptions(forget=tuple(points[i].id for i in forget))
    result = run_report(cat, "retention", opts)
    assert result.table.column("freed_bytes").to_pylist() == [
        _gc_frees(held, stored, {points[i].id for i in forget})
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
    repo = Repository.init(str(tmp_path / "r"), C, 3)
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
    repo = Repository.init(str(tmp_path / "r"), C, 3)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    # Nothing for ten days, one huge backup, then nothing again: a step, not a line.
    for day in range(20):
        commit_point(repo.storage, _doc("a", t0 + timedelta(days=day), 10**9 if day == 10 else 0))
    cat = Catalog.open(repo.storage, repo.points())
    result = run_report(cat, "projection", ReportOptions())
    r2 = result.table.column("r2")[0].as_py()
    assert r2 < 0.8
    assert any("poor fit" in n for n in result.notes)
    few = Repository.init(str(tmp_path / "few"), C, 3)
    commit_point(few.storage, _doc("a", t0, 1))
    notes = run_report(Catalog.open(few.storage, few.points()), "projection", ReportOptions()).notes
    assert any("only 1 point" in n for n in notes)


def test_rpo_change_rate_and_throughput(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), C, 3)
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
@given(seed=st.integers(0, 10_000), forget=st.lists(st.booleans(), min_size=8, max_size=8))
def test_any_history_frees_what_gc_would_free(
    tmp_path_factory: pytest.TempPathFactory, seed: int, forget: list[bool]
) -> None:
    root = tmp_path_factory.mktemp("h")
    repo = Repository.init(str(root / "r"), C, 3)
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
    held, stored = _truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    ids = [p.id for p in cat.history.points]
    lone = cat.unique_bytes()
    for i, pid in enumerate(ids):
        assert lone[i] == _gc_frees(held, stored, {pid})
    mask = np.array(forget)
    assert int(cat.freed(mask).sum()) == _gc_frees(
        held, stored, {ids[i] for i in range(8) if forget[i]}
    )


# ---------------------------------------------------------------------------------------------
# The command line


def test_report_cli(cli: CliRunner, history, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    r = repo.location
    res = cli("-r", r, "report", "--list")
    assert res.code == 0 and "hot-regions" in res.out and "projection" in res.out
    res = cli("-r", r, "report", "unique", "--format", "json")
    rows = json.loads(res.out)
    assert res.code == 0 and len(rows) == 4
    out = tmp_path / "g.csv"
    res = cli("-r", r, "report", "growth", "--format", "csv", "--output", out)
    assert res.code == 0 and out.read_text().startswith("source,period,points")
    res = cli("-r", r, "report", "retention", "--keep-last", "1")
    assert res.code == 0 and "frees" in res.err
    assert_one_line_error(cli("-r", r, "report", "nope"), "unknown report 'nope'", code=9)
    assert_one_line_error(cli("-r", r, "report", "retention"), "policy", code=2)
    assert_one_line_error(
        cli("-r", r, "report", "growth", "--since", "yesterday"), "--since", code=2
    )
    assert_one_line_error(cli("-r", r, "report", "growth", "--source", "x"), "'x'", code=2)
    assert_one_line_error(cli("-r", r, "report", "retention", "--forget", "ffff"), "ffff", code=4)
    since = (datetime.fromisoformat(points[2].time) - timedelta(microseconds=1)).isoformat()
    res = cli("-r", r, "report", "throughput", "--since", since, "--format", "json")
    assert [row["point_id"] for row in json.loads(res.out)] == [p.id for p in points[2:]]


def test_query_cli_formats_and_read_only(cli: CliRunner, history, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    repo, points, changed = history
    r = repo.location
    out = tmp_path / "q.parquet"
    sql = "SELECT point_id, sum(length) AS b FROM changes GROUP BY ALL"
    res = cli("-r", r, "query", sql, "--format", "parquet", "--output", out)
    assert res.code == 0, res.err
    got = {row["point_id"]: row["b"] for row in pq.read_table(out).to_pylist()}
    assert [got[p.id] for p in points[1:]] == changed
    assert_one_line_error(cli("-r", r, "query", sql, "--format", "parquet"), "--output", code=2)
    assert_one_line_error(cli("-r", r, "query", "DELETE FROM points"), "read-only", code=9)
    assert_one_line_error(cli("-r", r, "query", "SELEC 1"), "bad SQL", code=9)
    res = cli(
        "-r",
        r,
        "query",
        "SELECT kind, sum(length) AS n FROM extents GROUP BY kind ORDER BY kind",
        "--format",
        "json",
    )
    total = {row["kind"]: int(row["n"]) for row in json.loads(res.out)}
    assert (total["data"], total["zero"]) == (4 * 6 * MiB, 4 * 10 * MiB)


def test_catalog_schema_documents_every_column(cli: CliRunner, tmp_path: Path) -> None:
    from catalog.schema_doc import VIEWS

    repo = Repository.init(str(tmp_path / "r"), C, 3)
    cat = Catalog.open(repo.storage, [])
    for view, (_about, columns) in VIEWS.items():
        cat.need(view)
        names = [row[0] for row in cat.con.execute(f"DESCRIBE {view}").fetchall()]
        assert names == list(columns), view
    res = cli("-r", repo.location, "catalog-schema")
    assert res.code == 0 and "point_usage" in res.out and "unique_bytes" in res.out


def test_an_uncommitted_backup_is_invisible(history) -> None:  # type: ignore[no-untyped-def]
    """What a backup writes before its commit (here: a change table, leaves and a root whose
    point document never appears) changes no view and no report."""
    from catalog.changes import ChangeTableWriter
    from catalog.manifest import Leaf, ManifestWriter

    repo, _, _ = history

    def look() -> tuple[object, ...]:
        cat = Catalog.open(repo.storage, repo.points())
        sql = (
            "SELECT count(*), sum(length) FROM changes UNION ALL SELECT count(*), 0 FROM manifests"
        )
        cat.need(sql)
        return (
            cat.con.execute(sql).fetchall(),
            run_report(cat, "unique", ReportOptions()).table.to_pylist(),
            run_report(cat, "hot-regions", ReportOptions(limit=None)).table.to_pylist(),
        )

    before = look()
    ids = np.arange(64, dtype=np.uint8).reshape(2, 32)
    table = ChangeTableWriter(repo.storage)
    table.add(
        np.array([0, C]),
        ids[:, :8].copy().view("<i8").reshape(-1),
        np.zeros(2, bool),
        np.ones(2, bool),
        np.array([10, 10]),
        np.array([C, C]),
    )
    table.commit()
    writer = ManifestWriter(repo.storage)
    writer.add_leaf(0, Leaf(np.array([0, 1], np.int16), ids))
    writer.commit()
    assert look() == before


def test_dashboard_cli_draws_the_real_history(cli: CliRunner, history, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The page from a real repository: every chart has data (the page itself is checked in a
    browser by test_dashboard.py)."""
    repo, points, _ = history
    out = tmp_path / "d.html"
    res = cli("-r", repo.location, "dashboard", out)
    assert res.code == 0, res.err
    page = out.read_text()
    assert page.count("<svg") >= 5 and "No data yet" not in page
    assert "Recovery points" in page and ">4<" in page
    assert "https://" not in page and "<script" not in page
    assert_one_line_error(
        cli("-r", repo.location, "dashboard", tmp_path / "no" / "d.html"), "cannot write", code=10
    )


def test_reports_on_a_repository_made_before_change_tables(cli: CliRunner, tmp_path: Path) -> None:
    """golden-v1 (comb 0.1) has no change tables: every report runs; the ones that need them
    say the history is partial, and unique bytes are unknown (null), never made up."""
    import shutil

    from spectables import GOLDEN

    repo = tmp_path / "golden"
    shutil.copytree(GOLDEN, repo)
    for name in (
        "growth",
        "change-rate",
        "hot-regions",
        "ratios",
        "unique",
        "projection",
        "throughput",
        "rpo",
    ):
        res = cli("-r", repo, "report", name, "--format", "json")
        assert res.code == 0, (name, res.err)
    res = cli("-r", repo, "report", "unique", "--format", "json")
    assert "partial" in res.err
    assert [row["unique_bytes"] for row in json.loads(res.out)] == [None] * 3
    assert cli("-r", repo, "dashboard", tmp_path / "g.html").code == 0


def test_a_damaged_change_table_is_left_out_with_a_warning(cli: CliRunner, history) -> None:  # type: ignore[no-untyped-def]
    from combtest import flip_byte

    repo, points, _ = history
    path = Path(repo.location) / "manifests" / "changes" / f"{points[2].changes}.parquet"
    flip_byte(path, 40)
    res = cli("-r", repo.location, "report", "unique", "--format", "json")
    assert res.code == 0
    assert "left out" in res.err and points[2].id in res.err and "partial" in res.err
    assert all(row["unique_bytes"] is None for row in json.loads(res.out))
    res = cli("-r", repo.location, "report", "growth")
    assert res.code == 0 and "left out" not in res.err  # growth reads no change table
    res = cli("-r", repo.location, "verify", "--json")  # analytics data: a warning, no error
    doc = json.loads(res.out)
    assert res.code == 0 and any("change table" in w for w in doc["warnings"]), doc


def test_unique_and_retention_across_sources_sharing_chunks(tmp_path: Path) -> None:
    """Two disks that share content (a clone): a chunk is freed only when no point of either
    source holds it."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3)
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
    held, stored = _truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    ids = [p.id for p in cat.history.points]
    assert list(cat.unique_bytes()) == [_gc_frees(held, stored, {pid}) for pid in ids]
    for mask in ([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0]):
        gone = {pid for pid, m in zip(ids, mask, strict=True) if m}
        got = int(cat.freed(np.array(mask, bool)).sum())
        assert got == _gc_frees(held, stored, gone), mask


def test_a_source_without_rows_and_a_clock_that_stepped_back(tmp_path: Path) -> None:
    """Regressions: a last source with no change rows (an all-zero disk) must not shift the
    sums of the others; points of a source are ordered by their parent chain, not by time."""
    from catalog.points import point_name

    repo = Repository.init(str(tmp_path / "repo"), C, 3)
    a = Image(tmp_path / "a.img", 2 * MiB)
    a.random(0, MiB, seed=1)
    first = api_backup(repo.location, a.path, name="a")
    a.take_changes()
    a.random(0, C, seed=2)
    second = api_backup(repo.location, a.path, a.changes_file(tmp_path / "c.json"), name="a")
    # The second backup's clock was an hour behind: same document, earlier time.
    doc = json.loads(Path(repo.location, point_name(second.id)).read_bytes())
    doc["time"] = (datetime.fromisoformat(first.time) - timedelta(hours=1)).isoformat()
    Path(repo.location, point_name(second.id)).unlink()
    moved = commit_point(
        repo.storage, RecoveryPoint(**{**doc, "stats": PointStats(**doc["stats"])})
    )
    api_backup(repo.location, Image(tmp_path / "z.img", MiB).path, name="zz")  # zeros only
    held, stored = _truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    ids = [p.id for p in cat.history.points]
    assert ids[:2] == [first.id, moved.id]  # down the chain, not by time
    assert list(cat.unique_bytes()) == [_gc_frees(held, stored, {pid}) for pid in ids]
    for mask in ([1, 0, 0], [0, 1, 0], [1, 1, 1]):
        gone = {pid for pid, m in zip(ids, mask, strict=True) if m}
        assert int(cat.freed(np.array(mask, bool)).sum()) == _gc_frees(held, stored, gone)


def test_periods_are_utc_and_since_keeps_its_period(
    history, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import time

    repo, points, _ = history
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        cat = Catalog.open(repo.storage, repo.points())
        last = datetime.fromisoformat(points[-1].time)
        rows = run_report(cat, "growth", ReportOptions(since=last)).table.to_pylist()
        assert [r["period"].date() for r in rows] == [last.astimezone(UTC).date()]
        assert rows[0]["period"].utcoffset() == timedelta(0)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_points_sharing_a_root_are_not_counted_twice(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), C, 3)
    img = Image(tmp_path / "d.img", MiB)
    img.random(0, 4 * C, seed=3)
    api_backup(repo.location, img.path)
    p2 = api_backup(repo.location, img.path)  # nothing changed: all leaves referenced
    p3 = api_backup(repo.location, img.path)  # ... by the same root bytes as p2's
    assert p2.root == p3.root
    cat = Catalog.open(repo.storage, repo.points())
    sql = "SELECT point_id, count(*) FROM manifests GROUP BY 1"
    cat.need(sql)
    assert sorted(n for _, n in cat.con.execute(sql).fetchall()) == [4, 4, 4]
