"""Outputs rewritten with --force keep their mode, owner and group, and a symlink is followed,
never replaced by a file (restore and export alike)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB

COMMANDS = {"restore": [], "export": ["--format", "raw"]}


@pytest.fixture
def backed(cli: CliRunner, repo_path: Path, make_image: ImageFactory) -> bytes:
    img = make_image(2 * MiB)
    img.random(0, MiB)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "d").code == 0
    return img.path.read_bytes()


@pytest.mark.parametrize("command", COMMANDS)
def test_force_keeps_mode_owner_and_group(
    cli: CliRunner, repo_path: Path, backed: bytes, tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    if os.geteuid() == 0:
        os.chown(out, 1234, 2345)
    res = cli("-r", repo_path, command, "d@latest", out, *COMMANDS[command], "--force")
    assert res.code == 0, res.err
    st = out.stat()
    assert out.read_bytes() == backed and stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 2345)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_is_followed_not_replaced(
    cli: CliRunner, repo_path: Path, backed: bytes, tmp_path: Path, command: str, dangling: bool
) -> None:
    real = tmp_path / "real.img"
    if not dangling:
        real.write_bytes(b"old")
    link = tmp_path / "link.img"
    link.symlink_to(real)
    res = cli("-r", repo_path, command, "d@latest", link, *COMMANDS[command], "--force")
    assert res.code == 0, res.err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == backed
