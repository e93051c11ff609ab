"""Block devices as source and as restore target, through real loop devices."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import combtest
import pytest
from combtest import CliRunner, ImageFactory

MIB = 1024 * 1024


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "loop-backing.img"
    with combtest.loop_device(backing, 24 * MIB) as dev:
        yield dev, backing


def test_restore_to_a_block_device_zeroes_the_gaps(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, loop_device: tuple[str, Path]
) -> None:
    dev, backing = loop_device
    img = make_image(24 * MIB)
    img.random(1 * MIB, 3 * MIB, seed=1)
    img.compressible(10 * MIB, 2 * MIB, seed=2)
    img.random(24 * MIB - 70_000, 70_000, seed=3)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    # Without --force an existing device is refused.
    refused = cli("-r", repo_path, "restore", f"{img.path}@latest", dev)
    assert refused.code != 0 and "--force" in refused.err
    assert cli("-r", repo_path, "restore", f"{img.path}@latest", dev, "--force").code == 0
    with open(dev, "rb") as fh:
        restored = fh.read(24 * MIB)
    assert restored == img.path.read_bytes()
    assert backing.read_bytes() == img.path.read_bytes()


def test_back_up_a_block_device(
    cli: CliRunner, repo_path: Path, tmp_path: Path, loop_device: tuple[str, Path]
) -> None:
    dev, backing = loop_device
    with open(dev, "r+b") as fh:
        fh.seek(5 * MIB)
        fh.write(os.urandom(MIB))
        fh.seek(9 * MIB)
        fh.write(bytes(2 * MIB))
        fh.flush()
        os.fsync(fh.fileno())
    res = cli("-r", repo_path, "backup", dev, "--source-name", "loopdisk", "--json")
    assert res.code == 0, res.err
    out = tmp_path / "restored.img"
    assert cli("-r", repo_path, "restore", "loopdisk@latest", out).code == 0
    assert out.read_bytes() == backing.read_bytes()
