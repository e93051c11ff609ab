"""``comb backup overlay:NAME``: an overlay backed up as a new point of its base point's source,
reading only the overlay's written chunks; the overlay's lock; unknown overlays."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    MiB,
    api_backup,
    api_restore,
    assert_one_line_error,
)

import drive.overlays.overlay as overlay
from catalog.repo import Repository
from drive.overlays.overlay import Overlay
from pipeline.jobs.overlay_source import OverlaySource

CHUNK = 64 * 1024
SIZE = 4 * MiB
SOURCE = "vm1"


def _setup(tmp_path: Path) -> tuple[Path, Image, str]:
    img = Image(tmp_path / "disk.img", SIZE)
    img.random(0, MiB, seed=1)
    img.random(2 * MiB + 4096, 300_000, seed=2)
    repo = Repository.init(str(tmp_path / "repo"), CHUNK, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name=SOURCE)
    return tmp_path / "repo", img, point.id


def test_backup_overlay(tmp_path: Path, cli: CliRunner) -> None:
    repo, img, base_id = _setup(tmp_path)
    # A later point of the same source: the overlay's point must still have the base as parent.
    img.random(3 * MiB, 100_000, seed=3)
    later = api_backup(repo, img.path, name=SOURCE)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "ov", r.resolve(base_id))
    expected = bytearray(Path(tmp_path / "disk.img").read_bytes())
    expected[3 * MiB : 3 * MiB + 100_000] = bytes(100_000)  # back to the base's content
    base_bytes = bytes(expected)
    assert len(base_bytes) == SIZE
    o = Overlay(r, "ov")
    writes = [(100, b"a" * 5000), (CHUNK * 20 + 7, b"b" * 70_000), (SIZE - 10, b"z" * 10)]
    for off, data in writes:
        o.write(off, data)
        expected[off : off + len(data)] = data
    o.zero(2 * MiB, CHUNK * 2)  # a zero record over base data
    expected[2 * MiB : 2 * MiB + 2 * CHUNK] = bytes(2 * CHUNK)
    o.flush()
    o.close()

    res = cli("-r", repo, "backup", "overlay:ov", "--engine", "local", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["parent"] == base_id and doc["parent"] != later.id
    assert doc["mode"] == "changed-extents"
    assert doc["source"] == SOURCE and doc["size"] == SIZE
    # Chunks touched: 1 + 2 (70 KB from 7 bytes into chunk 20) + 1 + 2 zeroed; not the disk.
    assert doc["bytes_read"] == 6 * CHUNK
    point = Repository.open(str(repo), password=TEST_PASSWORD).resolve(str(doc["id"]))
    assert point.source_path == "overlay:ov"
    assert point.changes is not None
    out = tmp_path / "restored.img"
    api_restore(repo, str(doc["id"]), out)
    assert out.read_bytes() == bytes(expected)
    # The base point is unchanged.
    api_restore(repo, base_id, tmp_path / "base.img")
    assert (tmp_path / "base.img").read_bytes() == base_bytes


def test_backup_overlay_source_pickles(tmp_path: Path) -> None:
    repo, img, base_id = _setup(tmp_path)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "ov", r.resolve(base_id))
    o = Overlay(r, "ov")
    o.write(10, b"xyz")
    o.close()
    src = pickle.loads(pickle.dumps(OverlaySource(str(repo), "ov", r.sealer)))
    h = src.open()
    try:
        buf = bytearray(16)
        h.read_into(memoryview(buf), 0)
        assert bytes(buf) == img.path.read_bytes()[:10] + b"xyz" + img.path.read_bytes()[13:16]
        assert h.data_extents(0, SIZE)[0] == (0, MiB)
    finally:
        h.close()


def test_backup_overlay_locked_and_missing(tmp_path: Path, cli: CliRunner) -> None:
    repo, _, base_id = _setup(tmp_path)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "busy", r.resolve(base_id))
    before = len(r.points())
    held = Overlay(r, "busy")  # as `comb serve` holds it
    try:
        res = cli("-r", repo, "backup", "overlay:busy", "--engine", "local")
        assert_one_line_error(res, "in use")
    finally:
        held.close()
    res = cli("-r", repo, "backup", "overlay:nope", "--engine", "local")
    assert_one_line_error(res, "nope")
    assert len(Repository.open(str(repo), password=TEST_PASSWORD).points()) == before


def _overlay_point(repo: Path, base_id: str, cli: CliRunner) -> str:
    """Write non-zero data through an overlay of ``base_id`` and back the overlay up."""
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "o1", r.resolve(base_id))
    o = Overlay(r, "o1")
    o.write(0, b"\xab" * 4096)
    o.write(2 * MiB, b"\xcd" * 3 * CHUNK)
    o.flush()
    o.close()
    res = cli("-r", repo, "backup", "overlay:o1", "--engine", "local", "--json")
    assert res.code == 0, res.err
    return str(json.loads(res.out)["id"])


def test_changed_extents_after_an_overlay_backup(tmp_path: Path, cli: CliRunner) -> None:
    """The issue: an overlay's point became the source's latest point, and a change list of the
    image was applied to it, so the new point held the overlay's writes."""
    repo, img, base_id = _setup(tmp_path)
    ov_id = _overlay_point(repo, base_id, cli)
    empty = img.changes_file(tmp_path / "e.json", [])
    res = cli(
        "-r", repo, "backup", img.path, "--source-name", SOURCE,
        "--changed-extents", empty, "--engine", "local", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["parent"] == base_id and doc["parent"] != ov_id
    assert doc["mode"] == "changed-extents" and doc["bytes_read"] == 0
    assert "note" not in res.err
    api_restore(repo, str(doc["id"]), tmp_path / "x.raw")
    assert (tmp_path / "x.raw").read_bytes() == img.path.read_bytes()
    # A real change of the image after the overlay's point: applied to the image's last read.
    img.random(MiB + 5, 1000, seed=7)
    changes = img.changes_file(tmp_path / "c.json", [(MiB + 5, 1000)])
    res = cli(
        "-r", repo, "backup", img.path, "--source-name", SOURCE,
        "--changed-extents", changes, "--engine", "local", "--json",
    )  # fmt: skip
    doc2 = json.loads(res.out)
    assert res.code == 0 and doc2["parent"] == doc["id"] and doc2["bytes_read"] == CHUNK
    api_restore(repo, str(doc2["id"]), tmp_path / "y.raw")
    assert (tmp_path / "y.raw").read_bytes() == img.path.read_bytes()


def test_points_shows_where_each_point_came_from(tmp_path: Path, cli: CliRunner) -> None:
    repo, img, base_id = _setup(tmp_path)
    ov_id = _overlay_point(repo, base_id, cli)
    res = cli("-r", repo, "points")
    assert res.code == 0, res.err
    head, *rows = res.out.splitlines()
    assert "FROM" in head.split()
    by_id = {row.split()[0]: row for row in rows}
    assert "overlay:o1" in by_id[ov_id] and str(img.path) in by_id[base_id]
    assert "overlay:o1" not in by_id[base_id]
    doc = json.loads(cli("-r", repo, "points", "--json").out)
    got = {p["id"]: (p["source_path"], p["parent"]) for p in doc["points"]}
    assert got == {base_id: (str(img.path), None), ov_id: ("overlay:o1", base_id)}
