"""The frozen golden repository of format version 1 must always open, verify and restore.

tests/data/golden-v1/ was written by tests/data/make_golden.py; tests/data/golden-v1.json
records what it must give. It was regenerated once, before the first release, because the point
id rule changed (FORMAT.md section 18); it is frozen since. Every test works on a copy, so a bug
can never damage the original. If one of these fails after a code change, the change broke
compatibility with existing repositories: fix the change, never the golden data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from combtest import need_tool

from catalog.repo import Repository
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden-v1"
EXPECTED: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "golden-v1.json").read_bytes())
POINTS: list[dict[str, Any]] = EXPECTED["points"]
MAX_GOLDEN_BYTES = 300 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> str:
    copy = tmp_path / "golden-v1"
    shutil.copytree(GOLDEN, copy)
    return str(copy)


def _files(base: Path) -> list[str]:
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def _tree(base: Path) -> dict[str, tuple[bool, int, int]]:
    """Every file and directory with its kind, size and modification time."""
    return {
        p.relative_to(base).as_posix(): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in base.rglob("*")
    }


def _comb_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def test_golden_files_are_all_present() -> None:
    assert _files(GOLDEN) == EXPECTED["files"]


def test_golden_is_small() -> None:
    assert sum((GOLDEN / f).stat().st_size for f in EXPECTED["files"]) < MAX_GOLDEN_BYTES


def test_golden_files_are_not_ignored_by_git() -> None:
    need_tool("git")
    paths = [str(GOLDEN / f) for f in EXPECTED["files"]]
    paths += [str(ROOT / "tests" / "data" / n) for n in ("golden-v1.json", "make_golden.py")]
    # --no-index: also report files that are tracked but would be ignored if added again.
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "--verbose", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 128 and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"not a git work tree: {proc.stderr.strip()}")
    assert proc.returncode == 1, f"ignored by git:\n{proc.stdout}"


def test_golden_opens(repo: str) -> None:
    r = Repository.open(repo)
    assert r.config.version == EXPECTED["format_version"] == 1
    pts = r.points()
    assert [p.id for p in pts] == [p["id"] for p in POINTS]
    assert [p.mode for p in pts] == [p["mode"] for p in POINTS]
    assert [p.parent for p in pts] == [p["parent"] for p in POINTS]
    assert [p.size for p in pts] == [p["size"] for p in POINTS]
    assert {p.source for p in pts} == {EXPECTED["source"]}


def test_golden_verifies_clean(repo: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = _comb_json(capsys, "-r", repo, "verify", "--read-data", "--json")
    assert report["ok"] is True
    assert report["errors"] == []
    assert report["warnings"] == []
    assert report["points"] == len(POINTS)
    assert report["packs"] == EXPECTED["chunks"]["packs"]
    assert report["chunks"] == EXPECTED["chunks"]["chunks"]


@pytest.mark.parametrize("n", range(len(POINTS)), ids=[p["mode"] for p in POINTS])
def test_golden_point_restores(
    n: int, repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point = POINTS[n]
    out = tmp_path / f"point-{n}.img"
    result = _comb_json(capsys, "-r", repo, "restore", point["id"], str(out), "--json")
    assert result["size"] == point["size"]
    assert out.stat().st_size == point["size"]
    assert _sha256(out) == point["sha256"]


def test_golden_latest_restores_by_name(
    repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latest.img"
    _comb_json(capsys, "-r", repo, "restore", f"{EXPECTED['source']}@latest", str(out), "--json")
    assert _sha256(out) == POINTS[-1]["sha256"]


def test_golden_query_stored_bytes(repo: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _comb_json(
        capsys,
        "-r",
        repo,
        "query",
        "SELECT id, bytes_stored FROM points ORDER BY time",
        "--format",
        "json",
    )
    assert rows == [{"id": p["id"], "bytes_stored": p["bytes_stored"]} for p in POINTS]
    (totals,) = _comb_json(
        capsys,
        "-r",
        repo,
        "query",
        "SELECT count(*) AS chunks, count(DISTINCT pack) AS packs, "
        "CAST(sum(stored_len) AS BIGINT) AS stored_bytes, "
        "CAST(sum(raw_len) AS BIGINT) AS raw_bytes FROM chunks",
        "--format",
        "json",
    )
    assert totals == EXPECTED["chunks"]
    assert totals["stored_bytes"] == sum(p["bytes_stored"] for p in POINTS)


def test_golden_query_manifests(repo: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _comb_json(
        capsys,
        "-r",
        repo,
        "query",
        "SELECT point_id, count(*) AS data_chunks, CAST(sum(length) AS BIGINT) AS data_bytes "
        "FROM manifests GROUP BY point_id ORDER BY point_id",
        "--format",
        "json",
    )
    want = [
        {"point_id": p["id"], "data_chunks": p["data_chunks"], "data_bytes": p["data_bytes"]}
        for p in POINTS
    ]
    assert rows == sorted(want, key=lambda r: r["point_id"])


def test_read_only_commands_write_nothing(
    repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FORMAT.md sections 3 and 12: opening and reading create no file and no directory (not even
    the tmp/ and locks/ a git checkout lacks), so read-only media work."""
    before = _tree(Path(repo))
    assert "tmp" not in before and "locks" not in before
    _comb_json(capsys, "-r", repo, "points", "--json")
    _comb_json(capsys, "-r", repo, "verify", "--read-data", "--json")
    _comb_json(capsys, "-r", repo, "restore", POINTS[0]["id"], str(tmp_path / "out.img"), "--json")
    _comb_json(capsys, "-r", repo, "query", "SELECT count(*) AS n FROM chunks", "--format", "json")
    assert _tree(Path(repo)) == before
