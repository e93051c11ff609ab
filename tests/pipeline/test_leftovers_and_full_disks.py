"""What a killed writer leaves in tmp/ goes with the next backup or prune (not a day later);
a full disk is named as one ("No space left on device" and the path), never "short write"."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, assert_one_line_error

from catalog.repo import Repository


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(repo: Path, pid: int) -> Path:
    path = repo / "tmp" / f"{pid}-0123456789abcdef.tmp"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(MiB))
    return path


@pytest.mark.parametrize("command", ["backup", "prune"])
def test_a_dead_writers_temporary_files_go_with_the_next_backup_or_prune(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, command: str
) -> None:
    img = make_image(2 * MiB)
    img.random(0, MiB)
    dead = _leftover(repo_path, _dead_pid())
    live = _leftover(repo_path, os.getpid())  # a writer that is still running: kept
    res = cli("-r", repo_path, "verify")
    assert res.code == 0 and "1 temporary file(s) left by interrupted writes" in res.err, res.err
    args = ["backup", img.path] if command == "backup" else ["prune"]
    assert cli("-r", repo_path, *args).code == 0
    assert not dead.exists() and live.exists()
    live.unlink()
    assert "temporary" not in cli("-r", repo_path, "verify").err


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (needs root: skipped without, a failure in CI)."""
    where = tmp_path / "small"
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must be able to mount a tmpfs: {res.stderr.decode().strip()}")
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_named(
    cli: CliRunner, small_disk: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(16 * MiB)
    img.random(0, 16 * MiB)
    repo = small_disk / "repo"
    Repository.init(str(repo), password=TEST_PASSWORD)
    res = cli("-r", repo, "backup", img.path, "--engine", "local")
    assert_one_line_error(res, "No space left on device", code=8)
    assert f"{repo}/tmp/" in res.err and "short write" not in res.err
    assert os.listdir(repo / "tmp") == []  # the aborted file is gone
    assert cli("-r", repo, "verify").code == 0
    # A restore onto a full disk: the target is named.
    good = tmp_path / "repo"
    Repository.init(str(good), password=TEST_PASSWORD)
    assert cli("-r", good, "backup", img.path, "--source-name", "d").code == 0
    res = cli("-r", good, "restore", "d@latest", small_disk / "out.img")
    assert_one_line_error(res, "No space left on device", code=10)
    assert str(small_disk / "out.img") in res.err
