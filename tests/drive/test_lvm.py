"""LVM2 logical volumes as volumes of a point (drive.files.lvm): real PVs made by pvcreate,
vgcreate and lvcreate holding ext4 images, read as ``lvm/VG/LV`` and through ``PointFiles``;
and hostile metadata made by rewriting a real PV's metadata area (checksums made right, so
the parser and the bounds are what is tested)."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import fsimages as F
import pytest
from combtest import MiB, need_tool
from drivetest import BytesSource, FileSource

from catalog.errors import FileSystemError
from drive.files.lvm import logical_volumes, lvm_crc, parse
from drive.files.view import PointFiles
from drive.files.volumes import Volume, find_volumes

PV_NOTE = "LVM2 physical volume"


def _tree(root: Path, word: str) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text(f"{word}\n")
    (root / "blob.bin").write_bytes(random.Random(word).randbytes(300_000))
    return root


def _ext4(tmp: Path, word: str) -> Path:
    return F.ext4_image(_tree(tmp / f"tree-{word}", word), tmp / f"{word}.ext4", size_mb=8)


def _vg(tag: str) -> str:
    return f"comb{tag}{os.getpid()}vg"


def _lvs(source: FileSource | BytesSource) -> dict[str, Volume]:
    return {v.name: v for v in find_volumes(source)}


def _read_file(pf: PointFiles, path: str) -> bytes:
    return b"".join(data for _, data in pf.data(pf.lookup(path)))


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("lvm1")
    vg = _vg("one")
    return F.lvm_disk(tmp / "pv.img", _ext4(tmp, "alpha"), vg=vg, lv="root"), vg


def test_the_pv_is_followed_by_its_lv_holding_ext4(one: tuple[Path, str]) -> None:
    disk, vg = one
    vols = find_volumes(FileSource(str(disk)))
    assert [v.name for v in vols] == ["disk", f"lvm/{vg}/root"]
    assert vols[0].note == PV_NOTE
    lv = vols[1]
    assert (lv.fstype, lv.label, lv.note, lv.ptype) == ("ext4", "comb-ext4", None, None)
    with open(disk, "rb") as fh:
        fh.seek(lv.offset + 1080)
        assert fh.read(2) == b"\x53\xef"
    assert lv.size == 8 * MiB and lv.offset + lv.size <= disk.stat().st_size


def test_point_files_list_and_read_through_lvm_dirs(one: tuple[Path, str]) -> None:
    disk, vg = one
    with PointFiles(FileSource(str(disk))) as pf:
        assert [n.entry.name for n in pf.listdir(pf.root())] == [b"disk", b"lvm"]
        assert [n.entry.name for n in pf.listdir(pf.lookup("/lvm"))] == [vg.encode()]
        assert [n.entry.name for n in pf.listdir(pf.lookup(f"/lvm/{vg}"))] == [b"root"]
        names = {n.entry.name for n in pf.listdir(pf.lookup(f"/lvm/{vg}/root"))}
        assert {b"etc", b"blob.bin", b"lost+found"} <= names
        assert _read_file(pf, f"/lvm/{vg}/root/etc/hostname") == b"alpha\n"
        blob = _read_file(pf, f"/lvm/{vg}/root/blob.bin")
        assert blob == random.Random("alpha").randbytes(300_000)
        walked = [n.path for n in pf.walk(pf.root())]
        assert f"/lvm/{vg}/root/etc/hostname".encode() in walked
        with pytest.raises(Exception, match="no such volume"):
            pf.lookup(f"/lvm/{vg}/nope/etc")


def _lvm(*args: str) -> str:
    return F._run(args[0], "--config", F.LVM_CONFIG, *args[1:])


def _pe_range(vg: str, lv: str) -> list[tuple[int, int]]:
    ranges = _lvm("lvs", "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}").split()
    pairs = [r.rsplit(":", 1)[1].split("-") for r in ranges]
    return [(int(first), int(last)) for first, last in pairs]


def test_two_lvs_and_one_in_pieces(tmp_path: Path) -> None:
    need_tool("lvcreate")
    vg = _vg("two")
    disk = F.lvm_disk(tmp_path / "pv.img", _ext4(tmp_path, "alpha"), vg=vg, lv="root")
    beta = _ext4(tmp_path, "beta")
    with open(disk, "r+b") as fh:
        fh.truncate(disk.stat().st_size + 16 * MiB)
    with F._loop(disk) as dev:
        try:
            _lvm("pvresize", "-q", dev)
            off = ["--driverloaded", "n", "-an", "-Zn"]
            _lvm("lvcreate", "-q", *off, "-L", "8m", "-n", "data", vg)
            _lvm("lvcreate", "-q", *off, "-l", "1", "-n", "grow", vg)
            _lvm("lvcreate", "-q", *off, "-l", "1", "-n", "gap", vg)
            _lvm("lvextend", "-q", "--driverloaded", "n", "-l", "+1", f"{vg}/grow")
            first = _pe_range(vg, "data")[0][0]
            grow = _pe_range(vg, "grow")
        finally:
            subprocess.run(["vgchange", "--config", F.LVM_CONFIG, "-an", vg], capture_output=True)
    assert len(grow) == 2 and grow[0][1] + 1 != grow[1][0]
    seek = 1 * MiB + first * 4 * MiB
    subprocess.run(
        ["dd", f"if={beta}", f"of={disk}", "bs=1M", f"seek={seek}", "oflag=seek_bytes"]
        + ["conv=notrunc,sparse", "status=none"],
        check=True,
    )
    vols = _lvs(FileSource(str(disk)))
    assert list(vols) == ["disk"] + [f"lvm/{vg}/{n}" for n in ("root", "data", "grow", "gap")]
    assert vols[f"lvm/{vg}/root"].fstype == vols[f"lvm/{vg}/data"].fstype == "ext4"
    assert vols[f"lvm/{vg}/grow"].fstype is None
    assert vols[f"lvm/{vg}/grow"].note == "LVM LV in 2 pieces: not read yet"
    with PointFiles(FileSource(str(disk))) as pf:
        assert [n.entry.name for n in pf.listdir(pf.lookup(f"/lvm/{vg}"))] == [
            b"root",
            b"data",
            b"grow",
            b"gap",
        ]
        assert _read_file(pf, f"/lvm/{vg}/root/etc/hostname") == b"alpha\n"
        assert _read_file(pf, f"/lvm/{vg}/data/etc/hostname") == b"beta\n"


def test_a_pv_in_gpt_partition_2(one: tuple[Path, str], tmp_path: Path) -> None:
    disk, vg = one
    fat = tmp_path / "p1.img"
    with open(fat, "wb") as fh:
        fh.truncate(2 * MiB)
    gpt = F.partitioned(tmp_path / "gpt.img", [fat, disk])
    vols = find_volumes(FileSource(str(gpt)))
    assert [v.name for v in vols] == ["part1", "part2", f"lvm/{vg}/root"]
    assert vols[1].note == PV_NOTE and vols[2].fstype == "ext4"
    assert vols[2].offset == vols[1].offset + 1 * MiB
    with PointFiles(FileSource(str(gpt))) as pf:
        assert _read_file(pf, f"/lvm/{vg}/root/etc/hostname") == b"alpha\n"


# --- hostile metadata -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(one: tuple[Path, str]) -> tuple[bytes, str, str]:
    """(the PV's first 2 MiB, its VG name, its metadata text)."""
    disk, vg = one
    with open(disk, "rb") as fh:
        data = fh.read(2 * MiB)
    mda = 4096
    offset, size = struct.unpack_from("<QQ", data, mda + 40)
    text = data[mda + offset : mda + offset + size].rstrip(b"\0").decode()
    return data, vg, text


def _rewrite(
    data: bytes,
    texts: list[tuple[str | bytes, int]],
    declared: int | None = None,
    fill: bool = False,
) -> bytearray:
    """``data`` with its metadata area holding each text at its ring offset (wrapping round
    the ring's end to just after the header) and a raw location for each."""
    out = bytearray(data)
    mda = 4096
    ring = struct.unpack_from("<Q", out, mda + 32)[0]
    out[mda + 40 : mda + 512] = bytes(472)
    for i, (text, at) in enumerate(texts * (19 if fill else 1)):
        raw = (text.encode() if isinstance(text, str) else text) + b"\0"
        for k, byte in enumerate(raw):
            pos = at + k if at + k < ring else 512 + at + k - ring
            out[mda + pos] = byte
        length = len(raw) if declared is None else declared
        struct.pack_into("<QQII", out, mda + 40 + 24 * i, at, length, lvm_crc(raw), 0)
    struct.pack_into("<I", out, mda, lvm_crc(bytes(out[mda + 4 : mda + 512])))
    return out


def _outcome(data: bytes | bytearray) -> list[Volume] | str:
    source = BytesSource(data)
    pv = Volume("disk", 0, source.size, None, None, PV_NOTE, None)
    return logical_volumes(source, pv)


def _names(result: list[Volume] | str) -> list[str]:
    assert isinstance(result, list), result
    return [v.name for v in result]


def _one_line(result: list[Volume] | str) -> str:
    assert isinstance(result, str), result
    assert "\n" not in result and result.startswith("LVM2")
    return result


def test_the_newest_copy_wins_and_a_wrapped_one_reads(real: tuple[bytes, str, str]) -> None:
    data, vg, text = real
    newer = re.sub(r"seqno = \d+", "seqno = 70", text).replace("root {", "newer {", 1)
    ring = struct.unpack_from("<Q", data, 4096 + 32)[0]
    wrapped = _rewrite(data, [(text, 8192), (newer, ring - 100)])
    assert _names(_outcome(wrapped)) == [f"lvm/{vg}/newer"]
    full = _rewrite(data, [(text, 512)], fill=True)  # 19 raw locations, none the end
    clobbered = _rewrite(data, [(text, 512), (newer, ring - 100)])  # the newer one wrote over it
    assert _names(_outcome(clobbered)) == [f"lvm/{vg}/newer"]
    assert _names(_outcome(full)) == [f"lvm/{vg}/root"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t + "\n{\n", "'{' where a name belongs"),
        (lambda t: t.replace("physical_volumes {", "physical_volumes {{"), "where a name"),
        (lambda t: t + "\nx {\n", "a section is not closed"),
        (lambda t: t + "\n}\n}\n", "unbalanced '}'"),
        (lambda t: t.replace("extent_size = 8192", "extent_size = " + "9" * 5000), "digits"),
        (lambda t: t.replace("extent_size = 8192", f"extent_size = {2**60}"), "extent_size"),
        (lambda t: t.replace('format = "lvm2"', "format = @"), "unexpected '@'"),
        (lambda t: "a {" * 10_000 + "}" * 10_000, "nested over"),
        (lambda t: "a = [" + "1," * 70_000 + "]", "array of over"),
        (lambda t: t.replace(f"{t.split()[0]} {{", "../x {", 1), "unexpected '/'"),
        (lambda t: t.replace(f"{t.split()[0]} {{", ".. {", 1), "not a valid LVM name"),
        (lambda t: t.replace("id =", "xid =", 2), "not in the metadata"),
        (lambda t: re.sub(r"seqno = \d+", "seqno = -5", t), "seqno"),
    ],
)
def test_hostile_text_is_one_line(
    real: tuple[bytes, str, str], change: Callable[[str], str], needle: str
) -> None:
    data, _, text = real
    assert needle in _one_line(_outcome(_rewrite(data, [(change(text), 512)])))


def test_hostile_sizes_and_offsets(real: tuple[bytes, str, str]) -> None:
    data, _, text = real
    assert "1099511627776 bytes of metadata" in _one_line(
        _outcome(_rewrite(data, [(text, 512)], declared=2**40))
    )
    bad_crc = _rewrite(data, [(text, 512)])
    bad_crc[4096 + 600] ^= 1
    assert "checksum mismatch" in _one_line(_outcome(bad_crc))
    far = bytearray(data)
    label = far[512:1024]
    at = 512 + 32 + 40 + 16 * 2  # the metadata area list, after one data area and its end
    struct.pack_into("<Q", far, at, 2**40)
    struct.pack_into("<I", far, 512 + 16, lvm_crc(bytes(far[512 + 20 : 1024])))
    assert label != far[512:1024]
    assert "not in the PV" in _one_line(_outcome(far))


def _lv_text(text: str, segment: str) -> str:
    """``text`` with its LV's first segment replaced by ``segment``'s key = value lines."""
    return re.sub(r"segment1 \{.*?\n\}", "segment1 {\n" + segment + "\n}", text, flags=re.S)


@pytest.mark.parametrize(
    ("segment", "note"),
    [
        ('start_extent = 0\nextent_count = 2\ntype = "thin"', "LVM thin volume: not read yet"),
        ('start_extent = 0\nextent_count = 2\ntype = "raid1"', "LVM raid1 volume: not read yet"),
        (
            'start_extent = 0\nextent_count = 2\ntype = "striped"\nstripe_count = 2',
            "LVM striped volume (2 stripes): not read yet",
        ),
        (
            'start_extent = 0\nextent_count = 2\ntype = "striped"\nstripe_count = 1\n'
            'stripes = ["pv0", 1000000000]',
            "LVM LV past the disk's end",
        ),
        (
            'start_extent = 0\nextent_count = 1\ntype = "striped"\nstripe_count = 1\n'
            'stripes = ["pv0", 0]\n}\nsegment2 {\nstart_extent = 1\nextent_count = 1\n'
            'type = "striped"\nstripe_count = 1\nstripes = ["pv1", 0]',
            "LVM LV spanning 2 PVs: not read yet",
        ),
        (
            'start_extent = 5\nextent_count = 2\ntype = "striped"\nstripe_count = 1\n'
            'stripes = ["pv0", 0]',
            "LVM LV damaged: segments leave a gap or overlap at extent 0",
        ),
    ],
)
def test_lvs_that_are_not_read_say_why(
    real: tuple[bytes, str, str], segment: str, note: str
) -> None:
    data, vg, text = real
    result = _outcome(_rewrite(data, [(_lv_text(text, segment), 512)]))
    assert isinstance(result, list)
    assert [(v.name, v.fstype, v.note) for v in result] == [(f"lvm/{vg}/root", None, note)]


def test_huge_extent_count_is_clipped_and_hostile_lv_names_left_out(
    real: tuple[bytes, str, str],
) -> None:
    data, vg, text = real
    huge = _lv_text(
        text,
        'start_extent = 0\nextent_count = 1099511627776\ntype = "striped"\n'
        'stripe_count = 1\nstripes = ["pv0", 0]',
    )
    result = _outcome(_rewrite(data, [(huge, 512)]))
    assert isinstance(result, list) and len(result) == 1
    assert result[0].offset + result[0].size == len(data)
    dots = text.replace("root {", ".. {", 1)
    result = _outcome(_rewrite(data, [(dots, 512)]))
    assert isinstance(result, list) and [v.name for v in result] == [f"lvm/{vg}/#1"]
    assert result[0].note and "not a valid LVM name" in result[0].note


def test_the_pv_says_why_when_its_metadata_is_unreadable(real: tuple[bytes, str, str]) -> None:
    data, _, text = real
    vols = find_volumes(BytesSource(_rewrite(data, [(text + "{", 512)])))
    assert [v.name for v in vols] == ["disk"]
    assert vols[0].note and vols[0].note.startswith(PV_NOTE + " (LVM2 metadata:")


def test_random_damage_never_escapes(real: tuple[bytes, str, str]) -> None:
    data, _, text = real
    rng = random.Random(5)
    raw = text.encode()
    for _ in range(300):
        damaged = bytearray(raw)
        for _ in range(rng.randrange(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.choice(b'{}[]="#,\n -09az\\\xff')
        result = _outcome(_rewrite(data, [(bytes(damaged), 512)]))
        assert isinstance(result, str | list)
        if isinstance(result, str):
            assert "\n" not in result


def test_parse_reads_lvm_text_format() -> None:
    config = parse('# c\na { b = 1 c = "x\\"y" # d\n e = ["p", 2,] f { } }\nv = -3\n')
    assert config == {"a": {"b": 1, "c": 'x"y', "e": ["p", 2], "f": {}}, "v": -3}
    with pytest.raises(FileSystemError):
        parse("a = ")
