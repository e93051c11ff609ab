"""Restore-side stages: plan coalesced pack reads, decode with id checks, sparse targets."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog.errors import CorruptionError, OutputError
from catalog.read.coalesce import GAP_BYTES, READ_BYTES
from catalog.store.chunks import chunk_id, encode_chunk
from catalog.store.index import INDEX_SCHEMA
from catalog.store.leaves import Leaf
from catalog.store.local import LocalStorage
from catalog.store.packs import PackWriter, pack_name
from catalog.store.storage import TMP_DIR
from stages.restore import execute_read, leaves_to_table, plan_reads
from stages.target import RestoreTarget

C = 4096


def _id(i: int) -> bytes:
    return bytes([i]) * 32


def _rows(pairs: list[tuple[int, bytes]]) -> pa.Table:
    return pa.table(
        {
            "offset": pa.array([p[0] for p in pairs], pa.int64()),
            "chunk_id": pa.array([p[1] for p in pairs], pa.binary(32)),
        }
    )


def _locations(rows: list[tuple[bytes, str, int, int]]) -> pa.Table:
    return pa.table(
        [
            pa.array([r[0] for r in rows], pa.binary(32)),
            pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.int64()),
            pa.array([r[3] for r in rows], pa.int32()),
            pa.array([C] * len(rows), pa.int32()),
            pa.array([0] * len(rows), pa.int8()),
        ],
        schema=INDEX_SCHEMA,
    )


def test_leaves_to_table_offsets() -> None:
    ids = np.arange(3 * 32, dtype=np.uint8).reshape(3, 32)
    leaves = [Leaf(np.array([0, 15], np.int16), ids[:2]), Leaf(np.array([3], np.int16), ids[2:])]
    t = leaves_to_table([0, 1000], leaves, C, 16)
    assert t.column("offset").to_pylist() == [0, 15 * C, (1000 * 16 + 3) * C]
    assert t.column("chunk_id").to_pylist() == [bytes(r) for r in ids]
    assert leaves_to_table([], [], C, 16).num_rows == 0


def test_plan_reads_coalesces_sorts_and_shares() -> None:
    locs = _locations(
        [
            (_id(1), "a" * 64, 16, 100),
            (_id(2), "a" * 64, 116, 100),
            (_id(3), "a" * 64, 116 + GAP_BYTES + 1000, 100),  # too far: new read
            (_id(4), "b" * 64, 16, 50),
        ]
    )
    rows = _rows([(0, _id(2)), (C, _id(4)), (2 * C, _id(1)), (3 * C, _id(3)), (9 * C, _id(2))])
    tasks = plan_reads(rows, locs, "point P")
    assert [(t.pack[0], t.start, t.end) for t in tasks] == [
        ("a", 16, 216),
        ("a", 116 + GAP_BYTES + 1000, 216 + GAP_BYTES + 1000),
        ("b", 16, 66),
    ]
    first = tasks[0].chunks
    assert [(c[0], c[4], sorted(c[5])) for c in first] == [
        (16, _id(1), [2 * C]),
        (116, _id(2), [0, 9 * C]),  # one decode, two places on disk
    ]


def test_plan_reads_caps_the_size_of_one_read() -> None:
    big = 4 * 1024 * 1024
    locs = _locations([(_id(i), "a" * 64, 16 + i * big, big) for i in range(6)])
    tasks = plan_reads(_rows([(i * C, _id(i)) for i in range(6)]), locs, "P")
    assert len(tasks) >= 2
    assert all(t.end - t.start <= READ_BYTES for t in tasks)
    assert sum(len(t.chunks) for t in tasks) == 6


def test_plan_reads_names_a_chunk_missing_from_the_index() -> None:
    locs = _locations([(_id(1), "a" * 64, 16, 100)])
    with pytest.raises(
        CorruptionError, match=f"point P: chunk {_id(9).hex()[:16]} is not in the index"
    ):
        plan_reads(_rows([(0, _id(1)), (C, _id(9))]), locs, "point P")


def _pack(tmp_path: Path, datas: list[bytes]) -> tuple[LocalStorage, pa.Table]:
    (tmp_path / TMP_DIR).mkdir(exist_ok=True)
    storage = LocalStorage(str(tmp_path))
    enc = [encode_chunk(d, 3) for d in datas]
    w = PackWriter(storage)
    w.add_many(
        [chunk_id(d) for d in datas],
        [b for _, b in enc],
        [len(d) for d in datas],
        [c for c, _ in enc],
    )
    (sp,) = w.close()
    locs = pa.table(
        [
            pa.array(sp.chunk_ids, pa.binary(32)),
            pa.array([sp.pack_id] * len(datas), pa.string()),
            pa.array(sp.offsets, pa.int64()),
            pa.array(sp.stored_lens, pa.int32()),
            pa.array(sp.raw_lens, pa.int32()),
            pa.array(sp.codecs, pa.int8()),
        ],
        schema=INDEX_SCHEMA,
    )
    return storage, locs


def _datas() -> list[bytes]:
    rng = random.Random(1)
    return [rng.randbytes(C), (b"zz" * C)[:C], rng.randbytes(C)]


def test_execute_read_writes_a_sparse_target(tmp_path: Path) -> None:
    datas = _datas()
    storage, locs = _pack(tmp_path, datas)
    size = 1024 * C
    layout = [(0, 0), (500 * C, 1), (1000 * C, 2), (1023 * C, 0)]
    rows = _rows([(off, chunk_id(datas[i])) for off, i in layout])
    out = tmp_path / "out.img"
    target = RestoreTarget(str(out), size)
    written = sum(execute_read(storage, t, target) for t in plan_reads(rows, locs, "P"))
    target.close()
    assert written == 4 * C
    got = out.read_bytes()
    expected = bytearray(size)
    for off, i in layout:
        expected[off : off + C] = datas[i]
    assert got == bytes(expected)
    assert os.stat(out).st_blocks * 512 <= 64 * C


def test_execute_read_clips_the_last_chunk_to_the_target_size(tmp_path: Path) -> None:
    datas = _datas()
    storage, locs = _pack(tmp_path, datas)
    out = tmp_path / "out.img"
    target = RestoreTarget(str(out), C + 100)
    (task,) = plan_reads(_rows([(C, chunk_id(datas[0]))]), locs, "P")
    execute_read(storage, task, target)
    target.close()
    assert out.read_bytes() == bytes(C) + datas[0][:100]


def test_execute_read_reports_pack_path_and_offset_of_damage(tmp_path: Path) -> None:
    datas = _datas()
    storage, locs = _pack(tmp_path, datas)
    row = locs.to_pylist()[1]
    path = storage.path(pack_name(row["pack"]))
    with open(path, "r+b") as fh:
        fh.seek(row["offset"] + row["stored_len"] // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x20]))
    tasks = plan_reads(_rows([(0, chunk_id(datas[1]))]), locs, "P")
    with pytest.raises(CorruptionError, match=f"pack {path} offset {row['offset']}: chunk"):
        execute_read(storage, tasks[0], None)


def test_execute_read_of_a_truncated_pack(tmp_path: Path) -> None:
    datas = _datas()
    storage, locs = _pack(tmp_path, datas)
    row = locs.to_pylist()[2]
    path = storage.path(pack_name(row["pack"]))
    with open(path, "r+b") as fh:
        fh.truncate(row["offset"] + 10)
    tasks = plan_reads(_rows([(0, chunk_id(datas[2]))]), locs, "P")
    with pytest.raises(CorruptionError, match=f"pack {path} is truncated"):
        execute_read(storage, tasks[0], None)


def test_restore_target_errors(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write restore target"):
        RestoreTarget(str(tmp_path / "no" / "such" / "dir" / "x.img"), 10)
    t = RestoreTarget(str(tmp_path / "x.img"), 3 * C)
    t.zero(0, C)  # a file needs nothing: it stays a hole
    t.close()
    assert (tmp_path / "x.img").read_bytes() == bytes(3 * C)


def test_plan_reads_refuses_a_chunk_of_the_wrong_length_for_its_place() -> None:
    locs = _locations([(_id(1), "a" * 64, 16, 100)])  # raw_len C
    ok = plan_reads(_rows([(0, _id(1))]), locs, "P", C, 10 * C)
    assert len(ok) == 1
    # The last chunk of a disk of 10 C + 100 bytes must be 100 bytes long, not C.
    with pytest.raises(CorruptionError, match=f"chunk {_id(1).hex()[:16]} at offset {10 * C}"):
        plan_reads(_rows([(10 * C, _id(1))]), locs, "P", C, 10 * C + 100)


def test_write_pieces_runs_gaps_and_clipping(tmp_path: Path) -> None:
    out = tmp_path / "t.img"
    size = 2000 * 16 + 5
    target = RestoreTarget(str(out), size)
    pieces = [(i * 16, bytes([i % 200 + 1]) * 16) for i in range(2000) if i % 700 != 5]
    pieces.append((2000 * 16, b"\x09" * 16))  # only 5 bytes of it fit
    expected = bytearray(size)
    for off, data in pieces:
        expected[off : off + len(data)] = data[: size - off]
    shuffled = pieces[::-1]
    target.write_pieces(shuffled)
    target.close()
    assert out.read_bytes() == bytes(expected)
