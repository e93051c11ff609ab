"""VMDK export, monolithicSparse and streamOptimized: qemu-img check and compare, read back
through dissect.hypervisor's independent VMDK reader, sparse (and compressed), header and
descriptor fields as the spec lays them out, a stream read front to back as an importer does,
sizes that are not a multiple of 512, and random reads of the images."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from combtest import Image, need_tool
from dissect.hypervisor.disk import vmdk  # a test dependency: never skipped
from drivetest import (
    CASES,
    FileSource,
    MiB,
    export,
    make_case,
    qemu_check,
    qemu_compare,
    same_through,
)

from catalog.errors import OutputError, SourceError
from catalog.read.source import MappedSource
from drive.formats.image import VirtualImage
from drive.formats.vmdk import vmdk_image, vmdk_stream_image

SECTOR = 512
GRAIN = 64 * 1024
GiB = 1 << 30
TiB = 1 << 40


def _dissect_open(fh: object) -> object:
    disk = vmdk.VMDK(fh)
    # dissect's buffered reads run past the end of a disk whose size is not a multiple of its
    # 8 KiB buffer (an IndexError on qemu-img's own VMDKs too): read in sectors instead.
    disk.align = SECTOR
    return disk


def _header(data: bytes) -> dict[str, Any]:
    """The SparseExtentHeader at the start of ``data``, decoded here from the spec's field
    table (not the module's)."""
    h = data[:SECTOR]
    names = "version flags capacity grain desc_off desc_size gtes rgd gd overhead".split()
    values = struct.unpack_from("<IIQQQQIQQQ", h, 4)
    out: dict[str, Any] = dict(zip(names, values, strict=True))
    # uncleanShutdown, then the four newline-detection characters, then compressAlgorithm.
    out.update(magic=h[:4], unclean=h[72], newline=h[73:77], compress=h[77] | h[78] << 8)
    out.update(pad=h[79:])  # 433 bytes of padding to the sector
    return out


def _spec_header(size: int, stream: bool) -> dict[str, Any]:
    """Every SparseExtentHeader field of a ``size``-byte disk's VMDK, derived here from VMware's
    "Virtual Disk Format 5.0" and the layout VMware and qemu-img write (a 20-sector embedded
    descriptor right after the header, then the redundant directory and its tables, then the
    directory and its tables, then the grains from a grain boundary), not from the module."""
    capacity = -(-size // SECTOR)
    tables = -(-capacity // (512 * 128))  # grain tables of 512 entries of 128-sector grains
    dir_sectors, table_sectors = -(-tables * 4 // SECTOR), 512 * 4 // SECTOR
    common = dict(magic=b"KDMV", capacity=capacity, grain=128, desc_off=1, desc_size=20)
    common.update(gtes=512, unclean=0, newline=b"\n \r\n", pad=bytes(433))
    if stream:  # compressed grains (bit 16) behind markers (bit 17); one directory, at the end
        flags, gd_at_end = 1 | 1 << 16 | 1 << 17, 0xFFFF_FFFF_FFFF_FFFF
        return dict(common, version=3, flags=flags, rgd=0, gd=gd_at_end, overhead=128, compress=1)
    rgd = 1 + 20
    gd = rgd + dir_sectors + tables * table_sectors
    overhead = -(-(gd + dir_sectors + tables * table_sectors) // 128) * 128
    return dict(common, version=1, flags=0b11, rgd=rgd, gd=gd, overhead=overhead, compress=0)


def _overhead(path: Path) -> int:
    with open(path, "rb") as fh:
        return int(_header(fh.read(SECTOR))["overhead"]) * SECTOR


def _grains_of(src: FileSource) -> set[int]:
    return {g for o, n in src.extents() for g in range(o // GRAIN, -(-(o + n) // GRAIN))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmdk_export_is_clean_identical_and_sparse(tmp_path: Path, case: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(vmdk_image(src), tmp_path / "out.vmdk")
    qemu_check(out, "vmdk")
    qemu_compare(raw, out, "vmdk")
    same_through(_dissect_open, raw, out)
    # Exactly the grains overlapping the data follow the metadata; the rest are holes.
    overhead = _overhead(out)
    assert out.stat().st_size == overhead + len(_grains_of(src)) * GRAIN
    data_bytes = sum(n for _, n in src.extents())
    assert os.stat(out).st_blocks * 512 <= data_bytes + 2 * MiB
    if case == "over-4g":
        assert out.stat().st_size < src.size // 512
    src.close()


def test_header_and_descriptor_follow_the_spec(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "odd-size")
    out = export(vmdk_image(src, cid=0x1234ABCD), tmp_path / "out.vmdk")
    h = _header(out.read_bytes())
    capacity = src.size // SECTOR
    assert h == _spec_header(src.size, stream=False)
    # The redundant directory and its tables say the same as the primary ones.
    data = out.read_bytes()
    tables = -(-capacity // (512 * 128))

    def gts(gd_sector: int) -> list[bytes]:
        entries = struct.unpack_from(f"<{tables}I", data, gd_sector * SECTOR)
        return [data[e * SECTOR : e * SECTOR + 2048] for e in entries]

    assert h["rgd"] != h["gd"] and gts(h["rgd"]) == gts(h["gd"])
    with open(out, "rb") as fh:
        desc = vmdk.SparseDisk(fh).descriptor
    assert desc.attr["createType"] == "monolithicSparse"
    assert (desc.attr["CID"], desc.attr["parentCID"]) == ("1234abcd", "ffffffff")
    [extent] = desc.extents
    assert (extent.access_mode, extent.sectors, extent.type) == ("RW", capacity, "SPARSE")
    assert desc.ddb["ddb.adapterType"] == "lsilogic"
    assert (desc.ddb["ddb.geometry.heads"], desc.ddb["ddb.geometry.sectors"]) == ("255", "63")
    assert desc.ddb["ddb.geometry.cylinders"] == str(capacity // (255 * 63))
    info = subprocess.run(
        [need_tool("qemu-img"), "info", "--output", "json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    vmdk_info = json.loads(info.stdout)["format-specific"]["data"]
    assert vmdk_info["create-type"] == "monolithicSparse" and vmdk_info["cid"] == 0x1234ABCD
    src.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("size", [MiB + 1000, 33 * MiB + 12_800, 9 * GiB + 5 * SECTOR + 17])
def test_every_header_field_is_the_specs(tmp_path: Path, size: int, stream: bool) -> None:
    """The whole header sector (padding included), the descriptor's place and, for
    monolithicSparse, both directories; for streamOptimized also the footer, whose gdOffset
    is the directory in front of the footer's marker, footer and end-of-stream marker. The
    9 GiB disk has a directory of 3 sectors."""
    disk = Image(tmp_path / "d.raw", size)
    disk.random(0, 3 * GRAIN)
    disk.random(size - 700, 700)  # in the last, partial grain
    src = FileSource(str(disk.path))
    img = (vmdk_stream_image if stream else vmdk_image)(src)
    want = _spec_header(size, stream)
    assert _header(img.read(0, SECTOR)) == want
    descriptor = img.read(SECTOR, 20 * SECTOR)
    text = descriptor.rstrip(b"\0")
    assert text.startswith(b"# Disk DescriptorFile\n") and b"\0" not in text
    tables = -(-want["capacity"] // (512 * 128))
    dir_sectors = -(-tables * 4 // SECTOR)
    if stream:
        assert img.read(21 * SECTOR, (128 - 21) * SECTOR) == bytes((128 - 21) * SECTOR)
        tail = img.read(img.size - 3 * SECTOR, 3 * SECTOR)
        assert struct.unpack_from("<QII", tail) == (1, 0, 3)  # the footer's marker
        assert tail[2 * SECTOR :] == bytes(SECTOR)  # end-of-stream: a zero marker
        gd = img.size // SECTOR - 3 - dir_sectors
        assert struct.unpack_from("<QII", img.read((gd - 1) * SECTOR, 16)) == (dir_sectors, 0, 2)
        assert _header(tail[SECTOR : 2 * SECTOR]) == dict(want, gd=gd)
    else:
        for at in (want["rgd"], want["gd"]):
            entries = struct.unpack(f"<{tables}I", img.read(at * SECTOR, 4 * tables))
            assert list(entries) == [at + dir_sectors + 4 * i for i in range(tables)]
    src.close()


@pytest.mark.parametrize("build", [vmdk_image, vmdk_stream_image])
def test_size_not_a_multiple_of_512_is_rounded_up_with_zeros(
    tmp_path: Path, build: Callable[[MappedSource], VirtualImage]
) -> None:
    size = MiB + 1000
    raw = tmp_path / "odd.raw"
    with open(raw, "wb") as fh:
        fh.truncate(size)
        fh.write(b"head" * 1024)
        fh.seek(size - 3000)
        fh.write(os.urandom(3000))
    src = FileSource(str(raw))
    out = export(build(src), tmp_path / "out.vmdk")
    rounded = -(-size // SECTOR) * SECTOR
    assert _header(out.read_bytes())["capacity"] == rounded // SECTOR == 2050
    qemu_check(out, "vmdk")
    # The VMDK's disk is the source padded with zeros to a whole sector; compare with that.
    padded = tmp_path / "padded.raw"
    shutil.copyfile(raw, padded)
    os.truncate(padded, rounded)
    qemu_compare(padded, out, "vmdk")
    same_through(_dissect_open, padded, out)
    src.close()


def test_random_reads_match_the_exported_file(tmp_path: Path) -> None:
    _, src = make_case(tmp_path, "sparse-mixed")
    img = vmdk_image(src)
    data = export(img, tmp_path / "out.vmdk").read_bytes()
    assert img.size == len(data)
    overhead = _overhead(tmp_path / "out.vmdk")
    spots = [
        (0, 600),
        (511, 2),
        (SECTOR * 21, 5000),
        (overhead - 10, 20),
        (overhead + 12345, 3 * MiB),
    ]
    spots += [(overhead + 48 * GRAIN - 7, GRAIN + 14), (len(data) - 100, 500), (len(data) + 9, 5)]
    for off, n in spots:
        assert img.read(off, n) == data[off : off + n], (off, n)
    src.close()


def test_default_cid_is_stable_and_adapter_type_sets_geometry(tmp_path: Path) -> None:
    _, src = make_case(tmp_path, "sparse-mixed")
    first, again = vmdk_image(src), vmdk_image(src)
    assert first.read(0, 11 * SECTOR) == again.read(0, 11 * SECTOR)
    desc = vmdk_image(src, adapter_type="ide").read(SECTOR, 20 * SECTOR)
    assert b'ddb.adapterType = "ide"' in desc and b'ddb.geometry.heads = "16"' in desc
    with pytest.raises(ValueError):
        vmdk_image(src, adapter_type="scsi")
    src.close()


class _HugeSource:
    """A disk claiming more data than 32-bit grain offsets can address."""

    size = 3 * TiB
    granularity = 65536

    def extents(self) -> list[tuple[int, int]]:
        return [(0, 2 * TiB), (3 * TiB - GRAIN, GRAIN)]

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))


def test_a_file_past_2_tib_is_refused() -> None:
    with pytest.raises(OutputError, match="2 TiB"):
        vmdk_image(_HugeSource())


# streamOptimized


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_export_is_clean_identical_and_compressed(tmp_path: Path, case: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(vmdk_stream_image(src), tmp_path / "out.vmdk")
    qemu_check(out, "vmdk")
    qemu_compare(raw, out, "vmdk")
    same_through(_dissect_open, raw, out)
    # Smaller than the same grains stored whole: a quarter of the test data compresses.
    assert out.stat().st_size <= 0.8 * len(_grains_of(src)) * GRAIN + MiB
    assert os.stat(out).st_blocks * 512 <= out.stat().st_size + MiB
    src.close()


def _walk(data: bytes) -> tuple[dict[int, bytes], list[int], dict[str, Any], int]:
    """Read a streamOptimized file front to back, as a streaming importer does: from overHead,
    grain markers (disk sector, length, zlib stream, padding to a sector) until the metadata
    markers (sectors that follow, 0, type); the stream must end exactly at the end-of-stream
    marker. Returns the grains by disk sector, the marker types, the footer and the sector of
    the grain directory."""
    pos, grains, kinds = _header(data)["overhead"] * SECTOR, {}, []
    footer: dict[str, Any] = {}
    gd_sector = -1
    while True:
        value, size = struct.unpack_from("<QI", data, pos)
        if size:
            stream = data[pos + 12 : pos + 12 + size]
            assert stream[0] & 0x0F == 8 and int.from_bytes(stream[:2], "big") % 31 == 0
            grains[value] = zlib.decompress(stream)  # a zlib stream (RFC 1950), not raw deflate
            pos += -(-(12 + size) // SECTOR) * SECTOR
            continue
        kinds.append(struct.unpack_from("<I", data, pos + 12)[0])
        if kinds[-1] == 2:
            gd_sector = pos // SECTOR + 1
        if kinds[-1] == 3:
            footer = _header(data[pos + SECTOR :])
        pos += SECTOR + value * SECTOR
        if kinds[-1] == 0:
            assert pos == len(data) and data[pos - SECTOR :] == bytes(SECTOR)
            return grains, kinds, footer, gd_sector


def test_stream_reads_front_to_back_and_skips_zero_grains(tmp_path: Path) -> None:
    size = 40 * MiB + 1024  # two grain tables, the last grain partial
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(GRAIN) + bytes(GRAIN) + b"comb" * (GRAIN // 4))  # zeros written
        fh.seek(33 * MiB)
        fh.write(os.urandom(5000))
        fh.seek(size - 700)
        fh.write(os.urandom(700))
    src = FileSource(str(raw))
    out = export(vmdk_stream_image(src, cid=7), tmp_path / "out.vmdk")
    qemu_check(out, "vmdk")
    qemu_compare(raw, out, "vmdk")
    data, disk = out.read_bytes(), raw.read_bytes().ljust(2 * size, b"\0")
    h = _header(data)
    assert h == _spec_header(size, stream=True)
    assert b'createType="streamOptimized"' in data[SECTOR : 21 * SECTOR]
    grains, kinds, footer, gd_sector = _walk(data)
    # The explicitly written zero grain is in the extents but not in the file.
    assert sorted(grains) == [0, 256, 33 * 2048, 40 * 2048]
    for sector, grain in grains.items():
        assert grain == disk[sector * SECTOR : sector * SECTOR + GRAIN]
    assert kinds == [1, 1, 2, 3, 0]
    assert footer["gd"] == gd_sector and dict(footer, gd=0) == dict(h, gd=0)
    src.close()


def test_stream_random_reads_match_and_a_changed_source_is_caught(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "sparse-mixed")
    img = vmdk_stream_image(src)
    data = export(img, tmp_path / "out.vmdk").read_bytes()
    assert img.size == len(data)
    spots = [(0, 600), (GRAIN - 5, 10), (GRAIN + 70_000, 200_000), (len(data) // 2, 3 * MiB)]
    spots += [(len(data) - 3000, 2000), (len(data) - 100, 500), (len(data) + 9, 5)]
    for off, n in spots:
        assert img.read(off, n) == data[off : off + n], (off, n)
    # The layout holds each grain's compressed length: a grain that changed since cannot fit.
    fresh = vmdk_stream_image(src)
    with open(raw, "r+b") as fh:
        fh.write(os.urandom(GRAIN))
    with pytest.raises(SourceError, match="changed"):
        fresh.read(GRAIN, SECTOR)
    src.close()
