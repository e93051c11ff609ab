"""The volumes of real disk images: tables made by sfdisk, filesystems made by mkfs, and hostile
tables made by patching those images (loops, bad CRCs, absurd counts, truncation)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from combtest import MiB, need_tool
from drivetest import BytesSource

from catalog.errors import CombError, FileSystemError
from drive.files.volumes import Volume, detect, find_volumes

LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"


class FileSource:
    """A block source over an image file; counts the bytes read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._size = path.stat().st_size
        self.read_total = 0

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, buf: memoryview, offset: int) -> None:
        assert 0 <= offset and offset + len(buf) <= self._size
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, len(buf), offset)
        finally:
            os.close(fd)
        assert len(data) == len(buf)
        buf[:] = data
        self.read_total += len(buf)


def sh(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def partition(path: Path, size: int, script: str, *opts: str) -> dict[int, tuple[int, int, str]]:
    """A sparse disk of ``size`` partitioned by sfdisk; number -> (offset, size, type)."""
    need_tool("sfdisk")
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run(["sfdisk", "-q", *opts, str(path)], input=script, text=True, check=True)
    table = json.loads(sh("sfdisk", *opts, "--json", path))["partitiontable"]
    unit = table.get("sectorsize", 512)
    return {
        int(p["node"][len(str(path)) :]): (p["start"] * unit, p["size"] * unit, p["type"].lower())
        for p in table["partitions"]
    }


# kind -> (MiB, mkfs command before the image path, fstype, label, note)
FILESYSTEMS: dict[str, tuple[int, list[str], str | None, str | None, str | None]] = {
    "ext2": (8, ["mkfs.ext2", "-q", "-F", "-L", "e2label"], "ext2", "e2label", None),
    "ext3": (8, ["mkfs.ext3", "-q", "-F", "-L", "e3label"], "ext3", "e3label", None),
    "ext4": (8, ["mkfs.ext4", "-q", "-F", "-L", "rootfs"], "ext4", "rootfs", None),
    "ext-journal": (
        8,
        ["mke2fs", "-q", "-F", "-O", "journal_dev"],
        None,
        None,
        "ext journal device",
    ),
    "xfs": (300, ["mkfs.xfs", "-q", "-L", "xfsdata"], "xfs", "xfsdata", None),
    "fat12": (4, ["mkfs.vfat", "-F", "12", "-n", "SMALL"], "fat12", "SMALL", None),
    "fat16": (16, ["mkfs.vfat", "-F", "16", "-n", "BOOT"], "fat16", "BOOT", None),
    "fat32": (40, ["mkfs.vfat", "-F", "32", "-n", "EFI32"], "fat32", "EFI32", None),
    "fat-noname": (16, ["mkfs.vfat", "-F", "16"], "fat16", None, None),
    "exfat": (8, ["mkfs.exfat", "-L", "exlabel"], "exfat", None, None),
    "ntfs": (16, ["mkntfs", "-Q", "-F", "-q", "-L", "ntlabel"], "ntfs", None, None),
    "btrfs": (120, ["mkfs.btrfs", "-q", "-L", "btrlabel"], "btrfs", "btrlabel", None),
    "swap": (8, ["mkswap", "-L", "swaplabel"], None, None, "swap"),
}


@pytest.fixture(scope="module")
def make_fs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A filesystem image of a kind, made once per module."""
    made: dict[str, Path] = {}
    where = tmp_path_factory.mktemp("fs")

    def make(kind: str) -> Path:
        if kind not in made:
            mib, cmd, *_ = FILESYSTEMS[kind]
            need_tool(cmd[0])
            path = where / f"{kind}.img"
            with open(path, "wb") as fh:
                fh.truncate(mib * MiB)
            sh(*cmd, path)
            made[kind] = path
        return made[kind]

    return make


def place(image: Path, disk: Path, offset: int) -> None:
    """Copy the data runs of ``image`` into ``disk`` at ``offset`` (holes stay holes)."""
    src, dst = os.open(image, os.O_RDONLY), os.open(disk, os.O_WRONLY)
    try:
        end, pos = os.fstat(src).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(src, pos, os.SEEK_HOLE)
            while pos < stop:
                chunk = os.pread(src, min(stop - pos, 4 * MiB), pos)
                os.pwrite(dst, chunk, offset + pos)
                pos += len(chunk)
    finally:
        os.close(src)
        os.close(dst)


def patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def layout(volumes: list[Volume]) -> dict[str, tuple[int, int]]:
    return {v.name: (v.offset, v.size) for v in volumes}


# --- filesystems --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FILESYSTEMS))
def test_a_filesystem_on_the_whole_disk_is_one_disk_volume(
    make_fs: Callable[[str], Path], kind: str
) -> None:
    image = make_fs(kind)
    _, _, fstype, label, note = FILESYSTEMS[kind]
    src = FileSource(image)
    assert find_volumes(src) == [Volume("disk", 0, src.size, fstype, label, note, None)]
    assert detect(src, 0, src.size) == (fstype, label, note)
    assert src.read_total < 64 * 1024


def test_luks_is_noted_as_encrypted(tmp_path: Path) -> None:
    need_tool("cryptsetup")
    disk, key = tmp_path / "luks.img", tmp_path / "key"
    key.write_bytes(b"secret key")
    with open(disk, "wb") as fh:
        fh.truncate(32 * MiB)
    sh("cryptsetup", "luksFormat", "--batch-mode", "--pbkdf", "pbkdf2", disk, key)
    assert detect(FileSource(disk), 0, 32 * MiB) == (None, None, "LUKS encrypted")


def test_a_blank_or_unknown_disk_is_one_unknown_volume(tmp_path: Path) -> None:
    disk = tmp_path / "blank.img"
    with open(disk, "wb") as fh:
        fh.truncate(4 * MiB)
    unknown = [Volume("disk", 0, 4 * MiB, None, None, "unknown", None)]
    assert find_volumes(FileSource(disk)) == unknown
    patch(disk, 0, random.Random(1).randbytes(64 * 1024))
    assert find_volumes(FileSource(disk)) == unknown


def test_a_fat_boot_sector_is_not_taken_for_a_partition_table(
    make_fs: Callable[[str], Path], tmp_path: Path
) -> None:
    disk = tmp_path / "fat.img"
    with open(disk, "wb") as fh:
        fh.truncate(40 * MiB)
    place(make_fs("fat32"), disk, 0)
    assert read(disk, 510, 2) == b"\x55\xaa"
    # Boot code that happens to look like a partition entry.
    patch(disk, 446, struct.pack("<B3xB3xII", 0x80, 0x83, 2048, 4096))
    assert find_volumes(FileSource(disk)) == [
        Volume("disk", 0, 40 * MiB, "fat32", "EFI32", None, None)
    ]


# --- partition tables ---------------------------------------------------------------------------


def test_mbr_primaries_and_logicals(make_fs: Callable[[str], Path], tmp_path: Path) -> None:
    disk = tmp_path / "mbr.img"
    script = "label: dos\n,16M,83\n,16M,e\n,,5\n,8M,82\n,8M,7\n,,83\n"
    parts = partition(disk, 80 * MiB, script)
    assert sorted(parts) == [1, 2, 3, 5, 6, 7]
    for number, kind in [(1, "ext4"), (2, "fat16"), (5, "swap"), (6, "exfat")]:
        place(make_fs(kind), disk, parts[number][0])
    src = FileSource(disk)
    volumes = find_volumes(src)
    assert layout(volumes) == {f"part{n}": parts[n][:2] for n in (1, 2, 5, 6, 7)}
    got = {v.name: (v.fstype, v.label, v.note, v.ptype) for v in volumes}
    assert got == {
        "part1": ("ext4", "rootfs", None, "0x83"),
        "part2": ("fat16", "BOOT", None, "0x0e"),
        "part5": (None, None, "swap", "0x82"),
        "part6": ("exfat", None, None, "0x07"),
        "part7": (None, None, "empty", "0x83"),
    }
    assert src.read_total < 256 * 1024


def test_gpt_partitions(make_fs: Callable[[str], Path], tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    script = "label: gpt\n,300M,L\n,120M,L\n,16M,EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n,40M,U\n"
    parts = partition(disk, 500 * MiB, script + ",8M,S\n,8M,L\n")
    kinds = {1: "xfs", 2: "btrfs", 3: "ntfs", 4: "fat32"}
    for number, kind in kinds.items():
        place(make_fs(kind), disk, parts[number][0])
    patch(disk, parts[6][0], random.Random(6).randbytes(8192))
    src = FileSource(disk)
    volumes = find_volumes(src)
    assert layout(volumes) == {f"part{n}": parts[n][:2] for n in range(1, 7)}
    assert [(v.fstype, v.label, v.note) for v in volumes] == [
        ("xfs", "xfsdata", None),
        ("btrfs", "btrlabel", None),
        ("ntfs", None, None),
        ("fat32", "EFI32", None),
        (None, None, "empty"),
        (None, None, "unknown"),
    ]
    assert [v.ptype for v in volumes] == [parts[n][2] for n in range(1, 7)]
    assert volumes[0].ptype == LINUX and volumes[4].ptype == SWAP
    assert src.read_total < 512 * 1024


# --- hostile tables -----------------------------------------------------------------------------

MBR_SCRIPT = "label: dos\n,1M,83\n,,5\n,1M,83\n,1M,83\n,,83\n"


def test_an_ebr_chain_that_loops_terminates(tmp_path: Path) -> None:
    disk = tmp_path / "loop.img"
    parts = partition(disk, 8 * MiB, MBR_SCRIPT)
    assert sorted(parts) == [1, 2, 5, 6, 7]
    ext_lba = parts[2][0] // 512
    link = struct.unpack_from("<I", read(disk, ext_lba * 512 + 446 + 16 + 8, 4))[0]
    second_ebr = ext_lba + link  # links are relative to the extended partition
    # The second EBR's link points back at the first: part5, part6, then the loop.
    patch(disk, second_ebr * 512 + 446 + 16 + 4, bytes([0x05]))
    patch(disk, second_ebr * 512 + 446 + 16 + 8, struct.pack("<II", 0, 2048))
    assert [v.name for v in find_volumes(FileSource(disk))] == ["part1", "part5", "part6"]
    # The first EBR's link points at itself.
    patch(disk, ext_lba * 512 + 446 + 16 + 8, struct.pack("<I", 0))
    assert [v.name for v in find_volumes(FileSource(disk))] == ["part1", "part5"]


def test_a_logical_past_the_disk_end_is_left_out_and_keeps_its_number(tmp_path: Path) -> None:
    disk = tmp_path / "far.img"
    parts = partition(disk, 8 * MiB, MBR_SCRIPT)
    ext_lba = parts[2][0] // 512
    link = struct.unpack_from("<I", read(disk, ext_lba * 512 + 446 + 16 + 8, 4))[0]
    patch(disk, (ext_lba + link) * 512 + 446 + 8, struct.pack("<I", 0x7FFF_FFFF))
    volumes = find_volumes(FileSource(disk))
    assert layout(volumes) == {f"part{n}": parts[n][:2] for n in (1, 5, 7)}


def gpt_disk(tmp_path: Path) -> tuple[Path, dict[int, tuple[int, int, str]]]:
    disk = tmp_path / "gpt.img"
    return disk, partition(disk, 8 * MiB, "label: gpt\n,1M,L\n,2M,S\n,,L\n")


def reseal(disk: Path, header_lba: int) -> None:
    """Recompute the entry array CRC and the header CRC of the GPT header at ``header_lba``."""
    header = bytearray(read(disk, header_lba * 512, 512))
    entries_lba, count, esize = struct.unpack_from("<QII", header, 72)
    array = read(disk, entries_lba * 512, min(count * esize, 1 << 20))
    struct.pack_into("<I", header, 88, zlib.crc32(array))
    struct.pack_into("<I", header, 16, 0)
    size = struct.unpack_from("<I", header, 12)[0]
    struct.pack_into("<I", header, 16, zlib.crc32(header[:size]))
    patch(disk, header_lba * 512, bytes(header))


def test_a_bad_primary_gpt_header_falls_back_to_the_backup(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    expected = {f"part{n}": parts[n][:2] for n in sorted(parts)}
    patch(disk, 512 + 60, b"\xff")  # disk GUID: header CRC mismatch
    assert layout(find_volumes(FileSource(disk))) == expected
    patch(disk, 512, bytes(512))  # no header at all
    assert layout(find_volumes(FileSource(disk))) == expected


def test_a_grown_disk_finds_its_backup_header_where_the_primary_says(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    os.truncate(disk, 12 * MiB)
    patch(disk, 512 + 60, b"\xff")
    assert layout(find_volumes(FileSource(disk))) == {
        f"part{n}": parts[n][:2] for n in sorted(parts)
    }
    patch(disk, 8 * MiB - 512 + 60, b"\xff")
    with pytest.raises(FileSystemError, match=f"backup header \\(LBA {12 * MiB // 512 - 1}\\)"):
        find_volumes(FileSource(disk))


def test_a_bad_primary_entry_array_falls_back_to_the_backup(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    patch(disk, 1024 + 40, struct.pack("<Q", 999))  # part1's last LBA, CRC not updated
    assert layout(find_volumes(FileSource(disk))) == {
        f"part{n}": parts[n][:2] for n in sorted(parts)
    }


def test_both_gpt_headers_bad_is_one_line_error(tmp_path: Path) -> None:
    disk, _ = gpt_disk(tmp_path)
    last = 8 * MiB // 512 - 1
    patch(disk, 512 + 60, b"\xff")
    patch(disk, last * 512 + 60, b"\xff")
    with pytest.raises(FileSystemError) as err:
        find_volumes(FileSource(disk))
    assert "\n" not in str(err.value)
    assert str(err.value) == (
        f"GPT: primary header (LBA 1): header CRC mismatch; "
        f"backup header (LBA {last}): header CRC mismatch"
    )


def test_a_huge_entry_count_is_refused_without_allocating(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    last = 8 * MiB // 512 - 1
    patch(disk, 512 + 80, struct.pack("<I", 2**31))
    reseal(disk, 1)
    assert len(find_volumes(FileSource(disk))) == 3  # the backup
    patch(disk, last * 512 + 80, struct.pack("<I", 2**31))
    reseal(disk, last)
    tracemalloc.start()
    try:
        with pytest.raises(FileSystemError, match="2147483648 partition entries"):
            find_volumes(FileSource(disk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


@pytest.mark.parametrize("esize", [0, 64, 130, 1 << 20])
def test_a_bad_entry_size_is_refused(tmp_path: Path, esize: int) -> None:
    disk, _ = gpt_disk(tmp_path)
    for lba in (1, 8 * MiB // 512 - 1):
        patch(disk, lba * 512 + 84, struct.pack("<I", esize))
        reseal(disk, lba)
    with pytest.raises(FileSystemError, match=f"bad partition entry size {esize}"):
        find_volumes(FileSource(disk))


def test_entries_past_the_disk_end_are_clipped_or_left_out(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    patch(disk, 1024 + 128 + 40, struct.pack("<Q", 2**60))  # part2 ends far past the disk
    patch(disk, 1024 + 256 + 32, struct.pack("<QQ", 2**40, 2**40 + 5))  # part3 starts past it
    reseal(disk, 1)
    assert layout(find_volumes(FileSource(disk))) == {
        "part1": parts[1][:2],
        "part2": (parts[2][0], 8 * MiB - parts[2][0]),
    }
    patch(disk, 1024 + 32, struct.pack("<QQ", 5000, 4000))
    reseal(disk, 1)
    with pytest.raises(FileSystemError, match="GPT entry 1: first LBA 5000 is after last LBA 4000"):
        find_volumes(FileSource(disk))


def test_a_truncated_disk_keeps_what_it_still_holds(tmp_path: Path) -> None:
    disk, parts = gpt_disk(tmp_path)
    cut = parts[3][0] - MiB // 2  # inside part2, before part3; the backup header is gone
    os.truncate(disk, cut)
    assert layout(find_volumes(FileSource(disk))) == {
        "part1": parts[1][:2],
        "part2": (parts[2][0], cut - parts[2][0]),
    }
    mbr = tmp_path / "mbr.img"
    parts = partition(mbr, 8 * MiB, MBR_SCRIPT)
    os.truncate(mbr, parts[6][0] + 4096)  # part6 keeps 4 KiB; part7's EBR is gone
    assert layout(find_volumes(FileSource(mbr))) == {
        "part1": parts[1][:2],
        "part5": parts[5][:2],
        "part6": (parts[6][0], 4096),
    }


def test_random_damage_never_escapes_as_a_foreign_error(tmp_path: Path) -> None:
    disk, _ = gpt_disk(tmp_path)
    mbr = tmp_path / "mbr.img"
    partition(mbr, 8 * MiB, MBR_SCRIPT)
    rng = random.Random(7)
    for path in (disk, mbr):
        data = path.read_bytes()
        hot = [0, 446, 510, 512, 512 + 72, 1024] + [
            o + d for o in range(0, len(data), 512) if any(data[o : o + 512]) for d in (446, 454)
        ]
        for _ in range(300):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                at = rng.choice(hot) + rng.randint(0, 63)
                damaged[at : at + 4] = rng.randbytes(4)
            try:
                volumes = find_volumes(BytesSource(bytes(damaged)))
            except CombError as err:
                assert "\n" not in str(err)
                continue
            assert len(volumes) <= 4096
            assert all(
                0 <= v.offset < len(data) and v.offset + v.size <= len(data) for v in volumes
            )
