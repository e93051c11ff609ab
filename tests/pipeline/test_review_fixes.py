"""Defects found by an adversarial review, each pinned by a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from combtest import CliRunner, ImageFactory, assert_one_line_error, cmp_files

from catalog.errors import CorruptionError

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def test_two_restores_to_one_output_leave_one_whole_image(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    a, b = make_image(24 * MIB, "a.img"), make_image(24 * MIB, "b.img")
    a.random(0, 24 * MIB, seed=1)
    b.random(0, 24 * MIB, seed=2)
    for img in (a, b):
        assert cli("-r", repo_path, "backup", img.path).code == 0
    out = tmp_path / "out.img"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "-r",
                str(repo_path),
                "restore",
                f"{img.path}@latest",
                str(out),
                "--force",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for img in (a, b)
    ]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    data = out.read_bytes()
    assert data in (a.path.read_bytes(), b.path.read_bytes())
    assert not list(tmp_path.glob(".out.img.comb-partial*"))


def test_a_lost_pack_is_healed_by_the_next_backup(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(8 * MIB)
    img.random(0, 4 * MIB, seed=3)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    before = img.snapshot(tmp_path / "before.img")
    for pack in (repo_path / "packs").glob("*/*.pack"):
        pack.unlink()
    img.random(6 * MIB, MIB, seed=4)  # a different layout: the new pack differs
    res = cli("-r", repo_path, "backup", img.path, "--source-name", "again", "--json")
    assert res.code == 0, res.err
    out = tmp_path / "out.img"
    assert cli("-r", repo_path, "restore", "again@latest", out).code == 0
    cmp_files(out, img.path)
    # The first point's chunks were stored again, so it is whole again too.
    first = tmp_path / "first.img"
    assert cli("-r", repo_path, "restore", f"{img.path}@latest", first).code == 0
    cmp_files(first, before)


def test_a_lost_pack_is_named_by_restore(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(4 * MIB)
    img.random(0, 2 * MIB, seed=5)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    for pack in (repo_path / "packs").glob("*/*.pack"):
        pack.unlink()
    res = cli("-r", repo_path, "restore", f"{img.path}@latest", tmp_path / "x.img")
    assert_one_line_error(res, "is missing", code=CorruptionError.exit_code)
    assert not (tmp_path / "x.img").exists()


def test_endless_change_list_is_refused(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(MIB)
    img.random(0, MIB)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    res = cli("-r", repo_path, "backup", img.path, "--changed-extents", "/dev/zero")
    assert_one_line_error(res, "/dev/zero", "not a regular file", code=6)


def test_query_sees_only_the_repository(cli: CliRunner, repo_path: Path) -> None:
    for sql in (
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/*')",
    ):
        assert_one_line_error(cli("-r", repo_path, "query", sql), "query failed", code=9)


def test_streamed_query_output(cli: CliRunner, repo_path: Path) -> None:
    res = cli("-r", repo_path, "query", "SELECT range AS n FROM range(200000)", "--format", "csv")
    assert res.code == 0
    lines = res.out.splitlines()
    assert lines[0] == "n" and lines[1] == "0" and lines[-1] == "199999" and len(lines) == 200001


def test_bad_restore_and_backup_arguments(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(MIB)
    img.random(0, MIB)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    assert_one_line_error(
        cli("-r", repo_path, "restore", f"{img.path}@latest", ""), "no restore output", code=10
    )
    assert_one_line_error(
        cli("-r", repo_path, "backup", img.path, "--batch-mib", "100000"), "--batch-mib", code=2
    )
    assert_one_line_error(
        cli("-r", repo_path, "backup", img.path, "--source-name", ""), "--source-name", code=2
    )


def test_query_leaves_out_damaged_metadata_and_says_so(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(2 * MIB)
    img.random(0, 2 * MIB, seed=6)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    sql = "SELECT count(*) AS n FROM manifests"
    assert cli("-r", repo_path, "query", sql, "--format", "csv").out.split() == ["n", "32"]
    (leaves,) = (repo_path / "manifests" / "leaves").glob("*.parquet")
    data = bytearray(leaves.read_bytes())
    data[-40] ^= 0x5A  # inside the footer: DuckDB alone would still return rows
    leaves.write_bytes(bytes(data))
    res = cli("-r", repo_path, "query", sql, "--format", "csv")
    assert res.code == 0
    assert res.out.split() == ["n", "0"]
    assert "comb: warning: left out of the views:" in res.err and leaves.name in res.err
