"""VHD export, fixed and dynamic: qemu and dissect.hypervisor read back the disk exactly, the
file obeys the spec (checksums, footer copy, BAT), and the dynamic file stays sparse."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from combtest import Image, need_tool
from dissect.hypervisor import vhd as dissect_vhd
from drivetest import CASES, FileSource, export, make_case, qemu_check, qemu_compare, same_through

from catalog.errors import OutputError, UsageError
from drive.formats.image import VirtualImage
from drive.formats.vhd import chs_geometry, vhd_dynamic_image, vhd_fixed_image

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 2 * MiB
STRIDE = BLOCK + 4096  # a 512-byte bitmap + 2 MiB of data, 4 KiB aligned (drive/formats/vhd.py)
KINDS: dict[str, Callable[[FileSource], VirtualImage]] = {
    "fixed": vhd_fixed_image,
    "dynamic": vhd_dynamic_image,
}


def _sum_checksum(data: bytes, at: int) -> int:
    """The spec's checksum, computed here independently of drive.formats.vhd."""
    return ~(sum(data) - sum(data[at : at + 4])) & 0xFFFFFFFF


def _touched_blocks(src: FileSource, block: int = BLOCK) -> list[int]:
    out: set[int] = set()
    for off, n in src.extents():
        out.update(range(off // block, (off + n - 1) // block + 1))
    return sorted(out)


def _check_vpc(path: Path) -> None:
    """``qemu-img check`` has no VHD checker (exit 63, "does not support checks"): that outcome
    is accepted only with that message, so a future qemu that can check will be obeyed. qemu's
    open (in ``qemu_compare``) verifies the footer checksum and that every block is in the file;
    ``_check_structure`` checks the rest."""
    try:
        qemu_check(path, "vpc")
    except AssertionError as err:
        assert "does not support checks" in str(err), err


def _check_structure(path: Path, src: FileSource, kind: str) -> None:
    file_bytes = path.stat().st_size
    with open(path, "rb") as fh:
        footer = os.pread(fh.fileno(), 512, file_bytes - 512)
        head = os.pread(fh.fileno(), 1536, 0)
    assert footer[:8] == b"conectix"
    assert _sum_checksum(footer, 64) == struct.unpack_from(">I", footer, 64)[0]
    size = -(-src.size // 512) * 512
    assert struct.unpack_from(">QQ", footer, 40) == (size, size)
    assert footer[28:32] == b"win "  # the creator qemu trusts for current_size
    disk_type = struct.unpack_from(">I", footer, 60)[0]
    if kind == "fixed":
        assert disk_type == 2 and file_bytes == size + 512
        return
    assert disk_type == 3 and head[:512] == footer
    header = head[512:]
    cookie, _, table, _, entries, block, stored = struct.unpack_from(">8sQQIIII", header)
    assert cookie == b"cxsparse" and _sum_checksum(header, 36) == stored
    assert entries == -(-size // block) and block == BLOCK
    with open(path, "rb") as fh:
        bat = struct.unpack(f">{entries}I", os.pread(fh.fileno(), 4 * entries, table))
    allocated = [i for i, e in enumerate(bat) if e != 0xFFFFFFFF]
    assert allocated == _touched_blocks(src)
    # Every block (bitmap + data) lies after the BAT, before the footer, overlapping no other.
    at = table + -(-4 * entries // 512) * 512
    for lo in sorted(bat[i] * 512 for i in allocated):
        assert at <= lo
        at = lo + 512 + block
    assert at <= file_bytes - 512


def _qemu_allocated(path: Path) -> list[tuple[int, int]]:
    """The disk ranges qemu reports as holding data (allocated blocks), adjacent ones merged."""
    res = subprocess.run(
        [need_tool("qemu-img"), "map", "--output", "json", "-f", "vpc", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return _merge(
        [(r["start"], r["start"] + r["length"]) for r in json.loads(res.stdout) if r["data"]]
    )


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [lo, hi) ranges with touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_vhd_export_reads_back_identical_and_sparse(tmp_path: Path, case: str, kind: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(KINDS[kind](src), tmp_path / f"out-{kind}.vhd")
    _check_vpc(out)
    qemu_compare(raw, out, "vpc")  # also: qemu-img info gives exactly the raw disk's size
    same_through(lambda fh: dissect_vhd.VHD(fh), raw, out)
    _check_structure(out, src, kind)
    # Holes stay holes: what the file occupies is the disk's data plus a little metadata.
    assert os.stat(out).st_blocks * 512 <= os.stat(raw).st_blocks * 512 + MiB
    if kind == "dynamic":
        touched = _touched_blocks(src)
        assert out.stat().st_size <= len(touched) * STRIDE + 64 * 1024
        want = [(b * BLOCK, min(src.size, (b + 1) * BLOCK)) for b in touched]
        assert _qemu_allocated(out) == _merge(want)  # qemu sees exactly those blocks allocated
    if case == "over-4g" and kind == "dynamic":
        assert out.stat().st_size < src.size // 500  # 4 blocks of a 5 GiB disk
    src.close()


def _unaligned_disk(tmp_path: Path) -> tuple[Path, FileSource]:
    """A disk of 1 MiB + 700 bytes with data in its first and last (partial) sectors."""
    raw = tmp_path / "unaligned.raw"
    with open(raw, "wb") as fh:
        fh.truncate(MiB + 700)
        fh.write(b"head" * 128)
        fh.seek(MiB + 700 - 300)
        fh.write(b"tail" * 75)
    return raw, FileSource(str(raw), granularity=4096)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_disk_not_a_sector_multiple_is_rounded_up_with_zeros(tmp_path: Path, kind: str) -> None:
    """VHD sizes are whole sectors (qemu takes current_size // 512): the export rounds up, so
    the virtual size is the disk's size rounded up to 512 and the extra bytes are zeros."""
    raw, src = _unaligned_disk(tmp_path)
    out = export(KINDS[kind](src), tmp_path / "out.vhd")
    qemu = need_tool("qemu-img")
    cmp = subprocess.run(
        [qemu, "compare", "-f", "raw", "-F", "vpc", str(raw), str(out)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0 and "identical" in cmp.stdout, cmp.stdout + cmp.stderr
    info = subprocess.run(
        [qemu, "info", "--output", "json", "-f", "vpc", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == MiB + 1024
    with open(out, "rb") as fh:
        disk = dissect_vhd.VHD(fh)
        assert disk.read(MiB + 1024) == raw.read_bytes() + bytes(324)
    src.close()


def test_random_reads_match_the_exported_file(tmp_path: Path) -> None:
    _raw, src = make_case(tmp_path, "odd-size")
    for kind, build in KINDS.items():
        img = build(src)
        data = export(img, tmp_path / f"{kind}.vhd").read_bytes()
        assert img.size == len(data)
        ends = [len(data) - 512, len(data) - 100, len(data) + 10]
        # Footer copy, header, BAT, a bitmap and its data, a gap inside a block, block edges.
        starts = [0, 500, 1536, 4096 - 512 - 7, MiB + 8192 - 5, 3 * MiB + 100, 2 * MiB - 3, *ends]
        for off in starts:
            for n in (1, 700, 3 * MiB):
                assert img.read(off, n) == data[off : off + n], (kind, off, n)
    src.close()


def test_fixed_inputs_give_identical_bytes_and_their_time_stamp(tmp_path: Path) -> None:
    _raw, src = make_case(tmp_path, "sparse-mixed")
    created_s, disk_id = 1_700_000_000, uuid.UUID(int=42)
    for build in (vhd_fixed_image, vhd_dynamic_image):
        a = build(src, created_s=created_s, unique_id=disk_id)
        b = build(src, created_s=created_s, unique_id=disk_id)
        footer = a.read(a.size - 512, 512)
        assert footer == b.read(b.size - 512, 512)
        assert struct.unpack_from(">I", footer, 24)[0] == created_s - 946_684_800
        assert footer[68:84] == disk_id.bytes
    assert vhd_fixed_image(src).read(0, 0) == b""  # defaults build too
    src.close()


def _fields(data: bytes, layout: str, names: str) -> dict[str, Any]:
    """Big-endian fields by the spec's table (``layout`` as for struct, ``names`` in order)."""
    return dict(zip(names.split(), struct.unpack(">" + layout, data), strict=True))


_FOOTER_FIELDS = (
    "8sIIQI4sI4sQQHBBII16sB427s",
    "cookie features version data_offset time_stamp "
    "creator_app creator_version creator_os original_size current_size cylinders heads "
    "sectors_per_track disk_type checksum unique_id saved_state reserved",
)
_DYNAMIC_FIELDS = (
    "8sQQIIII16sII512s192s256s",
    "cookie data_offset table_offset version "
    "max_table_entries block_size checksum parent_id parent_time_stamp reserved1 parent_name "
    "parent_locators reserved2",
)


@pytest.mark.parametrize(
    # sizes and their CHS geometry worked out by hand from the spec's appendix
    ("size", "chs"),
    [
        (MiB + 700, (30, 4, 17)),  # 2050 sectors: 17 per track, 4 heads
        (33 * MiB + 12_800, (994, 4, 17)),  # 67609 sectors
        (5 * GiB + 3 * MiB, (10408, 16, 63)),  # past 17 and 31 sectors per track
    ],
)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_footer_and_header_field_is_the_specs(
    tmp_path: Path, kind: str, size: int, chs: tuple[int, int, int]
) -> None:
    """Every field of both footers and of the dynamic disk header, reserved bytes included,
    from the spec's tables and the disk's size (not from drive.formats.vhd)."""
    disk_file = Image(tmp_path / "d.raw", size)
    disk_file.random(0, 4096)
    src = FileSource(str(disk_file.path))
    stamp, disk_id = 1_700_000_000.7, uuid.UUID("0123456789abcdef0123456789abcdef")
    if kind == "fixed":
        img = vhd_fixed_image(src, created_s=stamp, unique_id=disk_id)
    else:
        img = vhd_dynamic_image(src, created_s=stamp, unique_id=disk_id)
    disk = -(-size // 512) * 512
    footer = img.read(img.size - 512, 512)
    want = dict(cookie=b"conectix", features=2, version=0x0001_0000, time_stamp=753_315_200)
    want.update(creator_app=b"win ", creator_version=0x000A_0000, creator_os=b"Wi2k")
    want.update(original_size=disk, current_size=disk, cylinders=chs[0], heads=chs[1])
    want.update(sectors_per_track=chs[2], checksum=_sum_checksum(footer, 64))
    want.update(unique_id=disk_id.bytes, saved_state=0, reserved=bytes(427))
    if kind == "fixed":
        want.update(data_offset=0xFFFF_FFFF_FFFF_FFFF, disk_type=2)
        assert _fields(footer, *_FOOTER_FIELDS) == want and img.size == disk + 512
        return
    want.update(data_offset=512, disk_type=3)  # the dynamic header follows the footer copy
    assert _fields(footer, *_FOOTER_FIELDS) == want and img.read(0, 512) == footer
    header = img.read(512, 1024)
    entries = -(-disk // BLOCK)
    assert _fields(header, *_DYNAMIC_FIELDS) == dict(
        cookie=b"cxsparse",
        data_offset=0xFFFF_FFFF_FFFF_FFFF,
        table_offset=512 + 1024,  # the BAT follows the header
        version=0x0001_0000,
        max_table_entries=entries,
        block_size=BLOCK,
        checksum=_sum_checksum(header, 36),
        parent_id=bytes(16),
        parent_time_stamp=0,
        reserved1=0,
        parent_name=bytes(512),
        parent_locators=bytes(192),
        reserved2=bytes(256),
    )
    src.close()


def test_chs_geometry_follows_the_spec_appendix() -> None:
    assert chs_geometry(64 * MiB // 512) == (963, 8, 17)
    assert chs_geometry(GiB // 512) == (2080, 16, 63)
    assert chs_geometry(200 * GiB // 512) == (65535, 16, 255)  # capped at ~127 GB
    # The CHS size rounds down: read from geometry, "odd-size" would lose 8704 bytes. That is
    # why the creator application is one qemu trusts for current_size.
    size = CASES["odd-size"][0]
    c, h, s = chs_geometry(size // 512)
    assert size - c * h * s * 512 == 8704


def test_other_block_sizes_and_bad_ones(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "sparse-mixed")
    for block in (4096, 512 * 1024):
        out = export(vhd_dynamic_image(src, block), tmp_path / f"b{block}.vhd")
        qemu_compare(raw, out, "vpc")
        same_through(lambda fh: dissect_vhd.VHD(fh), raw, out)
    for bad in (256, 3000, 1 << 32):
        with pytest.raises(UsageError):
            vhd_dynamic_image(src, bad)
    src.close()


class _HugeSource:
    size = 2041 * GiB
    granularity = 65536

    def extents(self) -> list[tuple[int, int]]:
        return []

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))


def test_disks_larger_than_vhd_allows_are_refused() -> None:
    for build in (vhd_fixed_image, vhd_dynamic_image):
        with pytest.raises(OutputError, match="larger than VHD allows"):
            build(_HugeSource())
