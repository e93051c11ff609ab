"""A repository is its owner's alone: files 0600 and directories 0700, whatever the umask
(key files, and a plain repository's disks, used to be world-readable)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB

from catalog.repo import Repository
from drive.overlays.overlay import Overlay


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o000)  # the most permissive: every bit comes from comb
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_every_repository_file_and_directory_is_private(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory, open_umask: None, encryption: str
) -> None:
    repo = tmp_path / "repo"
    img = make_image(2 * MiB)
    img.random(0, MiB)
    assert cli("-r", repo, "init", "--encryption", encryption).code == 0
    assert cli("-r", repo, "backup", img.path, "--source-name", "d").code == 0
    assert cli("-r", repo, "overlays", "create", "ov", "d@latest").code == 0
    Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "ov").close()  # log, lock
    assert cli("-r", repo, "forget", "--keep-last", "1").code == 0  # locks/, forgotten/
    assert (repo / "overlays" / "ov" / "lock").exists()
    seen = {"files": 0, "dirs": 0}
    for path in [repo, *repo.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        kind = "dirs" if path.is_dir() else "files"
        seen[kind] += 1
        assert mode == (0o700 if kind == "dirs" else 0o600), (path, oct(mode))
    assert seen["files"] > 10 and seen["dirs"] > 5
