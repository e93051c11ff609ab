"""The files inside a recovery point (``drive.files``, ``comb ls``/``cat``/``restore --path``):
a GPT disk holding real ext4, NTFS, FAT32 and exFAT filesystems (made with mkfs and filled by
cp, ntfs-3g, mcopy and exfat-fuse: tests/fsimages.py) is backed up, then every file read back
through comb equals the original, and a restore of a folder equals the original tree."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import fsimages as F
import pytest
from combtest import TEST_PASSWORD, CliRunner, api_backup
from filestest import listing
from fsimages_tree import MTIME_RESOLUTION_NS

from catalog.repo import Repository
from drive.files.extract import extract
from drive.files.view import Node, PointFiles

PARTS = {"part1": "ext4", "part2": "ntfs", "part3": "vfat", "part4": "exfat"}


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, F.Item]]:
    tree = tmp_path_factory.mktemp("tree")
    items = F.make_tree(tree, hostile=True)

    def build(dest: Path) -> Path:
        work = dest.parent
        images = [
            F.ext4_image(tree, work / "p-ext4.img"),
            F.ntfs_image(tree, work / "p-ntfs.img"),
            F.fat32_image(tree, work / "p-fat.img"),
            F.exfat_image(tree, work / "p-exfat.img"),
        ]
        try:
            return F.partitioned(dest, images, "gpt")
        finally:
            for image in images:
                image.unlink()

    return F.cached("gpt-four.img", build), items


@pytest.fixture(scope="module")
def point(
    disk: tuple[Path, dict[bytes, F.Item]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("files") / "repo"
    Repository.init(str(repo), password=TEST_PASSWORD)
    return repo, api_backup(repo, disk[0], name="gpt").id


@pytest.fixture
def files(point: tuple[Path, str]) -> Iterator[PointFiles]:
    r = Repository.open(str(point[0]), password=TEST_PASSWORD)
    with PointFiles(r.reader(r.resolve(point[1]))) as pf:
        yield pf


@pytest.mark.parametrize("part", list(PARTS))
def test_every_entry_and_file_equals_the_original(
    files: PointFiles, disk: tuple[Path, dict[bytes, F.Item]], part: str
) -> None:
    fstype = PARTS[part]
    truth = F.truth_for(fstype, disk[1])
    if fstype == "ntfs":  # ntfs-3g's Interix FIFO reads as an empty file (README Known limits)
        empty = hashlib.sha256(b"").hexdigest()
        truth = {
            k: replace(v, kind="file", sha256=empty) if v.kind == "fifo" else v
            for k, v in truth.items()
        }
    got = listing(files, "/" + part)
    if fstype == "vfat":  # TSK cuts a FAT long name at 247 characters (README Known limits)
        cut = {k: k[: k.rindex(b"/") + 248] for k in truth if len(k.rsplit(b"/", 1)[1]) > 247}
        truth = {cut.get(k, k): v for k, v in truth.items()}
    assert got == truth
    res = MTIME_RESOLUTION_NS.get(fstype, 1)
    assert {k: v.mtime_ns - v.mtime_ns % res for k, v in got.items()} == {
        k: v.mtime_ns for k, v in truth.items()
    }


def test_ls_lists_the_volumes_with_type_size_and_label(
    cli: CliRunner, point: tuple[Path, str]
) -> None:
    got = cli("-r", point[0], "ls", point[1])
    assert got.code == 0, got.err
    lines = got.out.splitlines()
    assert lines[0].split() == ["volume", "type", "size", "label", "offset"]
    assert lines[1].split()[:2] == ["/part1", "ext4"] and "comb-ext4" in lines[1]
    assert [line.split()[1] for line in lines[2:]] == ["ntfs", "fat32", "exfat"]
    doc = json.loads(cli("-r", point[0], "ls", point[1], "--json").out)
    assert [v["name"] for v in doc["volumes"]] == list(PARTS)


def test_ls_long_and_json_keep_names_that_are_not_utf8(
    cli: CliRunner, point: tuple[Path, str]
) -> None:
    got = cli("-r", point[0], "ls", point[1], "/part1/hostile", "-l")
    assert got.code == 0, got.err
    assert "bad\\xff\\xfe" in got.out  # shown escaped, one line per entry
    doc = json.loads(cli("-r", point[0], "ls", point[1], "/part1/hostile", "--json").out)
    raw = {bytes.fromhex(e["path_bytes"]) for e in doc["entries"] if "path_bytes" in e}
    assert raw == {b"/part1/hostile/bad\xff\xfe"}
    deep = cli("-r", point[0], "ls", point[1], "/part1/etc", "-R").out.splitlines()
    assert "/part1/etc/nginx/nginx.conf" in deep


def test_cat_writes_the_file_and_names_what_is_wrong(
    cli: CliRunner, point: tuple[Path, str], disk: tuple[Path, dict[bytes, F.Item]]
) -> None:
    got = cli("-r", point[0], "cat", point[1], "/part2/etc/nginx/nginx.conf")
    assert got.code == 0, got.err
    assert hashlib.sha256(got.out.encode()).hexdigest() == disk[1][b"/etc/nginx/nginx.conf"].sha256
    for path, code, words in [
        ("/part1/etc", 14, "not a regular file"),
        ("/part1/etc/nope", 14, "/part1/etc/nope: not found"),
        ("/part9/x", 14, "no such volume"),
        ("/part1/links/absolute", 14, "a symbolic link to /etc/passwd"),
    ]:
        got = cli("-r", point[0], "cat", point[1], path)
        assert got.code == code and words in got.err, (path, got)
        assert len(got.err.strip().splitlines()) == 1


def test_restore_path_rebuilds_the_tree_faithfully(
    cli: CliRunner, point: tuple[Path, str], disk: tuple[Path, dict[bytes, F.Item]], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    got = cli(
        "-r", point[0], "restore", point[1], "--path", "/part1", "--target", target, "--special"
    )
    assert got.code == 0, got.err
    restored = F.walk(target / "part1")
    restored.pop(b"/lost+found", None)
    truth = F.truth_for("ext4", disk[1])
    assert restored == truth  # kinds, sizes, SHA-256, modes, symlink targets, hard links
    assert {k: v.mtime_ns for k, v in restored.items()} == {k: v.mtime_ns for k, v in truth.items()}
    sparse = [k for k, v in truth.items() if v.size >= 64 << 20]
    for rel in sparse:  # holes stay holes
        assert os.stat(os.fsencode(target / "part1") + rel).st_blocks * 512 < 4 << 20
    assert not [p for p in target.rglob(".comb-restore-*")]


def test_restore_path_overwrite_policies(
    cli: CliRunner, point: tuple[Path, str], tmp_path: Path
) -> None:
    def restore(*more: object) -> str:
        got = cli(
            "-r",
            point[0],
            "restore",
            point[1],
            "--path",
            "/part1/etc/fstab",
            "--target",
            tmp_path,
            *more,
        )
        assert got.code == 0, got.err
        return (tmp_path / "fstab").read_text()

    original = restore()
    (tmp_path / "fstab").write_text("mine\n")
    assert restore() == "mine\n"  # never, the default
    assert restore("--overwrite", "if-newer") == "mine\n"  # ours is newer
    assert restore("--overwrite", "always") == original
    os.utime(tmp_path / "fstab", (0, 0))
    (tmp_path / "fstab").write_text("old\n")
    os.utime(tmp_path / "fstab", (0, 0))
    assert restore("--overwrite", "if-newer") == original


class _Failing(PointFiles):
    """A restore killed inside a file: the second piece of file data never comes."""

    def data(
        self, node: Node, piece: int = 4096, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        for got in super().data(node, piece, start, end):
            yield got
            raise KeyboardInterrupt


def test_a_killed_restore_leaves_no_half_file(point: tuple[Path, str], tmp_path: Path) -> None:
    r = Repository.open(str(point[0]), password=TEST_PASSWORD)
    with _Failing(r.reader(r.resolve(point[1]))) as pf:
        big = pf.lookup("/part1/home/ann/docs")
        with pytest.raises(KeyboardInterrupt):
            extract(pf, big, str(tmp_path))
    left = {p.name: p.stat().st_size for p in (tmp_path / "docs").iterdir()}
    assert not [n for n in left if n.startswith(".comb-restore-")]
    assert all(size == 0 for size in left.values())  # only the empty file got through
