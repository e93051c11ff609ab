"""One JSON style (README.md, "JSON output"): every ``--json`` prints one JSON object on
standard output (``backup``: one line per point), lists are named inside it, the same thing has
the same field name in every command, numbers are numbers (a DuckDB HUGEINT too), and the long
commands write status lines (JSON Lines, ``message_type`` ``status``) on standard error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from combtest import CliRunner, ImageFactory, MiB

from pipeline.cli import progress

SIZE = 6 * MiB


@pytest.fixture
def backed(cli: CliRunner, repo_path: Path, make_image: ImageFactory) -> tuple[Path, str]:
    img = make_image(SIZE, "disk.img")
    img.random(0, 2 * MiB, seed=1)
    img.random(4 * MiB, MiB, seed=2)
    res = cli("-r", repo_path, "backup", img.path, "--json")
    assert res.code == 0, res.err
    return repo_path, json.loads(res.out)["id"]


def _doc(res: Any, one_line: bool = True) -> dict[str, Any]:
    """The one JSON object a command printed (on one line unless a result table)."""
    assert res.code == 0, res.err
    if one_line:
        assert len(res.out.splitlines()) == 1, res.out
    doc = json.loads(res.out)
    assert isinstance(doc, dict), res.out
    return doc


def _status(err: str) -> list[dict[str, Any]]:
    """The status lines of standard error (every line of it, here: nothing else was said)."""
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines and all(s["message_type"] == "status" for s in lines), err
    return lines


def test_every_json_output_is_one_object(
    cli: CliRunner, backed: tuple[Path, str], tmp_path: Path
) -> None:
    repo, point = backed
    one_line: list[list[object]] = [
        ["points"],
        ["restore", point, tmp_path / "r.img"],
        ["export", point, tmp_path / "e.vhdx", "--format", "vhdx"],
        ["verify"],
        ["verify", "--read-data"],
        ["scrub"],
        ["forget", "--keep-last", "1", "--dry-run"],
        ["prune", "--dry-run"],
        ["locks"],
        ["unlock", "--stale"],
        ["key", "list"],
        ["overlays", "create", "o1", point],
        ["overlays"],
        ["overlays", "rm", "o1"],
        ["repair", "index"],
        ["dashboard", tmp_path / "d.html"],
        ["catalog-schema"],
    ]
    for args in one_line:
        doc = _doc(cli("-r", repo, *args, "--json"))
        assert doc, args
    assert _doc(cli("-r", tmp_path / "new", "init", "--json"))["repository"]
    for table in (["query", "SELECT id FROM points"], ["report", "growth"]):
        doc = _doc(cli("-r", repo, *table, "--json"), one_line=False)
        assert isinstance(doc["rows"], list) and doc["columns"], table


def test_lists_are_named(cli: CliRunner, backed: tuple[Path, str]) -> None:
    repo, _ = backed
    for args, name in (
        (["points"], "points"),
        (["key", "list"], "keys"),
        (["locks"], "locks"),
        (["overlays"], "overlays"),
        (["catalog-schema"], "views"),
        (["query", "SELECT 1 AS one"], "rows"),
    ):
        doc = _doc(cli("-r", repo, *args, "--json"), one_line=args[0] != "query")
        assert isinstance(doc[name], list), (args, doc)


def test_the_same_field_has_the_same_name(
    cli: CliRunner, backed: tuple[Path, str], tmp_path: Path
) -> None:
    repo, point = backed
    (listed,) = _doc(cli("-r", repo, "points", "--json"))["points"]
    restored = _doc(cli("-r", repo, "restore", point, tmp_path / "r.img", "--json"))
    exported = _doc(
        cli("-r", repo, "export", point, tmp_path / "e.qcow2", "--format", "qcow2", "--json")
    )
    for doc in (restored, exported):  # the point a result is about: `point`, never `id`
        assert doc["point"] == listed["id"] == point and "id" not in doc
        assert doc["size"] == listed["size"] == SIZE  # the disk's size
        assert doc["source"] == listed["source"] and doc["bytes_written"] > 0
    assert exported["image_bytes"] > 0 and exported["format"] == "qcow2"
    res = cli("-r", repo, "overlays", "create", "o1", point, "--json")
    assert _doc(res)["base"] == point
    (ov,) = _doc(cli("-r", repo, "overlays", "--json"))["overlays"]
    assert ov["base"] == point and ov["size"] == SIZE and ov["bytes_written"] == 0
    assert "written_bytes" not in ov
    verified = _doc(cli("-r", repo, "verify", "--read-data", "--json"))
    scrubbed = _doc(cli("-r", repo, "scrub", "--json"))
    assert verified["packs_checked"] == scrubbed["packs_checked"] >= 1
    assert verified["bytes_checked"] == scrubbed["bytes_checked"] > 0
    assert verified["points_checked"] == 1 and verified["chunks_checked"] > 0
    assert scrubbed["damaged_packs"] == [] and "bytes" not in scrubbed


def test_a_backup_prints_the_point_as_points_lists_it(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(SIZE)
    img.random(0, MiB)
    res = cli("-r", repo_path, "backup", img.path, "--json")
    assert res.code == 0, res.err
    (line,) = res.out.splitlines()  # JSON Lines: one per point (a VM: one per disk)
    backed = json.loads(line)
    (listed,) = _doc(cli("-r", repo_path, "points", "--json"))["points"]
    assert {k: backed[k] for k in listed} == listed
    assert set(backed) - set(listed) == {
        "engine_startup_seconds",
        "stage_cpu_seconds",
        "stage_seconds",
        "driver_cpu_seconds",
        "file_catalog",
    }
    # the pipeline's own profile: CPU seconds of every stage, and of the parts they split
    profile = backed["stage_cpu_seconds"]
    assert set(profile) == {
        "reader", "chunker", "zero_check", "hash", "deduplicator", "compressor", "compress",
        "seal", "writer", "parity",
    }  # fmt: skip
    assert all(v >= 0 for v in profile.values()) and sum(profile.values()) > 0


def test_query_sums_are_numbers(cli: CliRunner, backed: tuple[Path, str]) -> None:
    """sum() of a BIGINT is a HUGEINT (a Decimal in Python): still a JSON integer."""
    repo, _ = backed
    sql = "SELECT sum(size) AS total, sum(size) / 4 AS quarter, count(*) AS n FROM points"
    for args in (["--json"], ["--format", "json"]):
        doc = _doc(cli("-r", repo, "query", sql, *args), one_line=False)
        assert doc == {
            "columns": ["total", "quarter", "n"],
            "rows": [{"total": SIZE, "quarter": SIZE / 4, "n": 1}],
        }
        assert isinstance(doc["rows"][0]["total"], int)
    res = cli("-r", repo, "query", sql, "--json", "--format", "csv")
    assert res.code == 2 and "--json and --format csv" in res.err
    res = cli("-r", repo, "query", "SELECT 'nan'::DOUBLE AS x, 1 / 0 AS y", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out, parse_constant=_no_constant)["rows"] == [{"x": None, "y": None}]


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_report_json_names_the_report_and_its_notes(
    cli: CliRunner, backed: tuple[Path, str]
) -> None:
    repo, _ = backed
    doc = _doc(cli("-r", repo, "report", "projection", "--json"), one_line=False)
    assert doc["report"] == "projection" and doc["notes"] and isinstance(doc["rows"], list)


def test_long_commands_write_status_lines(
    cli: CliRunner, backed: tuple[Path, str], tmp_path: Path, make_image: ImageFactory
) -> None:
    repo, point = backed
    for args, unit in (
        (["restore", point, tmp_path / "r.img"], "bytes"),
        (["export", point, tmp_path / "e.img"], "bytes"),
        (["verify", "--read-data"], "packs"),
        (["scrub"], "packs"),
    ):
        res = cli("-r", repo, "--json", *args)
        _doc(res)
        lines = _status(res.err)
        assert lines[0]["phase"] == "starting", args
        last = lines[-1]
        assert last["phase"] == "running" and last["percent_done"] == 1.0, args
        assert last[f"{unit}_done"] == last[f"total_{unit}"] > 0, args
        assert all(s["seconds_elapsed"] >= 0 for s in lines)
    img = make_image(SIZE)
    img.random(0, 3 * MiB, seed=3)
    res = cli("-r", repo, "backup", img.path, "--json")
    lines = _status(res.err)
    assert lines[0] == {
        "message": "preparing ...",
        "message_type": "status",
        "percent_done": 0.0,
        "phase": "starting",
        "seconds_elapsed": lines[0]["seconds_elapsed"],
    }
    assert lines[-1]["bytes_done"] == lines[-1]["total_bytes"] == 3 * MiB


def test_status_lines_are_at_most_one_per_interval(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "STATUS_INTERVAL_S", 3600.0)
    with progress.progress_bar("restore", True) as report:
        assert report is not None
        for done in range(1, 101):
            report(done * 10, 2000)
    lines = _status(capsys.readouterr().err)
    # starting; the first report; the last (completed when the command succeeded)
    assert [(s["phase"], s.get("bytes_done")) for s in lines] == [
        ("starting", None),
        ("running", 10),
        ("running", 2000),
    ]
    assert lines[1]["seconds_remaining"] >= 0 and "seconds_remaining" not in lines[2]
