"""qcow2 export: judged by qemu-img (check: no leaks nor corruptions; compare: same data, same
virtual size) and read back through dissect.hypervisor's independent qcow2 reader."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from combtest import Image, need_tool
from dissect.hypervisor.disk import qcow2  # a test dependency: never skipped
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

from drive.formats.image import Literal, VirtualImage
from drive.formats.qcow2 import qcow2_image

KiB = 1 << 10


def _dissect_open(fh: object) -> object:
    return qcow2.QCow2(fh).open()


def _clusters_overlapping(extents: list[tuple[int, int]], cluster_bytes: int) -> int:
    touched: set[int] = set()
    for off, n in extents:
        touched.update(range(off // cluster_bytes, -(-(off + n) // cluster_bytes)))
    return len(touched)


def _qemu_check_json(path: Path) -> dict[str, int]:
    qemu = need_tool("qemu-img")
    res = subprocess.run(
        [qemu, "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return dict(json.loads(res.stdout))


@pytest.mark.parametrize("case", sorted(CASES))
def test_qcow2_export_is_clean_identical_and_sparse(tmp_path: Path, case: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(qcow2_image(src), tmp_path / "out.qcow2")
    qemu_check(out, "qcow2")
    qemu_compare(raw, out, "qcow2")
    same_through(_dissect_open, raw, out)
    # Exactly the clusters overlapping the extents hold data, and the file ends at its last
    # used cluster (nothing allocated that nothing references).
    report = _qemu_check_json(out)
    assert report.get("allocated-clusters", 0) == _clusters_overlapping(src.extents(), 64 * KiB)
    assert report["image-end-offset"] == out.stat().st_size
    # Only the data clusters and a little metadata are allocated, in the file and on disk.
    data_bytes = sum(n for _, n in src.extents())
    assert out.stat().st_size <= data_bytes + 4 * MiB
    assert os.stat(out).st_blocks * 512 <= data_bytes + 4 * MiB
    src.close()


def test_over_4g_file_is_far_smaller_than_the_disk(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "over-4g")
    img = qcow2_image(src)
    assert img.size < 8 * MiB < raw.stat().st_size // 100
    # Data clusters are runs of the source, never copied into the layout.
    assert sum(s.length for s in img.segments if isinstance(s, Literal)) < MiB
    src.close()


@pytest.mark.parametrize("cluster_bytes", [512, 4 * KiB, 2 * MiB])
@pytest.mark.parametrize("case", ["odd-size", "sparse-mixed"])
def test_other_cluster_sizes(tmp_path: Path, case: str, cluster_bytes: int) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(qcow2_image(src, cluster_bytes), tmp_path / "out.qcow2")
    qemu_check(out, "qcow2")
    qemu_compare(raw, out, "qcow2")
    src.close()


class _MemorySource:
    """A small disk in memory with arbitrary (unaligned, touching) extents."""

    def __init__(self, size: int, extents: list[tuple[int, int]], seed: int) -> None:
        rng = random.Random(seed)
        self.data = bytearray(size)
        for off, n in extents:
            self.data[off : off + n] = rng.randbytes(n)
        self._extents = extents

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def granularity(self) -> int:
        return 4096

    def extents(self) -> list[tuple[int, int]]:
        return self._extents

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(self.data[offset : offset + len(buf)]).ljust(len(buf), b"\0")


def test_unaligned_and_touching_extents(tmp_path: Path) -> None:
    # Extents sharing a 64 KiB cluster, touching across one, spanning an L2 table's boundary
    # at 4 KiB clusters (512 entries = 2 MiB), and a last cluster past the disk's end.
    size = 5 * MiB + 1024
    extents = [(4096, 4096), (12288, 8192), (65536, 4096), (2 * MiB - 4096, 8192), (5 * MiB, 1024)]
    src = _MemorySource(size, extents, seed=7)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(src.data)
    for cluster_bytes in (4 * KiB, 64 * KiB):
        out = export(qcow2_image(src, cluster_bytes), tmp_path / f"{cluster_bytes}.qcow2")
        qemu_check(out, "qcow2")
        qemu_compare(raw, out, "qcow2")
        same_through(_dissect_open, raw, out)


def test_size_not_a_multiple_of_512(tmp_path: Path) -> None:
    # qemu (7.2) rounds a qcow2's size down to 512 bytes, hiding a partial last sector: the
    # header carries the size rounded up, so every byte shows, followed by zeros to the sector.
    size = 3 * MiB + 777
    src = _MemorySource(size, [(0, 4096), (3 * MiB, 777)], seed=5)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(src.data)
    out = export(qcow2_image(src), tmp_path / "out.qcow2")
    qemu_check(out, "qcow2")
    assert int.from_bytes(out.read_bytes()[24:32], "big") == size - 777 + 1024
    padded = tmp_path / "padded.raw"
    padded.write_bytes(src.data + bytes(1024 - 777))
    qemu_compare(padded, out, "qcow2")
    same_through(_dissect_open, raw, out)


_HEADER_FIELDS = "magic version backing_file_offset backing_file_size cluster_bits size "
_HEADER_FIELDS += "crypt_method l1_size l1_table_offset refcount_table_offset "
_HEADER_FIELDS += "refcount_table_clusters nb_snapshots snapshots_offset incompatible_features "
_HEADER_FIELDS += "compatible_features autoclear_features refcount_order header_length"


@pytest.mark.parametrize(
    ("size", "cluster_bytes"),
    [(3 * MiB + 777, 512), (33 * MiB + 12_800, 4 * KiB), (5 * (1 << 30) + 3 * MiB, 64 * KiB)],
)
def test_every_header_field_is_the_specs(tmp_path: Path, size: int, cluster_bytes: int) -> None:
    """Every field of the version 3 header (qcow2.txt), the end of its (empty) extension
    area and the refcount table it points at, from the disk's size and the file's: the L1
    table right after the header's cluster, the refcount table right after the L1 table,
    16-bit refcounts covering every cluster of the (packed) file, nothing else."""
    disk = Image(tmp_path / "d.raw", size)
    disk.random(0, 3 * cluster_bytes)
    disk.random(size - 700, 700)  # in the last, partial cluster
    src = FileSource(str(disk.path), granularity=512)
    img = qcow2_image(src, cluster_bytes)
    head = img.read(0, cluster_bytes)
    fields = struct.unpack_from(">4sIQIIQIIQQIIQQQQII", head)
    got = dict(zip(_HEADER_FIELDS.split(), fields, strict=True))
    guest_clusters = -(-size // cluster_bytes)
    l1_size = -(-guest_clusters // (cluster_bytes // 8))  # an L2 table maps cluster / 8 clusters
    l1_clusters = -(-l1_size * 8 // cluster_bytes)
    file_clusters = img.size // cluster_bytes
    assert img.size % cluster_bytes == 0
    refcount_blocks = -(-file_clusters // (cluster_bytes // 2))
    table_clusters = max(1, -(-refcount_blocks * 8 // cluster_bytes))
    assert got == dict(
        magic=b"QFI\xfb",
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bytes.bit_length() - 1,
        size=-(-size // 512) * 512,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=cluster_bytes,
        refcount_table_offset=(1 + l1_clusters) * cluster_bytes,
        refcount_table_clusters=table_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=0,
        compatible_features=0,
        autoclear_features=0,
        refcount_order=4,
        header_length=104,
    )
    # The end-of-extensions marker (type 0, length 0), then nothing: no backing file name.
    assert head[104:] == bytes(cluster_bytes - 104)
    table = img.read(got["refcount_table_offset"], table_clusters * cluster_bytes)
    entries = struct.unpack(f">{len(table) // 8}Q", table)
    assert all(e and e % cluster_bytes == 0 for e in entries[:refcount_blocks])
    assert not any(entries[refcount_blocks:])
    src.close()


def test_random_reads_match_the_exported_file(tmp_path: Path) -> None:
    _, src = make_case(tmp_path, "sparse-mixed")
    img: VirtualImage = qcow2_image(src)
    out = export(img, tmp_path / "out.qcow2")
    data = out.read_bytes()
    assert len(data) == img.size
    rng = random.Random(3)
    spots = [(0, 112), (64 * KiB, 4096), (img.size - 100, 500), (12345, 3 * MiB)]
    spots += [(rng.randrange(img.size), rng.randrange(1, 256 * KiB)) for _ in range(20)]
    for off, n in spots:
        assert img.read(off, n) == data[off : off + n], (off, n)
    src.close()


def test_bad_cluster_sizes_are_refused(tmp_path: Path) -> None:
    src = _MemorySource(MiB, [], seed=1)
    for cluster_bytes in (256, 3000, 4 * MiB):
        with pytest.raises(ValueError):
            qcow2_image(src, cluster_bytes)
