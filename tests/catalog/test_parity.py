"""Parity files: streaming writer = whole-pack writer, every erasure pattern within m rebuilds,
damage located per shard, metadata damage refused, the spec layout table."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import blake3
import pytest
from spectables import spec_table

from catalog.errors import CorruptionError, UsageError
from catalog.store import parity
from catalog.store.local import LocalStorage
from catalog.store.parity import (
    ParityGeometry,
    ParityWriter,
    parity_name,
    parse_parity,
    rebuild,
    write_parity,
)

G = ParityGeometry(4, 2, 1024)  # 4 KiB stripes


def _storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return LocalStorage(str(tmp_path))


def _parity(st: LocalStorage, pack: bytes, g: ParityGeometry = G) -> parity.ParityFile:
    pid = blake3.blake3(pack).hexdigest()
    write_parity(st, g, pack, pid)
    return parse_parity(st.read(parity_name(pid)), "p", pid)


def test_layout_table() -> None:
    rows = {r["Part"]: r for r in spec_table("parity-layout")}
    assert list(rows) == ["header", "parity shards", "shard table", "trailer"]
    h, t = parity.PARITY_HEADER_BYTES, parity.PARITY_TRAILER_BYTES
    assert rows["header"]["Size"] == str(h) and rows["parity shards"]["Offset"] == str(h)
    assert rows["trailer"]["Offset"] == f"file size − {t}" and rows["trailer"]["Size"] == str(t)
    assert rows["shard table"]["Size"].startswith(
        f"`table_bytes` = {parity.PARITY_SHARD_HASH_BYTES}"
    )


@pytest.mark.parametrize("size", [48, 1000, 4096, 4097, 3 * 4096 + 5, 20000])
def test_streamed_equals_whole_and_size(tmp_path: Path, size: int) -> None:
    st = _storage(tmp_path)
    pack = random.Random(size).randbytes(size)
    pid = blake3.blake3(pack).hexdigest()
    w = ParityWriter(st, G)
    for i in range(0, size, 333):  # odd pieces across stripe boundaries
        w.update(memoryview(pack)[i : i + 333])
    n = w.commit(pid)
    streamed = st.read(parity_name(pid))
    assert len(streamed) == n
    os.unlink(st.path(parity_name(pid)))
    write_parity(st, G, pack, pid)
    assert st.read(parity_name(pid)) == streamed
    pf = parse_parity(streamed, "p", pid)
    stripes = -(-size // 4096)
    assert pf.stripes == stripes and pf.pack_bytes == size
    shards = sum(pf.shard_bytes(i) for i in range(stripes)) * 2
    assert n == 24 + shards + stripes * 6 * 16 + 72
    assert n - 96 - stripes * 96 <= size * 2 / 4 + 2 * 4  # m/k of the pack (+ rounding)


def test_every_pattern_of_up_to_m_damaged_shards_rebuilds(tmp_path: Path) -> None:
    st = _storage(tmp_path)
    g = ParityGeometry(6, 2, 256)
    pack = random.Random(1).randbytes(6 * 256 + 100)  # a full stripe and a short one
    pf = _parity(st, pack, g)
    for stripe, s in ((0, 256), (1, pf.shard_bytes(1))):
        for bad in itertools.combinations(range(8), 2):
            data = bytearray(pack)
            raw = bytearray(pf.data)
            for i in bad:
                if i < 6:
                    lo = stripe * 1536 + i * s
                    for j in range(lo, min(lo + s, len(pack))):
                        data[j] ^= 0xA5
                else:  # a parity shard
                    base = 24 + stripe * 2 * 256 + (i - 6) * s
                    raw[base] ^= 0xFF
            damaged = parity.ParityFile(
                pf.geometry, pf.pack_bytes, pf.pack_id, pf.stripes, pf.hashes, bytes(raw)
            )
            r = rebuild(bytes(data), damaged)
            assert r.whole and r.data == pack, (stripe, bad)
            assert r.parity_bad == sum(i >= 6 for i in bad)


def test_three_damaged_shards_are_beyond_parity_and_located(tmp_path: Path) -> None:
    st = _storage(tmp_path)
    pack = random.Random(2).randbytes(3 * 4096)
    pf = _parity(st, pack)
    data = bytearray(pack)
    for i in (1, 2, 3):  # three data shards of stripe 1
        data[4096 + i * 1024 + 7] ^= 1
    data[8192 + 5] ^= 1  # and one in stripe 2: rebuilt
    r = rebuild(bytes(data), pf)
    assert not r.whole
    assert r.lost == [(4096 + 1024, 4096 + 2048), (4096 + 2048, 4096 + 3072), (8192 - 1024, 8192)]
    assert r.data[8192:] == pack[8192:] and r.data[4096:8192] == bytes(data[4096:8192])


def test_truncated_and_extended_packs_rebuild(tmp_path: Path) -> None:
    st = _storage(tmp_path)
    pack = random.Random(3).randbytes(10000)
    pf = _parity(st, pack)
    assert rebuild(pack[:-50], pf).data == pack
    assert rebuild(pack + b"junk", pf).data == pack


@pytest.mark.parametrize("where", [0, 10, 20, -1, -40, -70, -100])
def test_damaged_metadata_is_refused(tmp_path: Path, where: int) -> None:
    st = _storage(tmp_path)
    pack = random.Random(4).randbytes(5000)
    pid = blake3.blake3(pack).hexdigest()
    write_parity(st, G, pack, pid)
    raw = bytearray(st.read(parity_name(pid)))
    raw[where] ^= 0x10
    with pytest.raises(CorruptionError, match="parity p"):
        parse_parity(bytes(raw), "p", pid)


def test_parity_of_another_pack_is_refused(tmp_path: Path) -> None:
    st = _storage(tmp_path)
    pack = b"x" * 100
    pid = blake3.blake3(pack).hexdigest()
    write_parity(st, G, pack, pid)
    with pytest.raises(CorruptionError, match="belongs to pack"):
        parse_parity(st.read(parity_name(pid)), "p", "ab" * 32)


@pytest.mark.parametrize(
    ("text", "m"), [("12.5", 2), ("25%", 4), ("6.25", 1), ("100", 16), ("0", None), ("none", None)]
)
def test_overhead_option(text: str, m: int | None) -> None:
    g = ParityGeometry.from_overhead(text)
    assert (g.parity_shards if g else None) == m


@pytest.mark.parametrize("text", ["1", "200", "lots", "-5"])
def test_bad_overhead_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--parity-overhead"):
        ParityGeometry.from_overhead(text)
