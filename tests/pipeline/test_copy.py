"""``comb copy`` (FORMAT.md 9 ``copy_of``): local -> S3 (a real server process) -> local, the
points identical at each hop; the second copy of a source reads only what changed; a copy
sends nothing twice; a repository with other keys (plain, another password) takes them too;
a copy killed mid-way resumes with the point it was copying."""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
from pathlib import Path

from combtest import (
    PYTHON,
    TEST_PASSWORD,
    CliRunner,
    ImageFactory,
    MiB,
    assert_one_line_error,
    point_ids,
)
from s3server import S3Server

from catalog.repo import Repository

ROOT = Path(__file__).resolve().parents[2]


def _history(cli: CliRunner, repo: Path, make_image: ImageFactory, tmp_path: Path) -> list[Path]:
    """Two points of source vm (the second changed in 64 KiB, from a change list, tagged) and
    one of source other; returns the images as each point saw them."""
    assert cli("-r", repo, "init").code == 0
    img = make_image(8 * MiB)
    img.random(0, 3 * MiB, seed=1)
    img.compressible(4 * MiB, 2 * MiB, seed=2)
    img.take_changes()
    first = img.snapshot(tmp_path / "first.img")
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    img.random(MiB, 64 * 1024, seed=3)
    changes = img.changes_file(tmp_path / "changes.json")
    res = cli("-r", repo, "backup", img.path, "--source-name", "vm", "--changed-extents",
              changes, "--tag", "weekly", "--description", "after the update")  # fmt: skip
    assert res.code == 0, res.err
    other = make_image(2 * MiB, "other.img")
    other.random(0, MiB, seed=4)
    assert cli("-r", repo, "backup", other.path, "--source-name", "other").code == 0
    return [first, img.path, other.path]


def _copy(cli: CliRunner, *args: object) -> dict[str, object]:
    res = cli("copy", *args, "--engine", "local", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert isinstance(doc, dict)
    return doc


def _same_points(cli: CliRunner, a: object, b: object, images: list[Path], tmp: Path) -> None:
    """b holds a copy of each of a's points: same time, source, tags and bytes."""
    ra = Repository.open(str(a), password=TEST_PASSWORD)
    rb = Repository.open(str(b), password=TEST_PASSWORD)
    copies = {p.copy_of: p for p in rb.points()}
    for point, image in zip(ra.points(), images, strict=True):
        copy = copies[point.copy_of or point.id]
        assert (copy.time, copy.source, copy.tags, copy.description) == (
            point.time, point.source, point.tags, point.description
        )  # fmt: skip
        out = tmp / f"{copy.id}.img"
        res = cli("-r", b, "restore", copy.id, out)
        assert res.code == 0, res.err
        assert filecmp.cmp(out, image, shallow=False)
        out.unlink()


def test_copy_to_s3_and_back(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    local = tmp_path / "repo"
    images = _history(cli, local, make_image, tmp_path)
    offsite = f"s3://{s3_env.bucket()}/offsite"
    assert cli("-r", offsite, "init").code == 0
    doc = _copy(cli, "--from", local, "--to", offsite)
    copied = doc["copied"]
    assert isinstance(copied, list) and [c["mode"] for c in copied] == [
        "full", "changed-extents", "full"
    ]  # fmt: skip
    assert copied[1]["bytes_read"] == 64 * 1024  # only what changed since the first point
    _same_points(cli, local, offsite, images, tmp_path)
    again = _copy(cli, "-r", local, "--to", offsite)
    assert again["copied"] == [] and len(again["skipped"]) == 3  # type: ignore[arg-type]
    # Copying back doubles nothing; a copy the target forgot is not sent again.
    back_again = _copy(cli, "--from", offsite, "--to", local)
    assert back_again["copied"] == [] and len(back_again["skipped"]) == 3  # type: ignore[arg-type]
    first_copy = point_ids(cli, offsite)[0]
    assert cli("-r", offsite, "forget", first_copy).code == 0
    again = _copy(cli, "-r", local, "--to", offsite)
    assert again["copied"] == [] and len(again["skipped"]) == 3  # type: ignore[arg-type]
    # Into a repository with other keys (plain): chunk ids differ, the points are the same.
    back = tmp_path / "back"
    assert cli("-r", back, "init", "--encryption", "none").code == 0
    doc = _copy(cli, "--from", offsite, "--to", back, "--source", "vm")
    assert len(doc["copied"]) == 1  # type: ignore[arg-type]  # (the first was forgotten)
    assert [p.source for p in Repository.open(str(back)).points()] == ["vm"]
    res = cli("-r", back, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    # Another password for the target: COMB_TO_PASSWORD.
    other = tmp_path / "other"
    monkeypatch.setenv("COMB_PASSWORD", "another password")
    assert cli("-r", other, "init").code == 0
    monkeypatch.setenv("COMB_TO_PASSWORD", "another password")
    monkeypatch.setenv("COMB_PASSWORD", "comb test password")
    doc = _copy(cli, "-r", local, "--to", other, "vm@latest")
    assert len(doc["copied"]) == 1  # type: ignore[arg-type]
    assert_one_line_error(cli("copy", "-r", local, "--to", local), "--to names", code=2)
    monkeypatch.delenv("COMB_TO_PASSWORD")
    (tmp_path / "link").symlink_to(local)
    res = cli("copy", "-r", local, "--to", tmp_path / "link")
    assert_one_line_error(res, "is the repository copied from", code=2)
    assert_one_line_error(cli("copy", "--to", offsite), "--from REPO", code=2)


# The copy as its own process, killed (SIGKILL) just before it commits its second point.
KILLED = r"""
import os, signal, sys
from pipeline.jobs import runner
from pipeline.cli import main

real, calls = runner.commit_point, []

def commit_point(storage, point):
    calls.append(point)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(storage, point)

runner.commit_point = commit_point
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_copy_resumes(cli: CliRunner, make_image: ImageFactory, tmp_path: Path) -> None:
    local, target = tmp_path / "repo", tmp_path / "target"
    images = _history(cli, local, make_image, tmp_path)
    assert cli("-r", target, "init").code == 0
    args = ["copy", "--from", str(local), "--to", str(target), "--engine", "local"]
    killed = subprocess.run([PYTHON, "-c", KILLED, *args], cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(point_ids(cli, target)) == 1
    doc = _copy(cli, "--from", local, "--to", target)
    assert len(doc["skipped"]) == 1 and len(doc["copied"]) == 2  # type: ignore[arg-type]
    _same_points(cli, local, target, images, tmp_path)
    res = cli("-r", target, "verify")
    assert res.code == 0, res.out + res.err
