"""DuckDB views over the catalog, and the read-only guard of run_query."""

from __future__ import annotations

from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, Image, ImageFactory, KiB, api_backup

from catalog.analytics.views import connect, run_query
from catalog.errors import QueryError
from catalog.repo import Repository
from catalog.store.index import load_index
from catalog.store.points import RecoveryPoint

SIZE = 3 * 1024 * KiB + 1000  # not a multiple of the chunk size


def _nonzero_chunks(img: Image, chunk: int = 64 * KiB) -> list[tuple[int, int]]:
    data = img.path.read_bytes()
    return [
        (off, len(data[off : off + chunk]))
        for off in range(0, len(data), chunk)
        if data[off : off + chunk].strip(b"\0")
    ]


@pytest.fixture
def two_points(repo_path: Path, make_image: ImageFactory) -> tuple[Image, list[RecoveryPoint]]:
    img = make_image(SIZE)
    img.random(0, 130 * KiB, seed=1)
    img.compressible(1024 * KiB, 256 * KiB, seed=2)
    img.zeros(2048 * KiB, 64 * KiB)
    img.random(3 * 1024 * KiB, 1000, seed=3)
    first = api_backup(repo_path, img.path, name="disk")
    img.random(1024 * KiB + 64 * KiB, 64 * KiB, seed=4)
    second = api_backup(repo_path, img.path, name="disk")
    return img, [first, second]


def _con(repo_path: Path):  # type: ignore[no-untyped-def]
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    return connect(r.storage, r.points())


def _rows(repo_path: Path, sql: str) -> list[dict[str, object]]:
    return run_query(_con(repo_path), sql).to_pylist()


def test_points_view(repo_path: Path, two_points: tuple[Image, list[RecoveryPoint]]) -> None:
    _, points = two_points
    rows = _rows(repo_path, "SELECT id, source, size, parent, bytes_read, mode FROM points")
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {p.id for p in points}
    assert by_id[points[1].id]["parent"] == points[0].id
    assert by_id[points[0].id]["size"] == SIZE
    assert by_id[points[1].id]["mode"] == "full-reread"
    assert by_id[points[0].id]["bytes_read"] == points[0].stats.bytes_read


def test_manifests_view_lists_every_data_chunk(
    repo_path: Path, two_points: tuple[Image, list[RecoveryPoint]]
) -> None:
    img, points = two_points
    rows = _rows(
        repo_path,
        # "offset" is a DuckDB keyword: it must be quoted.
        f"SELECT \"offset\", length FROM manifests WHERE point_id = '{points[1].id}' "
        'ORDER BY "offset"',
    )
    assert [(r["offset"], r["length"]) for r in rows] == _nonzero_chunks(img)
    assert rows[-1]["length"] == 1000
    shared = _rows(
        repo_path,
        "SELECT point_id, sum(CASE WHEN shared_leaf THEN 1 ELSE 0 END) AS s, count(*) AS n "
        "FROM manifests GROUP BY point_id",
    )
    by_point = {r["point_id"]: r for r in shared}
    assert by_point[points[0].id]["s"] == 0
    # Only the leaf holding the one changed chunk is new in the second point.
    second = by_point[points[1].id]
    assert 0 < int(str(second["s"])) < int(str(second["n"]))


def test_chunks_and_packs_views(
    repo_path: Path, two_points: tuple[Image, list[RecoveryPoint]]
) -> None:
    index = load_index(Repository.open(str(repo_path), password=TEST_PASSWORD).storage)
    (row,) = _rows(repo_path, "SELECT count(*) AS n, sum(stored_len) AS s FROM chunks")
    assert row["n"] == index.num_rows
    assert row["s"] == sum(index.column("stored_len").to_pylist())
    packs = _rows(repo_path, "SELECT pack, chunks, stored_bytes, raw_bytes FROM packs")
    assert sum(int(str(p["chunks"])) for p in packs) == index.num_rows
    assert {p["pack"] for p in packs} == set(index.column("pack").to_pylist())


def test_stored_bytes_per_point_and_dedup(
    repo_path: Path, two_points: tuple[Image, list[RecoveryPoint]]
) -> None:
    _, points = two_points
    rows = _rows(
        repo_path,
        "SELECT id, bytes_stored, bytes_new FROM points ORDER BY time",
    )
    assert [r["bytes_stored"] for r in rows] == [p.stats.bytes_stored for p in points]
    assert rows[1]["bytes_new"] == 64 * KiB
    (dedup,) = _rows(
        repo_path,
        "SELECT (SELECT sum(length) FROM manifests) / (SELECT sum(raw_len) FROM chunks) AS r",
    )
    assert isinstance(dedup["r"], float) and dedup["r"] > 1.5


def test_views_of_an_empty_repository(repo_path: Path) -> None:
    con = _con(repo_path)
    for view in ("points", "manifests", "chunks", "packs"):
        assert run_query(con, f"SELECT count(*) AS n FROM {view}").to_pylist() == [{"n": 0}]


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO points_arrow VALUES (1)",
        "DROP VIEW points",
        "ATTACH 'other.db'",
        "SELECT 1; SELECT 2",
        "PRAGMA database_list",
        "SET threads = 1",
    ],
)
def test_writes_and_multiple_statements_are_refused(repo_path: Path, sql: str) -> None:
    with pytest.raises(QueryError):
        run_query(_con(repo_path), sql)


def test_copy_to_a_file_is_refused(repo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "leak.csv"
    with pytest.raises(QueryError, match="read-only"):
        run_query(_con(repo_path), f"COPY (SELECT 42 AS x) TO '{out}'")
    assert not out.exists()


def test_explain_analyze_cannot_smuggle_a_write(repo_path: Path) -> None:
    """EXPLAIN ANALYZE runs its statement: wrapping COPY in it must not write a file."""
    target = repo_path / "points" / "planted.json"
    try:
        run_query(_con(repo_path), f"EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{target}'")
    except QueryError:
        pass
    assert not target.exists(), "a 'read-only' query wrote into the repository"


@pytest.mark.parametrize(
    ("sql", "message"),
    [("SELEC 1", "bad SQL"), ("SELECT * FROM nowhere", "query failed"), ("", "exactly one")],
)
def test_bad_sql_is_one_line(repo_path: Path, sql: str, message: str) -> None:
    with pytest.raises(QueryError, match=message) as err:
        run_query(_con(repo_path), sql)
    assert "\n" not in str(err.value)
