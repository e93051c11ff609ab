"""Analytics through the command line and the views: formats, errors, read-only queries,
the schema documentation, time zones, and histories the reports must treat with care."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalogtest import gc_frees, gc_truth
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    MiB,
    api_backup,
    assert_one_line_error,
    flip_byte,
)

from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import ReportOptions, run_report
from catalog.repo import Repository
from catalog.store.changes import changes_name
from catalog.store.manifest import roots_name
from catalog.store.points import load_forgotten

C = 64 * 1024


# ---------------------------------------------------------------------------------------------
# The command line


def test_report_cli(cli: CliRunner, history, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    r = repo.location
    res = cli("-r", r, "report", "--list")
    assert res.code == 0 and "hot-regions" in res.out and "projection" in res.out
    res = cli("-r", r, "report", "unique", "--format", "json")
    rows = json.loads(res.out)["rows"]
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
    assert [row["point_id"] for row in json.loads(res.out)["rows"]] == [p.id for p in points[2:]]


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
    total = {row["kind"]: int(row["n"]) for row in json.loads(res.out)["rows"]}
    assert (total["data"], total["zero"]) == (4 * 6 * MiB, 4 * 10 * MiB)


def test_catalog_schema_documents_every_column(cli: CliRunner, tmp_path: Path) -> None:
    from catalog.analytics.schema_doc import VIEWS

    repo = Repository.init(str(tmp_path / "r"), C, 3, password=TEST_PASSWORD)
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
    from catalog.store.changes import ChangeTableWriter
    from catalog.store.leaves import Leaf
    from catalog.store.manifest import ManifestWriter

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
    assert [row["unique_bytes"] for row in json.loads(res.out)["rows"]] == [None] * 3
    assert cli("-r", repo, "dashboard", tmp_path / "g.html").code == 0


def test_a_damaged_change_table_is_left_out_with_a_warning(cli: CliRunner, history) -> None:  # type: ignore[no-untyped-def]
    repo, points, _ = history
    path = Path(repo.location) / "manifests" / "changes" / f"{points[2].changes}.parquet"
    flip_byte(path, 40)
    res = cli("-r", repo.location, "report", "unique", "--format", "json")
    assert res.code == 0
    assert "left out" in res.err and points[2].id in res.err and "partial" in res.err
    assert all(row["unique_bytes"] is None for row in json.loads(res.out)["rows"])
    res = cli("-r", repo.location, "report", "growth")
    assert res.code == 0 and "left out" not in res.err  # growth reads no change table
    res = cli("-r", repo.location, "verify", "--json")  # analytics data: a warning, no error
    doc = json.loads(res.out)
    assert res.code == 0 and any("change table" in w for w in doc["warnings"]), doc


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
    # Plain: an encrypted repository's Parquet bytes differ each time (random nonces), so
    # identical manifests do not share a root file there.
    repo = Repository.init(str(tmp_path / "repo"), C, 3, encryption="none")
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


def test_forgotten_points_keep_the_figures_exact(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    """After `forget` and `prune`, each chain goes on through the forgotten points' change
    tables (their manifests are gone): unique and retention stay exact, equal to what garbage
    collection frees, including a dedup hit of content only a forgotten point stored."""
    img = make_image(4 * MiB, "d.img")
    img.random(0, 3 * MiB, seed=1)
    ids = [api_backup(repo_path, img.path, name="d").id]
    for step, (offset, length, seed) in enumerate(
        [(0, MiB, 2), (3 * MiB, C, 1), (MiB, MiB, 3), (0, C, 4)]
    ):
        img.take_changes()
        img.random(offset, length, seed=seed)  # (3 MiB, seed 1): the first point's chunk 0
        changes = img.changes_file(tmp_path / f"c{step}.json")
        ids.append(api_backup(repo_path, img.path, changes, name="d").id)
    r = str(repo_path)
    res = cli("-r", r, "forget", "--keep-last", "3")
    assert res.code == 0, res.err
    res = cli("-r", r, "prune")
    assert res.code == 0, res.err
    repo = Repository.open(r, password=TEST_PASSWORD)
    gone, bad = load_forgotten(repo.storage, repo.points())
    assert [p.id for p in gone] == ids[:2] and not bad
    for p in gone:  # the change table stays, the manifest goes
        assert (repo_path / changes_name(str(p.changes))).exists()
        assert not (repo_path / roots_name(p.root)).exists()
    held, stored = gc_truth(repo)
    assert sorted(held) == sorted(ids[2:])
    res = cli("-r", r, "report", "unique", "--format", "json")
    assert res.code == 0 and "incomplete" not in res.err, res.err
    got = {row["point_id"]: row["unique_bytes"] for row in json.loads(res.out)["rows"]}
    assert got == {pid: gc_frees(held, stored, {pid}) for pid in ids[2:]}
    assert got[ids[2]] > 0  # it alone holds what the forgotten point 0 stored at offset 0
    res = cli("-r", r, "report", "retention", "--keep-last", "1", "--format", "json")
    assert res.code == 0, res.err
    [row] = json.loads(res.out)["rows"]
    assert (row["points"], row["forgotten"]) == (3, 2)
    assert row["freed_bytes"] == gc_frees(held, stored, set(ids[2:4])) > 0
    # A damaged change table of a forgotten point: verify warns (analytics data), and the
    # source's exact figures are left empty rather than guessed.
    flip_byte(repo_path / changes_name(str(gone[1].changes)), 40)
    res = cli("-r", r, "verify", "--json")
    doc = json.loads(res.out)
    assert res.code == 0 and any(f"forgotten point {ids[1]}" in w for w in doc["warnings"]), doc
    res = cli("-r", r, "report", "unique", "--format", "json")
    assert res.code == 0 and ids[1] in res.err and "partial" in res.err, res.err
    assert all(row["unique_bytes"] is None for row in json.loads(res.out)["rows"])
