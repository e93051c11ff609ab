"""``comb restore POINT --path P --target DIR --special``: character and block devices.

A tree of device nodes (os.mknod, as root: ext's old encoding 1:3 and 7:200, its new one
259:70000 and 4000:1048575), a FIFO, a socket and a hard link to a device is put into a real
ext4 image (mkfs.ext4 -d copies device nodes) and a real XFS image (loop mount and cp -a),
backed up and restored: every node's type, mode, major and minor, owner and mtime equal the
original's. Without --special they are skipped with a warning (exit 15); not as root, one
warning per kind; a socket is never made (said why); an ext4 image whose device inodes are
damaged (debugfs sif) gives one line for each or a faithful number, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import fsimages as F
import pytest
from combtest import TEST_PASSWORD, CliRunner, need_root, need_tool
from drivetest import FileSource
from filestest import backed_up, restore
from fsimages_tree import DEVICES, make_device_tree, special_below

from catalog.errors import FileSystemError, PathNotFound
from catalog.repo import Repository
from drive.files.extract import extract
from drive.files.view import PointFiles


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_root("device nodes are made with mknod")
    top = tmp_path_factory.mktemp("dev-tree") / "tree"
    make_device_tree(top)
    return top


@pytest.fixture(scope="module")
def image(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return F.ext4_image(tree, tmp_path_factory.mktemp("ext4-devices") / "fs.img", size_mb=16)


@pytest.fixture(scope="module")
def ext4_point(image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return backed_up(image, tmp_path_factory.mktemp("ext4-devices-repo"), "devices")


def skipped_lines(out: str) -> list[str]:
    """What each "skipped" warning says, after ``skipped disk``."""
    return [
        line.split("skipped disk", 1)[1] for line in out.splitlines() if "skipped disk/" in line
    ]


def test_ext4_devices_are_restored_with_special(
    cli: CliRunner, tree: Path, ext4_point: tuple[Path, str], tmp_path: Path
) -> None:
    want = special_below(tree)
    assert {rel for rel, *_ in DEVICES} < set(want)
    code, out = restore(cli, ext4_point, tmp_path, "--special")
    assert code == 15, out  # the socket: never made
    assert skipped_lines(out) == [
        "/sock: a socket (not restored: a socket exists only while a program listens on it)"
    ], out
    disk = tmp_path / "disk"
    assert special_below(disk) == want
    assert os.major(os.lstat(disk / "nodes" / "wide").st_rdev) == 4000
    again = os.lstat(disk / "nodes" / "loop200-again")
    assert again.st_ino == os.lstat(disk / "nodes" / "loop200").st_ino  # still a hard link
    assert (disk / "plain").read_bytes() == b"plain\n" and not (disk / "sock").exists()


def test_without_special_devices_are_skipped_with_a_warning(
    cli: CliRunner, ext4_point: tuple[Path, str], tmp_path: Path
) -> None:
    code, out = restore(cli, ext4_point, tmp_path)
    assert code == 15, out
    lines = skipped_lines(out)
    for rel, kind, *_ in DEVICES:
        name = "chardev" if kind == stat.S_IFCHR else "blockdev"
        assert f"{rel.decode()}: a {name} (restored only with --special" in "".join(lines)
    assert all("devices as root" in line for line in lines if "socket" not in line), out
    assert len(lines) == len(DEVICES) + 3  # the second name of a device, the FIFO, the socket
    assert special_below(tmp_path / "disk") == {}
    assert (tmp_path / "disk" / "plain").read_bytes() == b"plain\n"


def test_not_as_root_one_warning_per_kind(
    ext4_point: tuple[Path, str], tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = Repository.open(str(ext4_point[0]), password=TEST_PASSWORD)
    warnings: list[str] = []
    with PointFiles(r.reader(r.resolve(ext4_point[1]))) as pf:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        done = extract(pf, pf.lookup("/disk"), str(tmp_path), special=True, warn=warnings.append)
    assert sorted(w for w in warnings if not w.startswith("skipped disk/sock")) == [
        "not restoring block devices: only as root",
        "not restoring character devices: only as root",
    ], warnings
    assert len(warnings) == 3  # and the socket's
    devices = [s for s in done.skipped if "only as root" in s]
    assert len(devices) == len(DEVICES) + 1 and len(done.skipped) == len(DEVICES) + 2
    fifo = special_below(tmp_path / "disk")
    assert list(fifo) == [b"/fifo"] and fifo[b"/fifo"][0] == stat.S_IFIFO


def test_device_numbers_through_the_worker(image: Path) -> None:
    with PointFiles(FileSource(str(image))) as pf:  # type: ignore[arg-type]
        for rel, _, _, major, minor in DEVICES:
            assert pf.device(pf.lookup(b"/disk" + rel)) == (major, minor)
        with pytest.raises(PathNotFound, match="not a device file"):
            pf.device(pf.lookup("/disk/fifo"))


def _debugfs(image: Path, request: str) -> None:
    subprocess.run(
        [need_tool("debugfs"), "-w", "-R", request, image], check=True, capture_output=True
    )


def test_damaged_device_numbers_are_one_line_each(
    cli: CliRunner, image: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    _debugfs(damaged, "sif /null block[0] 0x12345678")  # old encoding, beyond 16 bits
    _debugfs(damaged, "sif /nodes/nvme flags 0x80000")  # a device "with extents"
    _debugfs(damaged, "sif /nodes/wide block[0] 0x0a0b")  # old encoding wins: 10:11
    _debugfs(damaged, "sif /nodes/loop200 block[0] 0")  # new encoding, all bits set
    _debugfs(damaged, "sif /nodes/loop200 block[1] 0xffffffff")
    point = backed_up(damaged, tmp_path, "devices")
    code, out = restore(cli, point, tmp_path / "out", "--special")
    assert code == 15, out
    lines = [line for line in skipped_lines(out) if "/sock" not in line]
    assert len(lines) == 2, out
    lines.sort()
    assert lines[0].startswith("/nodes/nvme: ") and "flags say it holds data" in lines[0]
    assert lines[1].startswith("/null: ") and "0x12345678 is not valid (damaged)" in lines[1]
    got = special_below(tmp_path / "out" / "disk")
    assert b"/null" not in got and b"/nodes/nvme" not in got
    assert got[b"/nodes/wide"][2:4] == (10, 11)
    assert got[b"/nodes/loop200"][2:4] == (4095, 1048575)
    with PointFiles(FileSource(str(damaged))) as pf:  # type: ignore[arg-type]
        with pytest.raises(FileSystemError, match="inode"):
            pf.device(pf.lookup("/disk/null"))


def test_xfs_devices_are_restored(cli: CliRunner, tmp_path: Path) -> None:
    need_tool("mkfs.xfs")
    need_root("an XFS image is filled through a loop mount")
    tree = tmp_path / "tree"
    make_device_tree(tree, xfs=True)
    image = F.xfs_image(tree, tmp_path / "xfs.img")
    point = backed_up(image, tmp_path, "devices")
    image.unlink()
    code, out = restore(cli, point, tmp_path / "out", "--special")
    assert code == 15 and len(skipped_lines(out)) == 1 and "/sock" in out, out  # the socket
    want = special_below(tree)
    assert b"/nodes/nvme" in want and b"/nodes/wide" not in want
    assert special_below(tmp_path / "out" / "disk") == want


def test_ntfs_interix_devices_are_skipped_with_a_warning(cli: CliRunner, tmp_path: Path) -> None:
    """ntfs-3g keeps a device as an Interix file (a magic, major and minor): listed as a device,
    skipped with a warning, never restored as a file."""
    need_root("an NTFS image is filled through ntfs-3g on a loop device")
    tree = tmp_path / "tree"
    make_device_tree(tree, xfs=True, sock=False)
    image = F.ntfs_image(tree, tmp_path / "ntfs.img")
    point = backed_up(image, tmp_path, "devices")
    got = cli("-r", point[0], "ls", point[1], "/disk/nodes", "--json")
    assert (
        got.code == 0 and [e["kind"] for e in json.loads(got.out)["entries"]] == ["blockdev"] * 3
    ), got.out
    code, out = restore(cli, point, tmp_path / "out", "--special")
    assert code == 15, out
    lines = skipped_lines(out)
    assert sorted(line.split(":")[0] for line in lines) == [
        "/nodes/loop200",
        "/nodes/loop200-again",
        "/nodes/nvme",
        "/null",
    ], out
    assert all("an Interix device of ntfs-3g" in line for line in lines), out
    disk = tmp_path / "out" / "disk"
    assert not (disk / "null").exists() and not (disk / "nodes" / "nvme").exists()
    assert (disk / "plain").read_bytes() == b"plain\n"
