"""Self-test of tests/fsimages.py: the images hold what make_tree says, judged by mounting them,
and partitioned disks have the partitions asked for."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from combtest import need_tool
from fsimages import (
    Item,
    cached,
    ext4_image,
    fat32_image,
    kernel_listing,
    lvm_disk,
    make_tree,
    ntfs_image,
    partitioned,
    truth_for,
    xfs_image,
)

MiB = 1024 * 1024
Builder = Callable[[Path, Path], Path]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, Item]]:
    root = tmp_path_factory.mktemp("fsimages") / "tree"
    return root, make_tree(root)


def _same(truth: dict[bytes, Item], listing: dict[bytes, Item]) -> None:
    listing.pop(b"/lost+found", None)
    assert sorted(listing) == sorted(truth)
    wrong = {k: (truth[k], listing[k]) for k in truth if truth[k] != listing[k]}
    assert not wrong
    mtimes = {k: (truth[k].mtime_ns, listing[k].mtime_ns) for k in truth}
    assert {k: v for k, v in mtimes.items() if v[0] != v[1]} == {}


@pytest.mark.parametrize(
    ("fstype", "build"), [("ext4", ext4_image), ("xfs", xfs_image), ("ntfs", ntfs_image)]
)
def test_image_holds_the_tree(
    tree: tuple[Path, dict[bytes, Item]], fstype: str, build: Builder
) -> None:
    root, items = tree
    image = cached(f"selftest.{fstype}", lambda dest: build(root, dest))
    truth = truth_for(fstype, items)
    assert any(i.inode_group for i in truth.values())  # hard links survive on all three
    assert any(i.kind == "symlink" for i in truth.values())
    _same(truth, kernel_listing(image, fstype=fstype))


def test_fat_holds_files_and_dirs(tree: tuple[Path, dict[bytes, Item]]) -> None:
    root, items = tree
    image = cached("selftest.vfat", lambda dest: fat32_image(root, dest))
    truth = truth_for("vfat", items)
    assert {i.kind for i in truth.values()} == {"file", "dir"}
    _same(truth, kernel_listing(image))  # mtools reads it: no vfat in this kernel


def _sfdisk(disk: Path) -> dict:
    out = subprocess.run(
        [need_tool("sfdisk"), "--json", disk], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)["partitiontable"]


def test_gpt_and_mbr_with_logical_partitions(
    tree: tuple[Path, dict[bytes, Item]], tmp_path: Path
) -> None:
    root, items = tree
    ext4 = cached("selftest.ext4", lambda dest: ext4_image(root, dest))
    size = ext4.stat().st_size // 512
    gpt = _sfdisk(partitioned(tmp_path / "gpt.img", [ext4, ext4], "gpt"))
    assert gpt["label"] == "gpt"
    assert [(p["start"], p["size"]) for p in gpt["partitions"]] == [
        (2048, size),
        (2048 + size, size),
    ]
    disk = partitioned(tmp_path / "mbr.img", [ext4] * 4, "mbr", logical=True)
    mbr = _sfdisk(disk)
    assert mbr["label"] == "dos"
    names = [p["node"].removeprefix(str(disk)) for p in mbr["partitions"]]
    assert names == ["1", "2", "3", "5", "6"]
    assert [p["type"] for p in mbr["partitions"]] == ["83", "83", "5", "83", "83"]
    assert all(p["start"] % 2048 == 0 for p in mbr["partitions"] if p["type"] != "5")
    sixth = mbr["partitions"][4]
    truth = truth_for("ext4", items)
    _same(truth, kernel_listing(disk, offset=sixth["start"] * 512, fstype="ext4"))


def test_lvm_disk_holds_the_image(tree: tuple[Path, dict[bytes, Item]], tmp_path: Path) -> None:
    root, items = tree
    ext4 = cached("selftest.ext4", lambda dest: ext4_image(root, dest))
    disk = lvm_disk(tmp_path / "lvm.img", ext4, vg="combselftestvg")
    data = disk.read_bytes()
    start = data.index(ext4.read_bytes()[: 2 * MiB])
    _same(truth_for("ext4", items), kernel_listing(disk, offset=start, fstype="ext4"))
