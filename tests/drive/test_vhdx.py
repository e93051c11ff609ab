"""VHDX export: every conformance case through qemu-img and dissect.hypervisor, the structures'
checksums and alignment checked independently, sizes that are not whole sectors, and random
reads of the generated image against the exported file."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import uuid
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from combtest import need_tool
from dissect.hypervisor.disk.vhdx import VHDX
from dissect.util.hash.crc32c import crc32c as reference_crc32c
from drivetest import CASES, FileSource, export, make_case, qemu_check, qemu_compare, same_through

from catalog.errors import OutputError, UsageError
from drive.formats.vhdx import (
    BAT_OFFSET_BYTES,
    MAX_DISK_BYTES,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_ZERO,
    SB_BLOCK_NOT_PRESENT,
    crc32c,
    geometry,
    vhdx_image,
)

MiB = 1 << 20
GiB = 1 << 30


def test_crc32c_known_answer() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = random.Random(7).randbytes(5000)
    assert crc32c(data) == reference_crc32c(data)  # an independent implementation


@pytest.mark.parametrize("case", sorted(CASES))
def test_vhdx_export_conforms(tmp_path: Path, case: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(vhdx_image(src), tmp_path / "out.vhdx")
    qemu_check(out, "vhdx")
    qemu_compare(raw, out, "vhdx")
    same_through(VHDX, raw, out)
    _check_structures(out)
    # Sparse: only the extents and a few small tables are written.
    assert os.stat(out).st_blocks * 512 <= os.stat(raw).st_blocks * 512 + MiB
    if case == "over-4g":
        assert os.stat(out).st_size < CASES[case][0] // 20


@pytest.mark.parametrize("block_bytes", [MiB, 256 * MiB])
def test_chunk_ratio_interleaving(tmp_path: Path, block_bytes: int) -> None:
    """Sector bitmap entries sit between chunks of payload entries: 1 MiB blocks put one right
    at 4 GiB (a chunk ratio of 4096), 256 MiB blocks one after every 16 blocks. qemu and
    dissect read windows around every data run and chunk boundary (a full 5 GiB compare per
    block size would cost seconds; the 32 MiB case above does one)."""
    raw, src = make_case(tmp_path, "over-4g")
    out = export(vhdx_image(src, block_bytes), tmp_path / "out.vhdx")
    qemu_check(out, "vhdx")
    _check_structures(out)
    geo = geometry(src.size, block_bytes)
    assert geo.chunk_ratio == (4 * GiB) // block_bytes
    windows_mib = [0, 2048, 4095, 5119, 5120]  # 3 MiB each: data, zeros, 4 GiB, the tail
    with open(out, "rb") as fh, open(raw, "rb") as want:
        disk = VHDX(fh)
        present = {b for b in range(geo.data_blocks) if disk.bat.pb(b).state != PAYLOAD_BLOCK_ZERO}
        bs = block_bytes
        want_present = {
            b for o, n in CASES["over-4g"][1] for b in range(o // bs, (o + n - 1) // bs + 1)
        }
        assert present == want_present
        # Data on both sides of 4 GiB: with 1 MiB blocks, payload entries 4095 and 4097 with
        # the sector bitmap entry 4096 between them.
        assert {(4 * GiB - 1) // bs, 4 * GiB // bs} <= present
        assert disk.bat.sb(0).state == SB_BLOCK_NOT_PRESENT
        for at_mib in windows_mib:
            want.seek(at_mib * MiB)
            expected = want.read(3 * MiB)
            assert _dissect_window(disk, at_mib * MiB, 3 * MiB, bs) == expected, at_mib
            assert _qemu_window(out, at_mib, 3, tmp_path) == expected, at_mib


def _dissect_window(disk: VHDX, at: int, length: int, block_bytes: int) -> bytes:
    """``length`` bytes from ``at`` through dissect, one payload block at a time: dissect
    3.21 misreads a single read that starts inside one block and ends in the next (it takes
    the whole read from the first block; qemu reads the same range right)."""
    out = b""
    while length > 0:
        n = min(length, block_bytes - at % block_bytes)
        disk.seek(at)
        out += disk.read(n)
        at, length = at + n, length - n
    return out


def _qemu_window(image: Path, at_mib: int, count_mib: int, tmp: Path) -> bytes:
    """``count_mib`` MiB of the VHDX's disk from ``at_mib`` MiB, as qemu reads them (a raw
    layer with an offset and size over the vhdx driver)."""
    qemu = need_tool("qemu-img")
    window = tmp / f"window-{at_mib}.raw"
    spec = f"driver=raw,offset={at_mib * MiB},size={count_mib * MiB},file.driver=vhdx"
    spec += f",file.file.filename={image}"
    cmd = [qemu, "convert", "--image-opts", spec, "-O", "raw", str(window)]
    subprocess.run(cmd, check=True, capture_output=True)
    return window.read_bytes()


def _check_structures(path: Path) -> None:
    """What qemu and dissect forgive: both headers' and both region tables' CRC-32C (qemu
    settles for one good copy), and every region and present block on a 1 MiB boundary."""
    with open(path, "rb") as fh:
        data = fh.read(BAT_OFFSET_BYTES)
        for at, length in [(64 << 10, 4096), (128 << 10, 4096), (192 << 10, 64 << 10)]:
            block = bytearray(data[at : at + length])
            stored = struct.unpack_from("<I", block, 4)[0]
            block[4:8] = bytes(4)
            assert stored == reference_crc32c(bytes(block)), f"bad checksum at {at}"
        assert data[192 << 10 : 256 << 10] == data[256 << 10 : 320 << 10]
        log_length, log_offset = struct.unpack_from("<IQ", data, (64 << 10) + 68)
        assert log_offset % MiB == 0 and log_length % MiB == 0 and log_offset >= MiB
        assert data[(64 << 10) + 48 : (64 << 10) + 64] == bytes(16)  # LogGuid: nothing to replay
        fh.seek(0)
        disk = VHDX(fh)
        for entry in disk.region_table.entries:
            assert entry.file_offset % MiB == 0 and entry.length % MiB == 0
        count = disk.bat.entry_count
        fh.seek(disk.bat.offset)
        bat = struct.unpack(f"<{count}Q", fh.read(8 * count))
        size = os.fstat(fh.fileno()).st_size
    for index, entry in enumerate(bat):
        state, offset = entry & 7, entry >> 20 << 20
        if (index + 1) % (disk._chunk_ratio + 1) == 0:
            assert entry == SB_BLOCK_NOT_PRESENT, index
        elif state == PAYLOAD_BLOCK_FULLY_PRESENT:
            assert offset >= BAT_OFFSET_BYTES + MiB and offset + disk.block_size <= size
        else:
            assert entry == PAYLOAD_BLOCK_ZERO, index


def _le(data: bytes, layout: str, names: str) -> dict[str, Any]:
    """Little-endian fields by the spec's table (``layout`` as for struct, ``names`` in order)."""
    return dict(zip(names.split(), struct.unpack("<" + layout, data), strict=True))


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le  # [MS-VHDX] GUIDs are stored as Windows writes them


def _crc(block: bytes) -> int:
    return reference_crc32c(block[:4] + bytes(4) + block[8:])


@pytest.mark.parametrize(
    ("size", "block_bytes"),
    [(33 * MiB + 12_800, 32 * MiB), (5 * GiB + 3 * MiB, MiB), (200 * GiB + 512, MiB)],
)
def test_every_structure_field_is_the_specs(size: int, block_bytes: int) -> None:
    """Every field of the file type identifier, both headers, both region tables and the
    metadata table and items ([MS-VHDX] 2.2), reserved bytes included, from the spec and the
    disk's size (not drive.formats.vhdx). The 200 GiB disk's BAT takes 2 MiB."""
    disk_id = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    img = vhdx_image(_Sized(size), block_bytes, disk_id=disk_id)
    head = img.read(0, 3 * MiB + 64 * 1024)
    assert head[:8] == b"vhdxfile" and head[520 : 64 << 10] == bytes((64 << 10) - 520)
    assert head[8:520].decode("utf-16-le").rstrip("\0").isprintable()  # the creator
    names = "signature checksum sequence file_write data_write log_guid log_version version "
    headers = [
        _le(head[at : at + 4096], "4sIQ16s16s16sHHIQ4016s", names + "log_length log_offset rest")
        for at in (64 << 10, 128 << 10)
    ]
    for at, h in zip((64 << 10, 128 << 10), headers, strict=True):
        assert h == dict(
            headers[0],
            signature=b"head",
            checksum=_crc(head[at : at + 4096]),
            sequence=h["sequence"],
            log_guid=bytes(16),  # no log to replay
            log_version=0,
            version=1,
            log_length=MiB,
            log_offset=MiB,
            rest=bytes(4016),
        )
        assert h["file_write"] != bytes(16) and h["data_write"] != bytes(16)
        assert head[at + 4096 : at + (64 << 10)] == bytes((64 << 10) - 4096)
    assert headers[1]["sequence"] == headers[0]["sequence"] + 1  # header 2 is the current one
    assert head[MiB : 2 * MiB] == bytes(MiB)  # the log region: empty
    chunk_ratio = (1 << 23) * 512 // block_bytes
    disk = -(-size // 512) * 512  # whole logical sectors
    blocks = -(-disk // block_bytes)
    bat_entries = blocks + (blocks - 1) // chunk_ratio  # dynamic: no last partial chunk's bitmap
    table = head[192 << 10 : 256 << 10]
    assert head[256 << 10 : 320 << 10] == table
    region = "guid offset length required"
    assert _le(table[:16], "4sIII", "signature checksum count reserved") == dict(
        signature=b"regi", checksum=_crc(table), count=2, reserved=0
    )
    assert [_le(table[at : at + 32], "16sQII", region) for at in (16, 48)] == [
        dict(
            guid=_guid("2DC27766-F623-4200-9D64-115E9BFD4A08"),  # BAT
            offset=3 * MiB,
            length=-(-bat_entries * 8 // MiB) * MiB,
            required=1,
        ),
        dict(
            guid=_guid("8B7CA206-4790-4B9A-B8FE-575F050F886E"),
            offset=2 * MiB,
            length=MiB,
            required=1,
        ),
    ]
    assert table[80:] == bytes(len(table) - 80)
    meta = head[2 * MiB : 3 * MiB]
    assert _le(meta[:32], "8sHH20s", "signature reserved count reserved2") == dict(
        signature=b"metadata", reserved=0, count=5, reserved2=bytes(20)
    )
    entries = [
        _le(meta[at : at + 32], "16sIIII", "guid offset length flags reserved")
        for at in range(32, 192, 32)
    ]
    assert meta[192 : 64 << 10] == bytes((64 << 10) - 192)
    disk_item, required = 0b110, 0b100  # IsVirtualDisk | IsRequired; IsRequired
    want = {
        _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B"): (
            struct.pack("<II", block_bytes, 0),
            required,
        ),
        _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8"): (
            struct.pack("<Q", disk),
            disk_item,
        ),
        _guid("BECA12AB-B2E6-4523-93EF-C309E000C746"): (disk_id.bytes_le, disk_item),  # page 83
        _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F"): (struct.pack("<I", 512), disk_item),
        _guid("CDA348C7-445D-4471-9CC9-E9885251C556"): (struct.pack("<I", 512), disk_item),
    }
    got = {e["guid"]: (meta[e["offset"] : e["offset"] + e["length"]], e["flags"]) for e in entries}
    assert got == want and all(e["reserved"] == 0 for e in entries)
    spans = sorted((e["offset"], e["offset"] + e["length"]) for e in entries)
    assert spans[0][0] >= 64 << 10 and all(a[1] <= b[0] for a, b in pairwise(spans))
    assert img.size == 3 * MiB + -(-bat_entries * 8 // MiB) * MiB  # no data: no payload blocks


def test_size_not_a_multiple_of_512_is_rounded_up_with_zeros(tmp_path: Path) -> None:
    """VHDX holds whole logical sectors: 3 MiB + 1000 bytes becomes 3 MiB + 1024, the last 24
    bytes zeros; the data up to the disk's end (in the last, partial sector) is kept."""
    size = 3 * MiB + 1000
    raw = tmp_path / "odd.raw"
    tail = random.Random(3).randbytes(5000)
    with open(raw, "wb") as fh:
        fh.truncate(size)
        fh.seek(size - len(tail))
        fh.write(tail)
    src = FileSource(str(raw))
    out = export(vhdx_image(src, MiB), tmp_path / "odd.vhdx")
    qemu_check(out, "vhdx")
    rounded = 3 * MiB + 1024
    assert geometry(size).disk_bytes == rounded and geometry(3 * MiB).disk_bytes == 3 * MiB
    qemu = need_tool("qemu-img")
    info = subprocess.run(
        [qemu, "info", "--output", "json", "-f", "vhdx", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == rounded
    padded = tmp_path / "padded.raw"
    padded.write_bytes(raw.read_bytes() + bytes(rounded - size))
    qemu_compare(padded, out, "vhdx")
    with open(out, "rb") as fh:
        disk = VHDX(fh)
        assert disk.size == rounded
        assert disk.read(rounded) == padded.read_bytes()


def test_random_reads_match_the_exported_file(tmp_path: Path) -> None:
    for case in ("sparse-mixed", "odd-size"):
        raw, src = make_case(tmp_path, case)
        img = vhdx_image(src, 2 * MiB)
        out = export(img, tmp_path / f"{case}.vhdx")
        data = out.read_bytes()
        assert img.size == len(data)
        rng = random.Random(11)
        spots = [(0, 600), ((64 << 10) - 10, 200), (192 << 10, 70_000), (2 * MiB, 70_000)]
        spots += [(BAT_OFFSET_BYTES, 4096), (img.size - 100, 500), (img.size, 10)]
        spots += [(rng.randrange(img.size), rng.randrange(1, 3 * MiB)) for _ in range(20)]
        for off, n in spots:
            assert img.read(off, n) == data[off : off + n], (case, off, n)


def test_disk_id_is_visible_and_makes_the_file_reproducible(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "odd-size")
    disk_id = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    a, b = vhdx_image(src, disk_id=disk_id), vhdx_image(src, disk_id=disk_id)
    assert a.read(0, BAT_OFFSET_BYTES + MiB) == b.read(0, BAT_OFFSET_BYTES + MiB)
    c = vhdx_image(src)
    assert c.read(0, BAT_OFFSET_BYTES) != a.read(0, BAT_OFFSET_BYTES)  # random id otherwise
    out = export(a, tmp_path / "id.vhdx")
    with open(out, "rb") as fh:
        assert VHDX(fh).id == disk_id


class _Sized:
    """A disk of any size with no data (only its size matters to the refusals)."""

    granularity = 65536

    def __init__(self, size: int) -> None:
        self.size = size

    def extents(self) -> list[tuple[int, int]]:
        return []

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))


def test_refusals() -> None:
    for bad in (MiB // 2, 3 * MiB, 512 * MiB):
        with pytest.raises(UsageError):
            vhdx_image(_Sized(MiB), bad)
    with pytest.raises(OutputError):
        vhdx_image(_Sized(MAX_DISK_BYTES + 1))
    with pytest.raises(OutputError):
        vhdx_image(_Sized(0))
    huge = vhdx_image(_Sized(MAX_DISK_BYTES))  # the limit itself fits: a 17 MiB BAT, no data
    assert huge.size == BAT_OFFSET_BYTES + 17 * MiB
