"""XFS through comb's file view (``drive.files.yal``, libfsxfs in the worker): a real XFS image
(mkfs.xfs, filled by cp -a through a loop mount: tests/fsimages.py) lists and reads exactly as
the original tree, names and link targets that are not UTF-8 included; one with the shapes
libfsxfs answers oddly (large directories, remote links, preallocated and leading-hole files)
equals what the kernel reads; a damaged superblock is one line, not a hang."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import fsimages as F
import pytest
from combtest import need_tool
from drivetest import FileSource
from filestest import listing

from catalog.errors import FileSystemError
from drive.files.view import PointFiles


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, F.Item]]:
    tree = tmp_path_factory.mktemp("tree")
    items = F.make_tree(tree, hostile=True)
    return F.cached("xfs-hostile.img", lambda dest: F.xfs_image(tree, dest)), items


@pytest.fixture
def files_of() -> Iterator[object]:
    opened: list[PointFiles] = []

    def make(image: Path) -> PointFiles:
        pf = PointFiles(FileSource(str(image)))  # type: ignore[arg-type]
        opened.append(pf)
        return pf

    yield make
    for pf in opened:
        pf.close()


def test_every_entry_and_file_equals_the_original(
    files_of: object, xfs: tuple[Path, dict[bytes, F.Item]]
) -> None:
    pf = files_of(xfs[0])  # type: ignore[operator]
    truth = F.truth_for("xfs", xfs[1])
    got = listing(pf, "/disk")
    assert b"/hostile/bad\xff\xfe" in got  # libfsxfs refuses it; read from the raw directory
    assert got == truth
    assert {k: v.mtime_ns for k, v in got.items()} == {k: v.mtime_ns for k, v in truth.items()}
    assert not pf.skipped


def _odd_shapes(mnt: Path) -> None:
    """What libfsxfs reads in other ways: leaf and node directories with a non-UTF-8 name,
    non-UTF-8 link targets kept in the inode and in a block, preallocated (unwritten) extents,
    a file that starts with a hole."""
    root = os.fsencode(mnt)
    for count in (40, 3000):
        os.mkdir(root + b"/big%d" % count)
        for i in range(count):
            (mnt / f"big{count}" / f"entry-with-a-longish-name-{i:05d}").write_bytes(b"%d" % i)
        with open(root + b"/big%d/odd\xff\xfe" % count, "wb") as fh:
            fh.write(b"odd\n")
    os.symlink(b"short\xff-target", root + b"/short-link")
    os.symlink(b"/" + b"\xfe" * 200 + b"/" + b"x" * 400, root + b"/remote-link")
    with open(root + b"/prealloc", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 1 << 20)
        fh.seek(8192)
        fh.write(b"written inside a preallocated extent")
    with open(root + b"/hole-first", "wb") as fh:
        fh.seek(5 << 20)
        fh.write(os.urandom(70_000))


def test_odd_shapes_equal_what_the_kernel_reads(files_of: object, tmp_path: Path) -> None:
    need_tool("mkfs.xfs")
    image = tmp_path / "odd.img"
    with open(image, "wb") as fh:
        fh.truncate(300 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", image], check=True, capture_output=True)
    with F.mounted(image, "xfs") as mnt:
        _odd_shapes(mnt)
    pf = files_of(image)  # type: ignore[operator]
    got = listing(pf, "/disk")
    assert b"/big3000/odd\xff\xfe" in got and b"/big40/odd\xff\xfe" in got
    assert got == F.kernel_listing(image, fstype="xfs")
    assert not pf.skipped


@pytest.mark.parametrize(
    "field, value",
    [(4, 1 << 20), (4, 0), (84, 0), (88, 0xFFFF_FFFF), (56, 0xFFFF_FFFF)],
    ids=["blocksize-huge", "blocksize-zero", "agblocks-zero", "agcount-huge", "rootino"],
)
def test_a_damaged_superblock_is_one_line(
    files_of: object, tmp_path: Path, xfs: tuple[Path, dict[bytes, F.Item]], field: int, value: int
) -> None:
    image = tmp_path / "bad.img"
    shutil.copyfile(xfs[0], image)
    with open(image, "r+b") as fh:
        fh.seek(field)
        fh.write(value.to_bytes(4, "big"))
    pf = files_of(image)  # type: ignore[operator]
    with pytest.raises(FileSystemError) as caught:
        pf.listdir(pf.lookup("/disk"))
    text = str(caught.value)
    assert text.startswith("volume disk (xfs at offset 0): ") and "\n" not in text, text
