"""FORMAT.md's tables of block lists (7.1), overlay records (19.3) and parity files (20) against
the code, and files the code writes read with nothing but those tables and rules.

The sealed forms of the same files are read in test_format_spec_sealed.py.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

import blake3
import pyarrow.parquet as pq
import pytest
from combtest import TEST_PASSWORD, Image, api_backup
from spectables import (
    SpecBlockList,
    ceil_div,
    check_values,
    example_hex,
    section,
    spec_example,
    spec_records,
    spec_struct,
    spec_table,
)

import drive.overlays.log as overlay_log
import drive.overlays.overlay as overlay
from catalog.repo import Repository
from catalog.store import blocks, parity
from catalog.store.local import LocalStorage
from catalog.store.parity import ParityGeometry, ParityWriter
from catalog.store.points import point_name
from catalog.store.sealing import PLAIN

CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Block lists (section 7.1)


def test_blocks_layout_table_matches_code() -> None:
    """The parts of section 7.1's layout add up as the code encodes and parses a list."""
    rows = {r["Part"]: r for r in spec_table("blocks-layout")}
    assert list(rows) == ["position ranges", "block hashes", "trailer"]
    ranges = "16 × ⌈`rows` / `range_rows`⌉"
    assert rows["position ranges"]["Offset"] == "0" and rows["position ranges"]["Size"] == ranges
    assert rows["block hashes"]["Offset"] == ranges
    assert rows["block hashes"]["Size"] == "32 × `blocks`"
    hashes = [bytes([i]) * 32 for i in range(3)]
    pairs = struct.pack("<4q", 0, 5 * CHUNK, -1, -1)
    data = blocks.encode(hashes, 2 * blocks.BLOCK_BYTES + 7, blocks.BLOCK_BYTES, pairs, 4097)
    spec = SpecBlockList(data)
    assert spec.ranges == [(0, 5 * CHUNK), (blocks.NO_POSITION, blocks.NO_POSITION)]
    assert spec.hashes == hashes
    assert spec.t["range_rows"] == blocks.RANGE_ROWS and spec.t["rows"] == 4097
    parsed = blocks.BlockList.parse(data, "spec")
    assert (parsed.size, parsed.block_bytes, parsed.rows) == (spec.t["file_bytes"], 1 << 20, 4097)
    trailer = {r["Field"]: r for r in spec_table("blocks-trailer")}
    assert "1048576 (`BLOCK_BYTES`)" in trailer["block_bytes"]["Meaning and reason"]
    assert blocks.BLOCK_BYTES == 1048576
    assert "4096 (`RANGE_ROWS`)" in trailer["range_rows"]["Meaning and reason"]
    assert blocks.RANGE_ROWS == 4096


def test_block_list_example() -> None:
    """Section 7.1's example is what the code encodes for those values (but the hash)."""
    parts = []
    for line in spec_example("blocks").splitlines():
        if "..." in line:  # the block hash, shown cut short
            continue
        parts.append(example_hex(line[:50]))
    pairs = struct.pack("<2q", 5 * CHUNK, 5 * CHUNK)
    data = blocks.encode([bytes(32)], 2061, blocks.BLOCK_BYTES, pairs, 1)
    assert b"".join(parts) == data[:16] + data[48:]


def test_block_lists_written_by_a_backup_read_by_spec(tmp_path: Path) -> None:
    """A backup's two block lists: the point names their BLAKE3; a leaves file's list has no
    ranges (rows 0); a segment's covers its rows, and its highest offset is where the last
    chunk read starts (a partial chunk here), not where it ends."""
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir), encryption="none")
    size = 40 * CHUNK + 1000
    img = Image(tmp_path / "disk.img", size)
    img.random(2 * CHUNK + 5, 3 * CHUNK, seed=1)  # chunks 2-5
    img.random(40 * CHUNK, 1000, seed=2)  # the partial last chunk, 40
    point = api_backup(repo_dir, img.path, name="disk")
    doc = json.loads((repo_dir / point_name(point.id)).read_bytes())
    for kind, directory in (("leaves", "manifests/leaves"), ("index_segment", "index")):
        name = f"{directory}/{doc[kind]}"
        listed = (repo_dir / f"{name}.blocks").read_bytes()
        assert blake3.blake3(listed).hexdigest() == doc["blocks"][kind]
        spec = SpecBlockList(listed)
        stored = (repo_dir / f"{name}.parquet").read_bytes()
        spec.check_file(stored)
        assert spec.hashes == [bytes.fromhex(doc[kind])]  # one block: the file's own id
        assert spec.t["range_rows"] == blocks.RANGE_ROWS
        if kind == "leaves":
            assert spec.t["rows"] == 0 and spec.ranges == []
        else:
            assert spec.t["rows"] == pq.ParquetFile(repo_dir / f"{name}.parquet").metadata.num_rows
            assert spec.ranges == [(2 * CHUNK, 40 * CHUNK)]


# ---------------------------------------------------------------------------------------------
# Overlay records (section 19.3)


def _layout(fmt: str) -> tuple[list[tuple[int, int, str]], list[tuple[int, int]]]:
    """(offset, size, code) of each field of a little-endian struct format, and (offset, size)
    of its pad bytes."""
    fields, pads, pos = [], [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        n = int(count or 1)
        if code == "s":
            fields.append((pos, n, f"{n}s"))
            pos += n
        elif code == "x":
            pads.append((pos, n))
            pos += n
        else:
            size = struct.calcsize("<" + code)
            for _ in range(n):
                fields.append((pos, size, code))
                pos += size
    return fields, pads


def test_overlay_record_table_matches_code() -> None:
    """Every field of the record header at the offset, size and type the code packs it; the
    reserved bytes are the code's pad bytes (written as zero, skipped on reading)."""
    spec, rows = spec_struct("overlay-record")
    code = overlay_log.HEADER
    assert spec.size == code.size == overlay_log.HEADER_BYTES
    reserved = [(int(r["Offset"]), int(r["Size"])) for r in rows if r["Field"] == "reserved"]
    spec_fields, _ = _layout(spec.format)
    code_fields, code_pads = _layout(code.format)
    assert [f for f in spec_fields if (f[0], f[1]) not in reserved] == code_fields
    assert reserved == code_pads
    head, _stored = overlay_log.encode_record(overlay_log.KIND_DATA, 7, 3, b"abc", PLAIN)
    values = dict(zip([r["Field"] for r in rows], spec.unpack(head), strict=True))
    check_values(rows, [values])
    assert values["kind"] == overlay_log.KIND_DATA and values["flags"] == 0
    assert (values["offset"], values["length"]) == (7, 3)
    assert "header bytes 0–23" in section("19.3") and overlay_log._CHECKED == 24


def test_overlay_records_written_by_code_read_by_spec(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir), encryption="none")
    img = Image(tmp_path / "disk.img", 8 * CHUNK)
    img.random(0, 3 * CHUNK, seed=3)
    point = api_backup(repo_dir, img.path, name="disk")
    repo = Repository.open(str(repo_dir), password=TEST_PASSWORD)
    overlay.create(repo, "ov", point)
    o = overlay.Overlay(repo, "ov")
    o.write(100, b"a" * 5000)
    o.zero(3 * CHUNK, CHUNK)
    o.write(2 * CHUNK + 1, b"b" * 70)
    o.flush()
    o.close()
    log = (repo_dir / "overlays" / "ov" / "log-0.dat").read_bytes()
    got = [(r["kind"], r["flags"], r["offset"], r["length"], p) for r, p, _ in spec_records(log)]
    assert got == [
        (1, 0, 100, 5000, b"a" * 5000),
        (2, 0, 3 * CHUNK, CHUNK, b""),
        (1, 0, 2 * CHUNK + 1, 70, b"b" * 70),
    ]


# ---------------------------------------------------------------------------------------------
# Parity (section 20): the code's parity shards from the spec's formula alone


@functools.cache
def _gf() -> tuple[list[int], list[int]]:
    """exp and log tables of GF(2^8) with section 20's polynomial and α."""
    text = " ".join(section("20").split())
    assert "(0x11d)" in text and "α is the element x, the byte `0x02`" in text
    exp, log, x = [0] * 255, [0] * 256, 1
    for i in range(255):
        exp[i], log[x] = x, i
        x <<= 1  # times α = x
        if x & 0x100:
            x ^= 0x11D
    return exp, log


def _mul(a: int, b: int) -> int:
    exp, log = _gf()
    return 0 if a == 0 or b == 0 else exp[(log[a] + log[b]) % 255]


def _inverse(m: list[list[int]]) -> list[list[int]]:
    exp, log = _gf()
    n = len(m)
    a = [row[:] + [int(i == j) for j in range(n)] for i, row in enumerate(m)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c])
        a[c], a[p] = a[p], a[c]
        inv = exp[(255 - log[a[c][c]]) % 255]
        a[c] = [_mul(v, inv) for v in a[c]]
        for r in range(n):
            if r != c and a[r][c]:
                f = a[r][c]
                a[r] = [x ^ _mul(f, y) for x, y in zip(a[r], a[c], strict=True)]
    return [row[n:] for row in a]


def _generator(k: int, m: int) -> list[list[int]]:
    """Section 20: G = V · (top k × k of V)⁻¹."""
    exp, _log = _gf()
    v = [[1] + [0] * (k - 1)] + [[exp[(r * c) % 255] for c in range(k)] for r in range(k + m - 1)]
    top = _inverse(v[:k])
    return [
        [functools.reduce(lambda s, i: s ^ _mul(row[i], top[i][c]), range(k), 0) for c in range(k)]
        for row in v
    ]


@pytest.mark.parametrize(("k", "m"), [(3, 2), (16, 2), (5, 4)])
def test_parity_shards_follow_the_spec_formula(tmp_path: Path, k: int, m: int) -> None:
    shard = 64
    pack = bytes((i * 37 + i // 251) & 0xFF for i in range(k * shard * 2 + 101))  # 2 stripes + rest
    pack_id = blake3.blake3(pack).hexdigest()
    (tmp_path / "tmp").mkdir()
    storage = LocalStorage(str(tmp_path))
    writer = ParityWriter(storage, ParityGeometry(k, m, shard))
    writer.update(pack)
    writer.commit(pack_id)
    data = storage.read(parity.parity_name(pack_id))
    header, hrows = spec_struct("parity-header")
    trailer, trows = spec_struct("parity-trailer")
    h = dict(zip([r["Field"] for r in hrows], header.unpack_from(data, 0), strict=True))
    t = dict(
        zip(
            [r["Field"] for r in trows],
            trailer.unpack_from(data, len(data) - trailer.size),
            strict=True,
        )
    )
    check_values(hrows, [h])
    check_values(trows, [t])
    assert (h["data_shards"], h["parity_shards"], h["shard_bytes"]) == (k, m, shard)
    g = _generator(k, m)
    assert g[:k] == [[int(i == j) for j in range(k)] for i in range(k)]
    pos, hashes = header.size, []
    for stripe in range(t["stripes"]):
        part = pack[stripe * k * shard : (stripe + 1) * k * shard]
        s = shard if len(part) == k * shard else ceil_div(len(part), k)
        part += bytes(k * s - len(part))  # zero padding, stored nowhere
        data_shards = [part[c * s : (c + 1) * s] for c in range(k)]
        for j in range(m):
            want = bytes(
                functools.reduce(
                    lambda acc, c: acc ^ _mul(g[k + j][c], data_shards[c][b]), range(k), 0
                )
                for b in range(s)
            )
            assert data[pos : pos + s] == want, (stripe, j)
            hashes.append(blake3.blake3(want).digest()[:16])
            pos += s
        start = len(data) - trailer.size - t["table_bytes"] + stripe * (k + m) * 16
        table = data[start : start + (k + m) * 16]
        assert [table[i * 16 : (i + 1) * 16] for i in range(k)] == [
            blake3.blake3(d).digest()[:16] for d in data_shards
        ]
        assert table[k * 16 :] == b"".join(hashes[-m:])
    assert pos == len(data) - trailer.size - t["table_bytes"]
    assert t["pack_bytes"] == len(pack) and t["pack_id"] == bytes.fromhex(pack_id)
