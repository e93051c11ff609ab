"""The command line end to end, in process (local engine): backups, restores, JSON, errors."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from combtest import (
    CliRunner,
    Image,
    ImageFactory,
    KiB,
    MiB,
    assert_one_line_error,
    backup_json,
    cmp_files,
    point_ids,
    points_json,
)

from catalog.errors import (
    OutputError,
    PointNotFound,
    RepositoryError,
)
from catalog.store.crypto import SEAL_OVERHEAD_BYTES

C = 64 * KiB
SIZE = 24 * MiB + 4321  # mostly holes, not a multiple of the chunk size


@dataclass
class History:
    repo: Path
    image: Image
    points: list[tuple[str, Path]]  # (point id, copy of the image as it was)
    docs: list[dict[str, object]]


@pytest.fixture
def history(cli: CliRunner, make_image: ImageFactory, tmp_path: Path) -> History:
    repo = tmp_path / "repo"
    res = cli("-r", repo, "init")
    assert res.code == 0 and "created repository" in res.out
    img = make_image(SIZE, "disk.img")
    img.random(0, 300 * KiB, seed=1)
    img.compressible(5 * MiB, MiB, seed=2)
    img.zeros(9 * MiB, 256 * KiB)
    img.random(12 * MiB + 1000, 70 * KiB, seed=3)
    img.random(SIZE - 4321, 4321, seed=4)
    h = History(repo, img, [], [])

    def backup(*extra: object) -> None:
        doc = backup_json(cli, repo, img.path, *extra)
        h.docs.append(doc)
        h.points.append((str(doc["id"]), img.snapshot(tmp_path / f"state{len(h.points)}.img")))

    backup()
    img.take_changes()
    img.random(100 * KiB, 4 * KiB, seed=5)  # scattered small writes
    img.random(5 * MiB + 3 * C + 17, 1000, seed=6)
    img.zeros(12 * MiB, 128 * KiB)  # data becomes zeros
    img.random(20 * MiB - 10, 20, seed=7)  # new data in a hole, across a chunk boundary
    backup("--changed-extents", img.changes_file(tmp_path / "changes1.json"))
    img.random(7 * MiB, 64 * KiB, seed=8)
    img.take_changes()
    backup()  # no change list: reads everything, stores only what is new
    img.random(0, 10, seed=9)
    backup("--changed-extents", img.changes_file(tmp_path / "changes2.json"))
    return h


def test_every_point_restores_identically(cli: CliRunner, history: History, tmp_path: Path) -> None:
    assert len({pid for pid, _ in history.points}) == 4
    for i, (pid, state) in enumerate(history.points):
        out = tmp_path / f"restored{i}.img"
        res = cli("-r", history.repo, "restore", pid, out)
        assert res.code == 0, res.err
        assert f"restored {pid}" in res.out
        cmp_files(state, out)
        # The output is sparse: a mostly-hole image stays mostly holes.
        assert out.stat().st_size == SIZE
        assert out.stat().st_blocks * 512 <= 4 * MiB
    # The states really differ, so the comparisons above mean something.
    states = [s.read_bytes() for _, s in history.points]
    assert len(set(states)) == 4


def test_backup_json_reports(history: History) -> None:
    full, inc1, reread, inc2 = history.docs
    for doc in history.docs:
        for key in ("id", "source", "bytes_read", "bytes_new", "bytes_stored", "seconds"):
            assert key in doc, key
        assert doc["source"] == str(history.image.path.resolve())
        assert doc["size"] == SIZE
    assert (full["mode"], inc1["mode"], reread["mode"], inc2["mode"]) == (
        "full",
        "changed-extents",
        "full-reread",
        "changed-extents",
    )
    assert [d["parent"] for d in history.docs] == [None, full["id"], inc1["id"], reread["id"]]
    # Only the chunks named by the change list were read: 100K, 5M+3C, 12M(2), 20M-10 (2).
    assert inc1["bytes_read"] == 6 * C
    assert inc2["bytes_read"] == C
    assert inc2["bytes_new"] == C
    assert int(str(reread["bytes_read"])) >= int(str(full["bytes_read"]))
    assert reread["bytes_new"] == C  # only the one rewritten chunk is new
    assert 0 < int(str(reread["bytes_stored"])) <= C + SEAL_OVERHEAD_BYTES  # nonce and tag
    assert int(str(full["bytes_stored"])) < int(str(full["bytes_new"]))  # compression


def test_points_lists_every_point(cli: CliRunner, history: History) -> None:
    points = points_json(cli, history.repo)
    assert [p["id"] for p in points] == [pid for pid, _ in history.points]
    res = cli("-r", history.repo, "points")
    assert res.code == 0
    lines = res.out.strip().splitlines()
    assert lines[0].split()[0] == "ID"
    assert [ln.split()[0] for ln in lines[1:]] == [pid for pid, _ in history.points]
    res = cli("-r", history.repo, "points", "--source", "nobody", "--json")
    assert res.code == 0


def test_points_json_is_one_object_with_a_list(cli: CliRunner, history: History) -> None:
    """The issue: `points --json` prints one JSON object; its points are a list."""
    res = cli("-r", history.repo, "points", "--json")
    doc = json.loads(res.out)
    assert isinstance(doc, dict) and isinstance(doc["points"], list)
    assert len(doc["points"]) == 4
    for p in doc["points"]:
        for key in ("id", "source", "time", "size", "bytes_read", "bytes_new", "bytes_stored"):
            assert key in p


def test_verify_read_data_is_clean(cli: CliRunner, history: History) -> None:
    res = cli("-r", history.repo, "verify", "--read-data")
    assert res.code == 0, res.err
    assert "4 point(s)" in res.out and "clean" in res.out
    assert res.err == ""
    res = cli("-r", history.repo, "verify", "--read-data", "--json")
    doc = json.loads(res.out)
    assert res.code == 0 and doc["ok"] is True and doc["errors"] == []
    assert doc["points_checked"] == 4 and doc["chunks_checked"] > 0 and doc["bytes_checked"] > 0
    assert cli("-r", history.repo, "verify").code == 0


def test_restore_json_and_latest(cli: CliRunner, history: History, tmp_path: Path) -> None:
    out = tmp_path / "latest.img"
    name = str(history.image.path.resolve())
    res = cli("-r", history.repo, "restore", f"{name}@latest", out, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["point"] == history.points[-1][0] and doc["size"] == SIZE
    cmp_files(history.points[-1][1], out)
    # Prefix, and --force over an existing output.
    res = cli("-r", history.repo, "restore", history.points[0][0][:12], out, "--force")
    assert res.code == 0, res.err
    cmp_files(history.points[0][1], out)


def test_query_stored_bytes_per_point(cli: CliRunner, history: History) -> None:
    res = cli(
        "-r", history.repo, "query",
        "SELECT id, bytes_stored FROM points ORDER BY time", "--format", "json",
    )  # fmt: skip
    assert res.code == 0, res.err
    rows = json.loads(res.out)["rows"]
    assert [r["id"] for r in rows] == [pid for pid, _ in history.points]
    assert [r["bytes_stored"] for r in rows] == [d["bytes_stored"] for d in history.docs]


def test_query_dedup_ratio_and_formats(cli: CliRunner, history: History) -> None:
    sql = (
        "SELECT (SELECT sum(length) FROM manifests) AS logical, "
        "(SELECT sum(raw_len) FROM chunks) AS unique_bytes"
    )
    res = cli("-r", history.repo, "query", sql, "--format", "csv")
    assert res.code == 0, res.err
    (row,) = list(csv.DictReader(io.StringIO(res.out)))
    # Four points of nearly the same data, stored about once.
    assert int(row["logical"]) > 3 * int(row["unique_bytes"])
    res = cli("-r", history.repo, "query", "SELECT count(*) AS n FROM manifests")
    assert res.code == 0
    lines = res.out.splitlines()
    assert lines[0].strip() == "n" and int(lines[1]) > 0


def test_manifests_view_matches_every_state(cli: CliRunner, history: History) -> None:
    """Shared leaves included: each point's rows are exactly its non-zero chunks."""
    for pid, state in history.points:
        data = state.read_bytes()
        expected = [
            [off, len(data[off : off + C])]
            for off in range(0, len(data), C)
            if data[off : off + C].strip(b"\0")
        ]
        sql = f"SELECT \"offset\", length FROM manifests WHERE point_id = '{pid}' ORDER BY 1"
        res = cli("-r", history.repo, "query", sql, "--format", "json")
        assert res.code == 0, res.err
        assert [[r["offset"], r["length"]] for r in json.loads(res.out)["rows"]] == expected


def test_repository_from_the_environment(
    cli: CliRunner, history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMB_REPO", str(history.repo))
    assert [p["id"] for p in json.loads(cli("points", "--json").out)["points"]] == [
        pid for pid, _ in history.points
    ]


def test_source_name(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, tmp_path: Path
) -> None:
    img = make_image(MiB)
    img.random(0, 100 * KiB)
    doc = backup_json(cli, repo_path, img.path, "--source-name", "vm-42")
    assert doc["source"] == "vm-42"
    img.random(0, 10, seed=3)
    doc2 = backup_json(cli, repo_path, img.path, "--source-name", "vm-42")
    assert doc2["parent"] == doc["id"]
    out = tmp_path / "o"
    assert cli("-r", repo_path, "restore", "vm-42@latest", out).code == 0
    cmp_files(img.path, out)


def test_relative_source_name_at_latest(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    img = make_image(MiB, "rel.img")
    img.random(0, 64 * KiB)
    monkeypatch.chdir(tmp_path)
    doc = backup_json(cli, repo_path, "rel.img")
    assert doc["source"] == str(tmp_path / "rel.img")
    assert cli("-r", repo_path, "restore", "rel.img@latest", "out.img").code == 0
    cmp_files(img.path, tmp_path / "out.img")


def test_read_only_repository_refuses_backup_but_restores(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, tmp_path: Path
) -> None:
    img = make_image(MiB)
    img.random(0, 64 * KiB)
    pid = backup_json(cli, repo_path, img.path)["id"]
    cfg = repo_path / "config.json"
    doc = json.loads(cfg.read_text())
    doc["features"]["ro_compat"] = ["from-the-future"]
    cfg.write_text(json.dumps(doc))
    res = cli("-r", repo_path, "backup", img.path)
    assert_one_line_error(res, "from-the-future", code=RepositoryError.exit_code)
    assert point_ids(cli, repo_path) == [pid]
    assert cli("-r", repo_path, "restore", pid, tmp_path / "o").code == 0
    cmp_files(img.path, tmp_path / "o")


def test_unknown_incompat_feature_is_refused(cli: CliRunner, repo_path: Path) -> None:
    cfg = repo_path / "config.json"
    doc = json.loads(cfg.read_text())
    doc["features"] = {"compat": [], "ro_compat": [], "incompat": ["encryption-v7"]}
    cfg.write_text(json.dumps(doc))
    assert_one_line_error(cli("-r", repo_path, "points"), "encryption-v7", code=3)


def test_a_failing_writer_commits_nothing(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path
) -> None:
    """Every pack directory is a file: sealing fails inside the worker stage."""
    img = make_image(2 * MiB)
    img.random(0, MiB)
    for i in range(256):
        (repo_path / "packs" / f"{i:02x}").write_bytes(b"")
    res = cli("-r", repo_path, "backup", img.path)
    assert_one_line_error(res, "stage writer", "cannot commit packs/", code=8)
    assert point_ids(cli, repo_path) == []
    assert list((repo_path / "tmp").iterdir()) == []
    assert list((repo_path / "index").iterdir()) == []


# ---- errors: one line, no traceback, a precise exit code --------------------------------------


def test_unknown_point(cli: CliRunner, history: History, tmp_path: Path) -> None:
    for spec in ("0123456789abcdef0", "nobody@latest", "not-an-id"):
        res = cli("-r", history.repo, "restore", spec, tmp_path / "x")
        assert_one_line_error(res, code=PointNotFound.exit_code)
        assert not (tmp_path / "x").exists()


def test_output_exists_without_force(cli: CliRunner, history: History, tmp_path: Path) -> None:
    out = tmp_path / "exists.img"
    out.write_bytes(b"keep me")
    res = cli("-r", history.repo, "restore", history.points[0][0], out)
    assert_one_line_error(res, str(out), "--force", code=OutputError.exit_code)
    assert out.read_bytes() == b"keep me"


def test_restore_into_a_missing_directory(cli: CliRunner, history: History, tmp_path: Path) -> None:
    res = cli("-r", history.repo, "restore", history.points[0][0], tmp_path / "no" / "x.img")
    assert_one_line_error(res, "no/x.img", code=OutputError.exit_code)


def test_restore_onto_a_directory(cli: CliRunner, history: History, tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    (target / "keep").write_text("x")
    res = cli("-r", history.repo, "restore", history.points[0][0], target, "--force")
    assert_one_line_error(res, str(target), code=OutputError.exit_code)
    assert (target / "keep").read_text() == "x"
