"""``comb restore POINT --path P --target DIR --xattrs``: extended attributes and POSIX ACLs.

A tree whose files carry user.*, trusted.* and security.* attributes (os.setxattr) and access
and default ACLs (setfacl) is put into a real ext4 image (mkfs.ext4 -d copies them; ext keeps
ACLs in its own compact format) and a real XFS image (loop mount and cp -a: root only; XFS
keeps ACLs as big-endian SGI_ACL_*), backed up, and restored: every attribute the kernel lists
and every ``getfacl`` line of the restored tree equal the original's. Without --xattrs none is
set; not as root, trusted.* and security.* are left out with one warning each; an ext4 image
with damaged attribute areas (found with debugfs, bytes flipped) gives one-line warnings, the
damaged attribute skipped (exit 15), never a traceback.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import fsimages as F
import pytest
from combtest import TEST_PASSWORD, CliRunner, need_root, need_tool
from filestest import backed_up, restore
from fsimages_tree import make_xattr_tree, xattrs_below

from catalog.repo import Repository
from drive.files.extract import extract
from drive.files.view import PointFiles


def getfacl(top: Path, rels: list[bytes]) -> str:
    """``getfacl`` of ``rels`` (relative to ``top``, no links), numeric, as one text."""
    paths = [b"." + rel for rel in rels]
    done = subprocess.run(
        [need_tool("getfacl"), "-n", "-P", "--", *paths], cwd=top, capture_output=True, check=True
    )
    return done.stdout.decode()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("setfacl")
    top = tmp_path_factory.mktemp("xattr-tree") / "tree"
    make_xattr_tree(top)
    return top


@pytest.fixture(scope="module")
def ext4_point(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("ext4-xattrs")
    return backed_up(F.ext4_image(tree, tmp / "fs.img"), tmp, "xattrs")


def same_as_original(tree: Path, restored: Path) -> None:
    want = xattrs_below(tree)
    assert xattrs_below(restored) == want
    plain = [rel for rel in sorted(want) if not os.path.islink(os.fsencode(tree) + rel)]
    assert getfacl(restored, plain) == getfacl(tree, plain)
    for rel in plain:  # an ACL's mask is the mode's group bits: both as they were
        assert (
            os.lstat(os.fsencode(restored) + rel).st_mode
            == os.lstat(os.fsencode(tree) + rel).st_mode
        ), rel


def test_ext4_xattrs_and_acls_are_restored(
    cli: CliRunner, tree: Path, ext4_point: tuple[Path, str], tmp_path: Path
) -> None:
    code, out = restore(cli, ext4_point, tmp_path, "--xattrs")
    assert code == 0, out
    got = xattrs_below(tree)
    assert got[b"/acl-file"] and got[b"/shared"] and len(got[b"/big-value"]["user.big"]) == 700
    same_as_original(tree, tmp_path / "disk")
    count = sum(len(v) for k, v in got.items() if k != b"/hard")  # a hard link's are its file's
    assert f"{count} xattrs set" in out


def test_without_xattrs_none_is_set(
    cli: CliRunner, ext4_point: tuple[Path, str], tmp_path: Path
) -> None:
    code, out = restore(cli, ext4_point, tmp_path)
    assert code == 0, out
    assert "xattrs set" not in out
    assert not any(xattrs_below(tmp_path / "disk").values())
    got = cli("-r", ext4_point[0], "restore", ext4_point[1], tmp_path / "img", "--xattrs")
    assert got.code != 0 and "--xattrs restores the attributes of files" in got.err  # not a disk


def test_not_as_root_trusted_and_security_are_left_out_once_each(
    tree: Path, ext4_point: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_root("the tree's trusted.* and security.* attributes are made as root")
    r = Repository.open(str(ext4_point[0]), password=TEST_PASSWORD)
    warnings: list[str] = []
    with PointFiles(r.reader(r.resolve(ext4_point[1]))) as pf:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        done = extract(pf, pf.lookup("/disk"), str(tmp_path), warn=warnings.append, xattrs=True)
    assert sorted(warnings) == [
        "not restoring security.* extended attributes: only as root",
        "not restoring trusted.* extended attributes: only as root",
    ]
    assert not done.skipped
    want = {
        rel: {k: v for k, v in attrs.items() if not k.startswith(("trusted.", "security."))}
        for rel, attrs in xattrs_below(tree).items()
    }
    assert xattrs_below(tmp_path / "disk") == want


def test_xfs_xattrs_and_acls_are_restored(cli: CliRunner, tree: Path, tmp_path: Path) -> None:
    need_tool("mkfs.xfs")
    need_root("an XFS image is filled through a loop mount")
    image = F.xfs_image(tree, tmp_path / "xfs.img")
    with F.mounted(image, "xfs", read_only=True) as mnt:  # cp -a kept them all (XFS shows root
        on_disk = xattrs_below(mnt)  # its ACLs' own attributes too: SGI_ACL_FILE, _DEFAULT)
    own = {rel: {k: v for k, v in a.items() if "SGI_ACL" not in k} for rel, a in on_disk.items()}
    assert own == xattrs_below(tree) and on_disk != own
    point = backed_up(image, tmp_path, "xattrs")
    image.unlink()
    code, out = restore(cli, point, tmp_path / "out", "--xattrs")
    assert code == 0, out
    same_as_original(tree, tmp_path / "out" / "disk")


def _ext4_small(tmp_path: Path) -> Path:
    """An ext4 image: /a with user.good and user.bad in its inode, /b with a
    value in the xattr block, /c with an access ACL in its inode."""
    tree = tmp_path / "small"
    tree.mkdir()
    (tree / "a").write_text("a\n")
    os.setxattr(tree / "a", "user.good", b"kept")
    os.setxattr(tree / "a", "user.bad", b"damaged")
    (tree / "b").write_text("b\n")
    os.setxattr(tree / "b", "user.big", b"B" * 700)
    (tree / "c").write_text("c\n")
    subprocess.run([need_tool("setfacl"), "-m", "u:1234:rw-", tree / "c"], check=True)
    return F.ext4_image(tree, tmp_path / "fs.img", size_mb=16)


def _debugfs(image: Path, request: str) -> str:
    done = subprocess.run(
        [need_tool("debugfs"), "-R", request, image], capture_output=True, text=True, check=True
    )
    return done.stdout


def _block_size(image: Path) -> int:
    return int(_debugfs(image, "stats").split("Block size:")[1].split()[0])


def _inode_offset(image: Path, path: str) -> int:
    """Where the inode of ``path`` lies in the image (debugfs imap)."""
    found = re.search(
        r"located at block (\d+), offset (0x[0-9a-f]+)", _debugfs(image, f"imap {path}")
    )
    assert found, path
    return int(found[1]) * _block_size(image) + int(found[2], 16)


def _flip(image: Path, at: int, data: bytes) -> None:
    with open(image, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


def test_damaged_xattrs_are_one_line_each_and_the_rest_restored(
    cli: CliRunner, tmp_path: Path
) -> None:
    image = _ext4_small(tmp_path)
    raw = image.read_bytes()
    a = _inode_offset(image, "/a")
    bad = raw.index(b"bad", a, a + 256) - 16  # its entry: name length, index, value offset
    _flip(image, bad + 2, struct.pack("<H", 0xFFF0))  # its value far outside the inode
    c = _inode_offset(image, "/c")
    acl = raw.index(b"\x01\x00\x00\x00\x01\x00\x06\x00", c, c + 256)
    _flip(image, acl, b"\x07")  # the ACL's version
    block = int(_debugfs(image, "stat /b").split("File ACL:")[1].split()[0])
    _flip(image, block * _block_size(image), b"\x00\x00\x00\x00")  # the xattr block's magic
    point = backed_up(image, tmp_path, "xattrs")
    code, out = restore(cli, point, tmp_path / "out", "--xattrs")
    assert code == 15, out
    lines = [line for line in out.splitlines() if "skipped" in line and "extended" in line]
    assert len(lines) == 3, out
    assert any("/a" in line and "user.bad" in line and "outside" in line for line in lines)
    assert any("/c" in line and "posix_acl_access" in line for line in lines)
    assert any("/b" in line and "no xattr magic" in line for line in lines)
    disk = tmp_path / "out" / "disk"
    assert os.listxattr(disk / "a") == ["user.good"] and os.getxattr(disk / "a", "user.good")
    assert not os.listxattr(disk / "b") and not os.listxattr(disk / "c")
    assert (disk / "b").read_text() == "b\n"  # the data is restored all the same


def test_a_value_in_an_inode_of_its_own_is_read(tmp_path: Path) -> None:
    """ext4's ea_inode: a value kept in an inode of its own (set with debugfs ea_set)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("f\n")
    image = tmp_path / "fs.img"
    with open(image, "wb") as fh:
        fh.truncate(32 << 20)
    subprocess.run(
        [need_tool("mkfs.ext4"), "-q", "-F", "-b", "1024", "-O", "ea_inode", "-d", tree, image],
        check=True,
        capture_output=True,
    )
    value = os.urandom(1024)
    (tmp_path / "value").write_bytes(value)
    subprocess.run(
        ["debugfs", "-w", "-R", f"ea_set -f {tmp_path / 'value'} /f user.huge", image],
        check=True,
        capture_output=True,
    )
    assert "File ACL: 0" in _debugfs(image, "stat /f")  # not in a block: in an inode
    from drivetest import FileSource

    with PointFiles(FileSource(str(image))) as pf:  # type: ignore[arg-type]
        found, problems = pf.xattrs(pf.lookup("/disk/f"))
    assert found == [(b"user.huge", value)] and not problems
