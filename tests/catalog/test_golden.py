"""The frozen golden repositories of format version 1 must always open, verify and restore, and
take new backups, forget and prune.

tests/data/golden-v1/ (plain, written before locks, parity, encryption and change tables) and
tests/data/golden-v1-sealed/ (encrypted with the password its .json records, with parity, written
by commit ea8eb82, the last before the catalog/ restructure) were written by
tests/data/make_golden.py; tests/data/<name>.json records what each must give. golden-v1 was
regenerated once, before the first release, because the point id rule changed (FORMAT.md section
18); both are frozen. Every test works on a copy, so a bug can never damage the original. If one
of these fails after a code change, the change broke compatibility with existing repositories:
fix the change, never the golden data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from combtest import CliRunner, Image, MiB, assert_one_line_error, need_tool

from catalog.errors import PasswordError
from catalog.repo import Repository
from catalog.store import crypto
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
MAX_GOLDEN_BYTES = 300 * 1024


class Golden(NamedTuple):
    name: str
    path: Path
    expected: dict[str, Any]
    password: str | None  # None: a plain repository

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.expected["points"]  # type: ignore[no-any-return]


def _golden(name: str) -> Golden:
    expected = json.loads((DATA / f"{name}.json").read_bytes())
    return Golden(name, DATA / name, expected, expected.get("password"))


PLAIN = _golden("golden-v1")
SEALED = _golden("golden-v1-sealed")
GOLDENS = [PLAIN, SEALED]
MODES = ["full", "changed-extents", "full-reread"]  # the three points of each golden


def _copy(golden: Golden, tmp_path: Path) -> str:
    copy = tmp_path / golden.name
    shutil.copytree(golden.path, copy)
    return str(copy)


@pytest.fixture(params=GOLDENS, ids=[g.name for g in GOLDENS])
def golden(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Golden:
    """Each golden repository in turn; the command line gets its password (COMB_PASSWORD)."""
    g: Golden = request.param
    if g.password is not None:
        monkeypatch.setenv("COMB_PASSWORD", g.password)
    return g


@pytest.fixture
def repo(golden: Golden, tmp_path: Path) -> str:
    return _copy(golden, tmp_path)


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


def test_golden_files_are_all_present(golden: Golden) -> None:
    assert _files(golden.path) == golden.expected["files"]


def test_golden_is_small(golden: Golden) -> None:
    files = golden.expected["files"]
    assert sum((golden.path / f).stat().st_size for f in files) < MAX_GOLDEN_BYTES


def test_golden_files_are_not_ignored_by_git() -> None:
    need_tool("git")
    paths = [str(g.path / f) for g in GOLDENS for f in g.expected["files"]]
    paths += [str(DATA / f"{g.name}.json") for g in GOLDENS] + [str(DATA / "make_golden.py")]
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


def test_golden_opens(golden: Golden, repo: str) -> None:
    crypto.forget_unlocked()  # derive the key from the old key file, not from a memo
    r = Repository.open(repo, password=golden.password)
    assert r.config.version == golden.expected["format_version"] == 1
    assert r.config.encrypted == (golden.password is not None)
    pts = r.points()
    assert [p.id for p in pts] == [p["id"] for p in golden.points]
    assert [p.mode for p in pts] == [p["mode"] for p in golden.points] == MODES
    assert [p.parent for p in pts] == [p["parent"] for p in golden.points]
    assert [p.size for p in pts] == [p["size"] for p in golden.points]
    assert {p.source for p in pts} == {golden.expected["source"]}


def test_golden_verifies_clean(
    repo: str, golden: Golden, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _comb_json(capsys, "-r", repo, "verify", "--read-data", "--json")
    assert report["ok"] is True
    assert report["errors"] == []
    assert report["warnings"] == []
    assert report["points_checked"] == len(golden.points)
    assert report["packs_checked"] == golden.expected["chunks"]["packs"]
    assert report["chunks_checked"] == golden.expected["chunks"]["chunks"]


@pytest.mark.parametrize("n", range(len(MODES)), ids=MODES)
def test_golden_point_restores(
    n: int, golden: Golden, repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point = golden.points[n]
    out = tmp_path / f"point-{n}.img"
    result = _comb_json(capsys, "-r", repo, "restore", point["id"], str(out), "--json")
    assert result["size"] == point["size"]
    assert out.stat().st_size == point["size"]
    assert _sha256(out) == point["sha256"]


def test_golden_latest_restores_by_name(
    golden: Golden, repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latest.img"
    source = golden.expected["source"]
    _comb_json(capsys, "-r", repo, "restore", f"{source}@latest", str(out), "--json")
    assert _sha256(out) == golden.points[-1]["sha256"]


def _query(capsys: pytest.CaptureFixture[str], repo: str, sql: str) -> Any:
    return _comb_json(capsys, "-r", repo, "query", sql, "--format", "json")["rows"]


def test_golden_query_stored_bytes(
    golden: Golden, repo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _query(capsys, repo, "SELECT id, bytes_stored FROM points ORDER BY time")
    assert rows == [{"id": p["id"], "bytes_stored": p["bytes_stored"]} for p in golden.points]
    (totals,) = _query(
        capsys,
        repo,
        "SELECT count(*) AS chunks, count(DISTINCT pack) AS packs, "
        "CAST(sum(stored_len) AS BIGINT) AS stored_bytes, "
        "CAST(sum(raw_len) AS BIGINT) AS raw_bytes FROM chunks",
    )
    assert totals == golden.expected["chunks"]
    assert totals["stored_bytes"] == sum(p["bytes_stored"] for p in golden.points)


def test_golden_query_manifests(
    golden: Golden, repo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _query(
        capsys,
        repo,
        "SELECT point_id, count(*) AS data_chunks, CAST(sum(length) AS BIGINT) AS data_bytes "
        "FROM manifests GROUP BY point_id ORDER BY point_id",
    )
    want = [
        {"point_id": p["id"], "data_chunks": p["data_chunks"], "data_bytes": p["data_bytes"]}
        for p in golden.points
    ]
    assert rows == sorted(want, key=lambda r: r["point_id"])


def test_read_only_commands_write_nothing(
    golden: Golden, repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FORMAT.md sections 3 and 12: opening and reading create no file and no directory (not even
    the tmp/ and locks/ a git checkout lacks), so read-only media work."""
    before = _tree(Path(repo))
    assert "tmp" not in before and "locks" not in before
    point = golden.points[0]["id"]
    _comb_json(capsys, "-r", repo, "points", "--json")
    _comb_json(capsys, "-r", repo, "verify", "--read-data", "--json")
    _comb_json(capsys, "-r", repo, "restore", point, str(tmp_path / "out.img"), "--json")
    _query(capsys, repo, "SELECT count(*) AS n FROM chunks")
    assert _tree(Path(repo)) == before


def test_an_old_repository_takes_new_backups_forget_and_prune(
    golden: Golden, repo: str, cli: CliRunner, tmp_path: Path
) -> None:
    """Not only read but written: a full and a changed-extents backup of the golden's source,
    forget and prune, then every point left still restores exactly."""
    source = golden.expected["source"]
    old = golden.points
    img = Image(tmp_path / "new.img", 4 * MiB + 128 * 1024)
    img.random(0, 2 * MiB, seed=7)
    backup = ("-r", repo, "backup", img.path, "--source-name", source, "--engine", "local")
    res = cli(*backup)
    assert res.code == 0, res.err
    full = img.snapshot(tmp_path / "full.img")
    img.take_changes()
    img.random(MiB + 4096, 8192, seed=8)
    img.compressible(3 * MiB, 100_000, seed=8)
    res = cli(*backup, "--changed-extents", img.changes_file(tmp_path / "changes.json"))
    assert res.code == 0, res.err
    points = json.loads(cli("-r", repo, "points", "--json").out)["points"]
    assert len(points) == len(old) + 2
    new_full, new_changed = points[-2:]
    assert new_changed["mode"] == "changed-extents" and new_changed["parent"] == new_full["id"]
    res = cli("-r", repo, "forget", old[0]["id"])
    assert res.code == 0, res.err
    res = cli("-r", repo, "prune")
    assert res.code == 0, res.err
    res = cli("-r", repo, "verify", "--read-data", "--json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True, res.out + res.err
    for p in old[1:]:
        out = tmp_path / f"{p['id']}.img"
        assert cli("-r", repo, "restore", p["id"], out).code == 0
        assert _sha256(out) == p["sha256"]
    for p, want in ((new_full, full), (new_changed, img.path)):
        out = tmp_path / f"{p['id']}.img"
        assert cli("-r", repo, "restore", p["id"], out).code == 0
        assert out.read_bytes() == want.read_bytes()
    res = cli("-r", repo, "report", "growth", "--format", "json")
    assert res.code == 0, res.err


# -- the sealed golden only ---------------------------------------------------------------------


def test_sealed_golden_is_the_plain_one_encrypted() -> None:
    """The same image and points as golden-v1: what differs between the two is encryption
    (and parity), not the scenario."""
    assert SEALED.password is not None and PLAIN.password is None
    assert SEALED.expected["encryption"]["algorithm"] == "aes-256-gcm"
    same = ("mode", "size", "sha256", "data_chunks", "data_bytes")
    assert [[p[k] for k in same] for p in SEALED.points] == [
        [p[k] for k in same] for p in PLAIN.points
    ]
    for key in ("changed_extents_of_point_2", "source", "format_version"):
        assert SEALED.expected[key] == PLAIN.expected[key]


def test_sealed_golden_hides_what_it_holds() -> None:
    """Outside config.json and the key files, no file names the source (FORMAT.md section 21):
    the golden exercises the sealed forms of every document, table and pack."""
    source = SEALED.expected["source"].encode()
    for f in SEALED.expected["files"]:
        if f != "config.json" and not f.startswith("keys/"):
            assert source not in (SEALED.path / f).read_bytes(), f


def test_sealed_golden_refuses_a_wrong_password(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _copy(SEALED, tmp_path)
    crypto.forget_unlocked()
    with pytest.raises(PasswordError, match="wrong password"):
        Repository.open(repo, password=f"{SEALED.password} not")
    r = Repository.open(repo, password=SEALED.password)
    assert [r.key_id] == [k["id"] for k in SEALED.expected["key_files"]]
    monkeypatch.setenv("COMB_PASSWORD", "not the golden password")
    assert_one_line_error(cli("-r", repo, "points"), "wrong password", code=12)
    monkeypatch.delenv("COMB_PASSWORD")
    password_file = tmp_path / "password"
    password_file.write_text(f"{SEALED.password}\n")
    res = cli("--password-file", password_file, "-r", repo, "points", "--json")
    assert res.code == 0, res.err
    assert [p["id"] for p in json.loads(res.out)["points"]] == [p["id"] for p in SEALED.points]


def test_sealed_golden_parity_heals_a_damaged_pack(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parity files the old comb wrote rebuild a pack today's comb finds damaged."""
    monkeypatch.setenv("COMB_PASSWORD", str(SEALED.password))
    repo = _copy(SEALED, tmp_path)
    pack = Path(repo) / next(f for f in SEALED.expected["files"] if f.endswith(".pack"))
    with open(pack, "r+b") as fh:
        fh.seek(2000)
        fh.write(b"\xff\xff\xff\xff")
    res = cli("-r", repo, "scrub", "--json")
    assert res.code != 0
    report = json.loads(res.out)
    assert report["parity"] is True and report["parity_problems"] == {}
    assert [d["healable"] for d in report["damaged"]] == [True]
    res = cli("-r", repo, "scrub", "--repair", "--json")
    assert res.code == 0, res.err
    assert [h["action"] for h in json.loads(res.out)["healed"]] == ["rebuilt from parity"]
    res = cli("-r", repo, "verify", "--read-data", "--json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True, res.out + res.err
    for p in SEALED.points:
        out = tmp_path / f"{p['id']}.img"
        assert cli("-r", repo, "restore", p["id"], out).code == 0
        assert _sha256(out) == p["sha256"]
