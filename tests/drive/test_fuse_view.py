"""The file view of ``comb mount`` (``drive.fuse_view``): MOUNTPOINT/<source>/<point>/files/
shows the volumes of a real GPT disk (ext4 and NTFS made with mkfs, tests/fsimages.py) and
their files as the originals were: the same tree, contents, modes, symlink targets and hard
links, judged by walking the mount with os.lstat, readlink and SHA-256."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import fsimages as F
import pytest
from combtest import TEST_PASSWORD, api_backup
from fsimages_tree import MTIME_RESOLUTION_NS
from fusetest import Mount

from catalog.repo import Repository


def test_files_of_a_point_read_through_the_mount(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    items = F.make_tree(tree, hostile=True)

    def build(dest: Path) -> Path:
        images = [
            F.ext4_image(tree, dest.parent / "v-e.img"),
            F.ntfs_image(tree, dest.parent / "v-n.img"),
        ]
        try:
            return F.partitioned(dest, images, "gpt")
        finally:
            for image in images:
                image.unlink()

    disk = F.cached("gpt-ext4-ntfs.img", build)
    repo = Repository.init(str(tmp_path / "repo"), password=TEST_PASSWORD)
    point = api_backup(repo.location, disk, name="web").id
    m = Mount(repo.location, tmp_path / "mnt")
    try:
        files = m.path / "web" / point / "files"
        assert sorted(os.listdir(files)) == ["part1", "part2"]
        for part, fstype in (("part1", "ext4"), ("part2", "ntfs")):
            got = F.walk(files / part)
            got.pop(b"/lost+found", None)
            truth = F.truth_for(fstype, items)
            if fstype == "ntfs":  # as comb ls shows them (README Known limits)
                truth = {k: v for k, v in truth.items() if v.kind != "fifo"}
                got = {k: v for k, v in got.items() if not k.endswith(b"/fifo")}
            assert got == truth, part
            res = MTIME_RESOLUTION_NS.get(fstype, 1)
            assert {k: v.mtime_ns - v.mtime_ns % res for k, v in got.items()} == {
                k: v.mtime_ns for k, v in truth.items()
            }
        with pytest.raises(OSError) as err:
            open(files / "part1" / "etc" / "fstab", "r+b")
        assert err.value.errno == errno.EROFS
        code, _, _ = m.stop()
        assert code == 0
    finally:
        m.cleanup()
