"""``comb restore POINT OUTPUT --delta``: an existing output rewritten in place where it differs
from the point (by chunk id: keyed in an encrypted repository), and only there."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import combtest
import pytest
from combtest import CliRunner, Image, ImageFactory, MiB, assert_one_line_error

import stages.target as target_module

CHUNK = 64 * 1024


def _image(make_image: ImageFactory) -> Image:
    img = make_image(12 * MiB + 12345)  # a partial last chunk
    img.random(0, 3 * MiB, seed=1)
    img.zeros(3 * MiB, MiB)  # written zeros
    img.compressible(5 * MiB, 2 * MiB, seed=2)  # a hole from 7 MiB to 12 MiB, but for:
    img.random(12 * MiB, 12345, seed=3)
    return img


def _damage(path: Path) -> int:
    """Change scattered chunks, zero a data region, write into a hole; returns the bytes of
    the chunks touched (each change stays inside one chunk)."""
    changed = 0
    with open(path, "r+b") as fh:
        for n in (1, 17, 40, 90):  # data chunks (random and compressible regions)
            fh.seek(n * CHUNK + 100)
            fh.write(random.Random(n).randbytes(500))
            changed += CHUNK
        fh.seek(2 * MiB)  # a data region zeroed: 2 chunks
        fh.write(bytes(2 * CHUNK))
        changed += 2 * CHUNK
        fh.seek(9 * MiB + 10)  # data into a hole: 1 chunk
        fh.write(b"not a hole")
        changed += CHUNK
        fh.seek(3 * MiB + CHUNK)  # data where the point has written zeros: 1 chunk
        fh.write(b"x")
        changed += CHUNK
        fh.seek(12 * MiB + 5)  # the partial last chunk
        fh.write(b"tail")
        changed += 12345
    return changed


def _data_after(path: Path, offset: int) -> int:
    """Where the file's next data is (SEEK_DATA), from ``offset``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    finally:
        os.close(fd)


@pytest.mark.parametrize("encrypted", [True, False])
def test_delta_restore_rewrites_only_what_differs(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory, encrypted: bool
) -> None:
    repo = tmp_path / "repo"
    init = ["init"] if encrypted else ["init", "--encryption", "none"]
    assert cli("-r", repo, *init).code == 0
    img = _image(make_image)
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", "vm@latest", out).code == 0
    hole_before = _data_after(out, 7 * MiB)
    changed = _damage(out)
    assert out.read_bytes() != img.path.read_bytes()

    res = cli("-r", repo, "restore", "vm@latest", out, "--delta", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert out.read_bytes() == img.path.read_bytes()
    assert doc["delta"] is True and doc["point"] and doc["size"] == img.size
    assert doc["bytes_checked"] == img.size
    assert doc["bytes_written"] == changed  # the changed chunks, not the whole disk
    assert doc["chunks_rewritten"] == 9  # 4 + 2 + 1 + 1 + the last
    assert _data_after(out, 7 * MiB) == hole_before  # the data written into the hole: a hole again

    # Idempotent: a second run writes nothing; the text summary says so.
    again = cli("-r", repo, "restore", "vm@latest", out, "--delta")
    assert again.code == 0, again.err
    assert "in place" in again.out and "rewrote 0 chunk(s)" in again.out
    assert out.read_bytes() == img.path.read_bytes()


def test_delta_restore_fixes_the_size_and_follows_a_symlink(
    cli: CliRunner, repo_path: Path, tmp_path: Path, make_image: ImageFactory
) -> None:
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    out = tmp_path / "out.img"
    link = tmp_path / "link.img"
    link.symlink_to(out)
    # Longer than the point (cut), then shorter (extended, its tail restored).
    out.write_bytes(img.path.read_bytes() + b"extra" * 1000)
    res = cli("-r", repo_path, "restore", "vm@latest", link, "--delta", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["bytes_written"] == 0
    assert link.is_symlink() and out.read_bytes() == img.path.read_bytes()
    with open(out, "r+b") as fh:
        fh.truncate(6 * MiB)
    res = cli("-r", repo_path, "restore", "vm@latest", link, "--delta", "--json")
    assert res.code == 0, res.err
    assert out.read_bytes() == img.path.read_bytes()
    assert json.loads(res.out)["bytes_written"] == MiB + 12345  # 5-6 MiB and the last chunk


def test_delta_restore_needs_an_existing_output(
    cli: CliRunner, repo_path: Path, tmp_path: Path, make_image: ImageFactory
) -> None:
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    missing = tmp_path / "missing.img"
    res = cli("-r", repo_path, "restore", "vm@latest", missing, "--delta")
    assert_one_line_error(res, "does not exist", code=2)
    assert not missing.exists()
    res = cli("-r", repo_path, "restore", "vm@latest", "-", "--delta")
    assert_one_line_error(res, "standard output", code=2)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "loop-backing.img"
    with combtest.loop_device(backing, 16 * MiB) as dev:
        yield dev, backing


def test_delta_restore_to_a_block_device(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, loop_device: tuple[str, Path]
) -> None:
    dev, backing = loop_device
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    # A device full of 0xA5: every chunk differs, zero regions included.
    res = cli("-r", repo_path, "restore", "vm@latest", dev, "--delta", "--json")
    assert res.code == 0, res.err
    with open(dev, "rb") as fh:
        assert fh.read(img.size) == img.path.read_bytes()
    assert json.loads(res.out)["bytes_written"] == img.size
    with open(dev, "r+b") as fh:
        fh.seek(17 * CHUNK)
        fh.write(b"changed")
        fh.seek(9 * MiB)
        fh.write(b"changed")
    res = cli("-r", repo_path, "restore", "vm@latest", dev, "--delta", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["bytes_written"] == 2 * CHUNK
    with open(dev, "rb") as fh:
        assert fh.read(img.size) == img.path.read_bytes()
    # Past the point's size, the device is left as it was.
    assert backing.read_bytes()[img.size :] == b"\xa5" * (16 * MiB - img.size)


def test_delta_restore_writes_zeros_where_no_hole_can_be_punched(
    cli: CliRunner,
    repo_path: Path,
    tmp_path: Path,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    out = tmp_path / "out.img"
    assert cli("-r", repo_path, "restore", "vm@latest", out).code == 0
    with open(out, "r+b") as fh:
        fh.seek(8 * MiB)
        fh.write(b"\x01" * (3 * CHUNK))
    monkeypatch.setattr(target_module, "_fallocate", None)
    res = cli("-r", repo_path, "restore", "vm@latest", out, "--delta", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["chunks_rewritten"] == 3
    assert out.read_bytes() == img.path.read_bytes()
