"""Tags and a description on points: ``backup --tag/--description`` store them in the point
document (FORMAT.md 9); ``points`` shows them and filters by ``--tag``, ``--since`` and
``--last``."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, assert_one_line_error, points_json

from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store.points import POINT_DOC_KIND, parse_point, point_id_of, point_name


def _backup(cli: CliRunner, repo: Path, image: Path, *extra: str) -> dict[str, object]:
    res = cli("-r", repo, "backup", image, "--source-name", "vm", "--json", *extra)
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def tagged(cli: CliRunner, repo_path: Path, make_image: ImageFactory) -> list[str]:
    img = make_image(MiB)
    img.random(0, 64 * 1024, seed=1)
    ids = []
    for extra in (
        ("--tag", "nightly", "--tag", "db"),
        (),
        ("--tag", "nightly", "--description", "before the upgrade"),
        ("--tag", "db", "--tag", "nightly", "--tag", "db"),
    ):
        ids.append(str(_backup(cli, repo_path, img.path, *extra)["id"]))
    return ids


def test_backup_stores_tags_and_description(
    cli: CliRunner, repo_path: Path, tagged: list[str]
) -> None:
    pts = {p["id"]: p for p in points_json(cli, repo_path)}
    assert pts[tagged[0]]["tags"] == ["nightly", "db"]
    assert pts[tagged[1]]["tags"] == [] and pts[tagged[1]]["description"] is None
    assert pts[tagged[2]]["description"] == "before the upgrade"
    assert pts[tagged[3]]["tags"] == ["db", "nightly"]  # given twice, kept once
    # In the document itself (section 9); an untagged point's document has neither field.
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    for pid, present in ((tagged[0], True), (tagged[1], False)):
        raw = r.storage.sealer.open_doc(r.storage.read(point_name(pid)), POINT_DOC_KIND, "test")
        doc = json.loads(raw)
        assert ("tags" in doc) == present and "description" not in doc


def test_points_filters(cli: CliRunner, repo_path: Path, tagged: list[str]) -> None:
    def ids(*args: str) -> list[str]:
        res = cli("-r", repo_path, "points", "--json", *args)
        assert res.code == 0, res.err
        return [p["id"] for p in json.loads(res.out)["points"]]

    assert ids("--tag", "nightly") == [tagged[0], tagged[2], tagged[3]]
    assert ids("--tag", "nightly", "--tag", "db") == [tagged[0], tagged[3]]
    assert ids("--tag", "none") == []
    assert ids("--last", "2") == tagged[2:]
    assert ids("--tag", "db", "--last", "1") == [tagged[3]]
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert ids("--since", future) == []
    assert ids("--since", "2000-01-01") == tagged
    third = str(points_json(cli, repo_path)[2]["time"])
    assert ids("--since", third) == tagged[2:]


def test_points_table_shows_tags_and_description(
    cli: CliRunner, repo_path: Path, tagged: list[str]
) -> None:
    res = cli("-r", repo_path, "points")
    assert res.code == 0, res.err
    head, *rows = res.out.splitlines()
    assert head.split()[-2:] == ["TAGS", "DESCRIPTION"]
    assert "nightly,db" in rows[0]
    assert rows[2].rstrip().endswith("before the upgrade")
    res = cli("-r", repo_path, "points", "--tag", "db")
    assert "DESCRIPTION" not in res.out and "TAGS" in res.out


@pytest.mark.parametrize("tag", ["", "a,b", "x" * 65, "tab\there", " padded", "new\nline"])
def test_bad_tags_are_usage_errors(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tag: str
) -> None:
    img = make_image(MiB)
    res = cli("-r", repo_path, "backup", img.path, "--tag", tag)
    assert_one_line_error(res, "bad tag", code=2)
    assert_one_line_error(cli("-r", repo_path, "points", "--tag", tag), "bad tag", code=2)
    assert points_json(cli, repo_path) == []


def test_bad_filters_and_description_are_usage_errors(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    assert_one_line_error(cli("-r", repo_path, "points", "--last", "0"), "--last", code=2)
    assert_one_line_error(cli("-r", repo_path, "points", "--since", "soon"), "--since", code=2)
    img = make_image(MiB)
    res = cli("-r", repo_path, "backup", img.path, "--description", " ")
    assert_one_line_error(res, "--description", code=2)


def test_readers_check_the_type_of_tags(repo_path: Path, tagged: list[str]) -> None:
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    point = r.resolve(tagged[0])
    doc = point.body()
    assert parse_point(point.to_json(), "doc").tags == ("nightly", "db")
    for bad in ("nightly", [1], {"a": 1}):
        raw = json.dumps({**doc, "tags": bad}).encode()
        with pytest.raises(CorruptionError, match="tags"):
            parse_point(raw, "doc", point_id_of(raw))
    raw = json.dumps({**doc, "description": 5}).encode()
    with pytest.raises(CorruptionError, match="description"):
        parse_point(raw, "doc")
    assert dataclasses.replace(point, tags=(), description=None).body().keys() == (
        doc.keys() - {"tags"}
    )
