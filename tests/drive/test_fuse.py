"""The FUSE virtual drive (``drive.fuse`` through ``pipeline.cli.mount_cmd``), mounted for real in a
subprocess: listing, every format judged by cmp / qemu-img against the image backed up,
read-only answers, EIO on a corrupt chunk, hostile source names, and clean unmounts on SIGTERM
and SIGINT. Skipped where /dev/fuse is missing, except in CI (CI=true), where that fails."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from combtest import (
    TEST_PASSWORD,
    Image,
    MiB,
    api_backup,
    assert_one_line_error,
    cmp_files,
    need_tool,
)
from combtest import CliResult as Res
from drivetest import qemu_compare
from fusetest import Mount, in_mount_table, need_fuse
from hypothesis import given
from hypothesis import strategies as st

from catalog.errors import UsageError
from catalog.repo import Repository

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "../evil/..\nname%2F\x00\x7f"
FILES = {"disk.img": "raw", "disk.qcow2": "qcow2", "disk.vhd": "vpc"}
FILES |= {"disk.vhdx": "vhdx", "disk.vmdk": "vmdk"}


def _unescape(entry: bytes) -> str:
    """The source name of a directory entry (README: "%" is "", any other entry that is not
    shortened percent-decodes to the name)."""
    assert b"%~" not in entry, f"{entry!r} is a shortened name"
    return "" if entry == b"%" else unquote_to_bytes(entry).decode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """Two sources: a sparse disk (holes, zeros, data, a partial last chunk) and a second
    disk under a hostile name."""
    tmp = tmp_path_factory.mktemp("fuse")
    img = Image(tmp / "disk.img", 5 * MiB + 4096 + 512)
    img.random(0, MiB, seed=1)
    img.compressible(2 * MiB + 4096, MiB, seed=2)
    img.zeros(3 * MiB + 8192, MiB)
    img.random(5 * MiB, 4096 + 512, seed=3)
    other = Image(tmp / "other.img", 3 * MiB + 512)
    other.random(MiB - 100, MiB + 700, seed=4)
    repo = Repository.init(str(tmp / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    api_backup(repo.location, img.path, name="disk")
    api_backup(repo.location, other.path, name=HOSTILE)
    return repo.location, img.path, other.path


@pytest.fixture(scope="module")
def mounted(
    backed_up: tuple[str, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mount]:
    m = Mount(backed_up[0], tmp_path_factory.mktemp("mnt") / "m")
    try:
        yield m
        code, _, err = m.stop(signal.SIGTERM)
        assert code == 0 and not in_mount_table(m.path), err
    finally:
        m.cleanup()


def _point_dir(m: Mount, source: str) -> Path:
    from drive.fuse import escape_name

    (point,) = os.listdir(m.path / os.fsdecode(escape_name(source)))
    return m.path / os.fsdecode(escape_name(source)) / point


def test_listing_and_sizes(mounted: Mount, backed_up: tuple[str, Path, Path]) -> None:
    from drive.formats.registry import builder
    from drive.fuse import escape_name

    assert sorted(os.listdir(mounted.path)) == sorted(["disk", os.fsdecode(escape_name(HOSTILE))])
    r = Repository.open(backed_up[0], password=TEST_PASSWORD)
    (point,) = [p for p in r.points() if p.source == "disk"]
    assert os.listdir(mounted.path / "disk") == [point.id]
    pdir = mounted.path / "disk" / point.id
    assert sorted(os.listdir(pdir)) == sorted([*FILES, "files"])
    source = r.reader(point)
    for name, fmt in [("disk.img", "raw"), ("disk.qcow2", "qcow2"), ("disk.vhdx", "vhdx")]:
        st = os.stat(pdir / name)
        assert st.st_size == builder(fmt)(source).size and st.st_mode & 0o222 == 0


def test_raw_is_the_disk(mounted: Mount, backed_up: tuple[str, Path, Path]) -> None:
    need_tool("cmp")
    cmp_files(_point_dir(mounted, "disk") / "disk.img", backed_up[1])
    with open(_point_dir(mounted, "disk") / "disk.img", "rb") as fh:  # random access
        fh.seek(5 * MiB + 100)
        assert fh.read(4096) == backed_up[1].read_bytes()[5 * MiB + 100 : 5 * MiB + 4196]


@pytest.mark.parametrize("name", ["disk.qcow2", "disk.vhd", "disk.vhdx", "disk.vmdk"])
def test_formats_compare(mounted: Mount, backed_up: tuple[str, Path, Path], name: str) -> None:
    qemu_compare(backed_up[1], _point_dir(mounted, "disk") / name, FILES[name])


def test_read_only(mounted: Mount) -> None:
    pdir = _point_dir(mounted, "disk")
    attempts = [
        lambda: open(pdir / "disk.img", "r+b"),
        lambda: open(pdir / "new", "wb"),
        lambda: os.mkdir(mounted.path / "d"),
        lambda: os.unlink(pdir / "disk.img"),
        lambda: os.rename(pdir / "disk.img", pdir / "x"),
        lambda: os.truncate(pdir / "disk.img", 0),
        lambda: os.chmod(pdir / "disk.img", 0o644),
        lambda: os.symlink("disk.img", pdir / "s"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert sorted(os.listdir(pdir)) == sorted([*FILES, "files"])


def test_hostile_name(mounted: Mount, backed_up: tuple[str, Path, Path]) -> None:
    names = [n for n in os.listdir(mounted.path) if n != "disk"]
    assert len(names) == 1 and "/" not in names[0] and "\n" not in names[0]
    assert _unescape(os.fsencode(names[0])) == HOSTILE
    assert not (mounted.path.parent / "evil").exists()
    cmp_files(_point_dir(mounted, HOSTILE) / "disk.img", backed_up[2])
    qemu_compare(backed_up[2], _point_dir(mounted, HOSTILE) / "disk.vhdx", "vhdx")


@given(st.text())
def test_escape_round_trip(name: str) -> None:
    from drive.fuse import escape_name

    entry = escape_name(name)
    assert b"/" not in entry and b"\0" not in entry and entry not in (b"", b".", b"..")
    assert len(entry) <= 255
    if b"%~" not in entry:
        assert _unescape(entry) == name


def test_long_names_stay_unique() -> None:
    from drive.fuse import escape_name

    a, b = escape_name("x" * 300 + "a"), escape_name("x" * 300 + "b")
    assert a != b and len(a) == len(b) == 255


def test_corrupt_chunk_is_eio(tmp_path: Path) -> None:
    img = Image(tmp_path / "disk.img", 2 * MiB)
    data = img.random(0, 2 * MiB, seed=9)
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    api_backup(repo.location, img.path, name="disk")
    packs = sorted(p for p in (tmp_path / "repo").rglob("*") if p.is_file() and "pack" in str(p))
    biggest = max(packs, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as fh:  # one flipped byte in the middle of the data
        fh.seek(biggest.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    m = Mount(repo.location, tmp_path / "mnt")
    try:
        pdir = _point_dir(m, "disk")
        with open(pdir / "disk.img", "rb") as fh, pytest.raises(OSError) as info:
            fh.read()
        assert info.value.errno == errno.EIO
        bad = 0
        with open(pdir / "disk.img", "rb") as fh:  # the drive keeps working; good chunks read
            for off in range(0, 2 * MiB, 64 * 1024):
                try:
                    assert os.pread(fh.fileno(), 64 * 1024, off) == data[off : off + 64 * 1024]
                except OSError as failed:
                    assert failed.errno == errno.EIO
                    bad += 1
        assert bad == 1 and sorted(os.listdir(pdir)) == sorted([*FILES, "files"])
        code, _, err = m.stop()
        assert code == 0 and "comb: warning: read" in err
    finally:
        m.cleanup()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_unmounts(
    backed_up: tuple[str, Path, Path], tmp_path: Path, signum: int, code: int
) -> None:
    m = Mount(backed_up[0], tmp_path / "mnt")
    try:
        with open(_point_dir(m, "disk") / "disk.vmdk", "rb") as fh:
            assert len(fh.read(MiB)) == MiB
        rc, out, err = m.stop(signum)
        assert (rc, out.strip(), err) == (code, f"unmounted {m.path}", "")
        assert not in_mount_table(m.path) and os.listdir(m.path) == []
    finally:
        m.cleanup()


def test_unmount_from_outside(backed_up: tuple[str, Path, Path], tmp_path: Path) -> None:
    m = Mount(backed_up[0], tmp_path / "mnt")
    try:
        subprocess.run(["umount", str(m.path)], check=True)
        assert m.proc.wait(timeout=20) == 0
    finally:
        m.cleanup()


def test_mountpoint_errors(
    backed_up: tuple[str, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli import mount_cmd

    repo = backed_up[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = {"missing": "does not exist", "full": "not empty", "file": "not a directory"}
    for name, needle in cases.items():
        with pytest.raises(UsageError, match=needle):
            mount_cmd.cmd_mount(
                repo, argparse.Namespace(mountpoint=str(tmp_path / name), password=TEST_PASSWORD)
            )
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(mount_cmd, "DEV_FUSE", str(tmp_path / "no-fuse"))
    with pytest.raises(UsageError, match="no-fuse is missing"):
        mount_cmd.cmd_mount(
            repo, argparse.Namespace(mountpoint=str(tmp_path / "empty"), password=TEST_PASSWORD)
        )
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-r", repo, "mount", str(tmp_path / "full")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert_one_line_error(Res(res.returncode, res.stdout, res.stderr), "not empty", code=2)


def test_open_points_are_bounded(backed_up: tuple[str, Path, Path]) -> None:
    """At most ``keep`` points stay open; sizes of released points are still known."""
    from drive.fuse_files import PointCache

    r = Repository.open(backed_up[0], password=TEST_PASSWORD)
    first, second = sorted(r.points(), key=lambda p: p.source)
    cache = PointCache(r, keep=1)
    sizes = cache.sizes(first)
    opened = cache.get(second)
    assert list(cache._open) == [second.id] and cache.sizes(first) == sizes
    assert cache.get(second) is opened and sizes["raw"][0] == first.size


def test_a_failed_request_is_eio_and_one_warning(backed_up: tuple[str, Path, Path]) -> None:
    """A request that fails is EIO for that request, said once through the ``warn`` given
    (the command line passes ``pipeline.console.warn``)."""
    need_fuse()
    import pyfuse3
    import trio

    from drive.fuse import CombFS

    said: list[str] = []
    fs = CombFS(Repository.open(backed_up[0], password=TEST_PASSWORD), warn=said.append)

    def broken() -> None:
        raise OSError(errno.EIO, "no such luck")

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(fs._blocking, "read raw at 0", broken)
    assert info.value.errno == errno.EIO and said == ["read raw at 0: [Errno 5] no such luck"]


def test_overlays_are_mounted_too(tmp_path: Path) -> None:
    """``%overlays/NAME/disk.*``: the base point with the overlay's writes on top, in every
    format; a later write shows in a file opened after it."""
    import drive.overlays.overlay as overlay
    from drive.overlays.overlay import Overlay

    img = Image(tmp_path / "base.img", 2 * MiB + 512)
    img.random(0, MiB, seed=7)
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name="base")
    overlay.create(repo, "ov1", point)
    ov = Overlay(repo, "ov1")
    want = bytearray(img.path.read_bytes())
    for off, data in [(100, b"x" * 5000), (MiB + 7, b"y" * 70_000)]:
        ov.write(off, data)
        want[off : off + len(data)] = data
    ov.flush()
    expected = tmp_path / "expected.raw"
    expected.write_bytes(want)
    m = Mount(repo.location, tmp_path / "mnt")
    try:
        folder = m.path / "%overlays" / "ov1"
        assert sorted(os.listdir(m.path)) == ["%overlays", "base"]
        assert (folder / "disk.img").read_bytes() == bytes(want)
        qemu = need_tool("qemu-img")
        for file, fmt in (("disk.qcow2", "qcow2"), ("disk.vhdx", "vhdx")):
            res = subprocess.run(
                [qemu, "compare", "-f", "raw", "-F", fmt, str(expected), str(folder / file)],
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stdout + res.stderr
        ov.write(0, b"z" * 10)  # the server side keeps writing
        ov.flush()
        time.sleep(2.2)  # past the snapshot's reuse window
        with open(folder / "disk.img", "rb") as fh:
            assert fh.read(10) == b"z" * 10
        with pytest.raises(OSError) as err:
            open(folder / "disk.img", "r+b")
        assert err.value.errno == errno.EROFS
        code, _, stderr = m.stop(signal.SIGTERM)
        assert code == 0, stderr
    finally:
        ov.close()
        m.cleanup()
