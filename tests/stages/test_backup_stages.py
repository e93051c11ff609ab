"""The backup stages one by one, then fused: reader -> chunker -> dedup -> compressor -> writer."""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
from combtest import ImageFactory, KiB

from catalog.errors import StageError
from catalog.store.chunks import decode_chunk
from catalog.store.format import CODEC_RAW, CODEC_ZSTD
from catalog.store.index import INDEX_SCHEMA, DedupIndex
from catalog.store.local import LocalStorage
from catalog.store.packs import pack_name, parse_pack
from stages.backup import (
    ZERO_ID,
    Chunker,
    Compressor,
    Deduplicator,
    PackTarget,
    Reader,
    Writer,
    backup_stages,
)
from stages.base import Fused
from stages.schemas import (
    CHUNKS,
    COMPRESSED,
    DEDUPED,
    EXTENTS,
    INDEX_PORT,
    MAIN_PORT,
    RAW,
    WRITTEN,
)
from stages.sources.image import ImageSource

C = 4096


def _extents(*pairs: tuple[int, int]) -> pa.Table:
    return pa.table(
        [pa.array([p[0] for p in pairs], pa.int64()), pa.array([p[1] for p in pairs], pa.int64())],
        schema=EXTENTS,
    )


def _raw(*rows: tuple[int, bytes]) -> pa.Table:
    return pa.table(
        [
            pa.array([r[0] for r in rows], pa.int64()),
            pa.array([r[1] for r in rows], pa.large_binary()),
        ],
        schema=RAW,
    )


def test_reader_reads_the_extents(make_image: ImageFactory) -> None:
    img = make_image(512 * KiB)
    img.random(0, 512 * KiB, seed=1)
    data = img.path.read_bytes()
    r = Reader(ImageSource(str(img.path)), max_batch_bytes=64 * KiB)
    r.setup()
    out = r.process(_extents((0, 8192), (100 * KiB, 200 * KiB), (508 * KiB, 4 * KiB)))[MAIN_PORT]
    assert out.schema.equals(RAW)
    assert out.column("offset").to_pylist() == [0, 100 * KiB, 508 * KiB]
    assert out.column("data").to_pylist() == [
        data[:8192],
        data[100 * KiB : 300 * KiB],
        data[508 * KiB :],
    ]
    assert r.bytes_read == 8192 + 204 * KiB
    # The next batch reuses the buffer: the previous output is not needed any more.
    again = r.process(_extents((4096, 4096)))[MAIN_PORT]
    assert again.column("data").to_pylist() == [data[4096:8192]]
    r.teardown()


def test_reader_failure_names_reader_and_extent(make_image: ImageFactory) -> None:
    img = make_image(256 * KiB)
    img.random(0, 256 * KiB)
    f = Fused([Reader(ImageSource(str(img.path)), 64 * KiB), Chunker(C)])
    f.setup()
    img.resize(100 * KiB)  # the source shrank after planning
    with pytest.raises(StageError) as err:
        f.process(_extents((64 * KiB, 64 * KiB), (192 * KiB, 64 * KiB)))
    msg = str(err.value)
    assert msg.startswith("stage reader failed on extent 65536+196608: ")
    assert str(img.path) in msg and "ended at offset 102400" in msg
    f.teardown()


def test_chunker_cuts_aligned_chunks_and_finds_zeros() -> None:
    rng = random.Random(3)
    a = rng.randbytes(C) + bytes(C) + rng.randbytes(C) + bytes(100)  # ends with a zero tail
    b = rng.randbytes(C + 7)  # a non-zero partial chunk at the end
    table = Chunker(C).process(_raw((0, a), (10 * C, b)))[MAIN_PORT]
    assert table.schema.equals(CHUNKS)
    rows = table.to_pylist()
    assert [r["offset"] for r in rows] == [0, C, 2 * C, 3 * C, 10 * C, 11 * C]
    assert [r["length"] for r in rows] == [C, C, C, 100, C, 7]
    assert [r["zero"] for r in rows] == [False, True, False, True, False, False]
    pieces = [a[:C], a[C : 2 * C], a[2 * C : 3 * C], a[3 * C :], b[:C], b[C:]]
    assert [r["data"] for r in rows] == pieces
    for r, piece in zip(rows, pieces, strict=True):
        expected = ZERO_ID if r["zero"] else blake3.blake3(piece).digest()
        assert r["chunk_id"] == expected


def test_chunker_zero_detection_when_full_chunks_are_not_contiguous() -> None:
    """A partial chunk between rows breaks the contiguous fast path: same answers."""
    rng = random.Random(4)
    rows_in = [
        (0, bytes(C) + b"\x01" * 50),
        (5 * C, bytes(C) + rng.randbytes(C)),
        (9 * C, bytes(C)),
    ]
    rows = Chunker(C).process(_raw(*rows_in))[MAIN_PORT].to_pylist()
    assert [(r["offset"], r["length"], r["zero"]) for r in rows] == [
        (0, C, True),
        (C, 50, False),
        (5 * C, C, True),
        (6 * C, C, False),
        (9 * C, C, True),
    ]


def test_chunker_detects_a_single_nonzero_byte_anywhere() -> None:
    for pos in (0, 1, C // 2, C - 8, C - 1):
        buf = bytearray(2 * C)
        buf[C + pos] = 1
        rows = Chunker(C).process(_raw((0, bytes(buf))))[MAIN_PORT].to_pylist()
        assert [r["zero"] for r in rows] == [True, False], pos


def _chunks(*datas: bytes) -> pa.Table:
    rows = [(i * C, d) for i, d in enumerate(datas)]
    return Chunker(C).process(_raw((0, b"".join(d for _, d in rows))))[MAIN_PORT]


def test_deduplicator_claims_only_new_nonzero_chunks() -> None:
    rng = random.Random(5)
    x, y = rng.randbytes(C), rng.randbytes(C)
    index = DedupIndex()
    d = Deduplicator(index)
    out = d.process(_chunks(x, bytes(C), y, x))[MAIN_PORT]
    assert out.schema.equals(DEDUPED)
    assert out.column("new").to_pylist() == [True, False, True, False]
    assert len(index) == 2  # the zero chunk never reached the index
    again = d.process(_chunks(y, rng.randbytes(C)))[MAIN_PORT]
    assert again.column("new").to_pylist() == [False, True]


def test_compressor_compresses_new_chunks_only() -> None:
    rng = random.Random(6)
    text = (b"compress me " * 1000)[:C]
    noise = rng.randbytes(C)
    deduped = Deduplicator(DedupIndex()).process(_chunks(text, noise, text, bytes(C)))[MAIN_PORT]
    out = Compressor(3).process(deduped)[MAIN_PORT]
    assert out.schema.equals(COMPRESSED)
    rows = out.to_pylist()
    assert [r["new"] for r in rows] == [True, True, False, False]
    assert rows[0]["codec"] == CODEC_ZSTD and len(rows[0]["blob"]) < C // 4
    assert rows[1]["codec"] == CODEC_RAW and rows[1]["blob"] == noise
    assert rows[2]["blob"] is None and rows[3]["blob"] is None


def test_writer_writes_packs_and_reports_index_rows(repo_path: Path) -> None:
    rng = random.Random(7)
    datas = [rng.randbytes(C) for _ in range(5)] + [(b"t%d " % i) * 2000 for i in range(5)]
    datas = [d[:C] for d in datas]
    compressed = Compressor(3).process(
        Deduplicator(DedupIndex()).process(_chunks(*datas))[MAIN_PORT]
    )[MAIN_PORT]
    w = Writer(PackTarget(str(repo_path), pack_target_bytes=3 * C))
    w.setup()
    ports = w.process(compressed)
    written = ports[MAIN_PORT]
    assert written.schema.equals(WRITTEN)
    stored = written.column("stored_len").to_pylist()
    assert stored[:5] == [C] * 5 and all(0 < s < C for s in stored[5:])
    index_rows = [ports[INDEX_PORT]] if INDEX_PORT in ports else []
    flushed = w.flush()
    index_rows.append(flushed[INDEX_PORT])
    w.teardown()
    index = pa.concat_tables(index_rows)
    assert index.schema.equals(INDEX_SCHEMA)
    assert sorted(index.column("chunk_id").to_pylist()) == sorted(
        blake3.blake3(d).digest() for d in datas
    )
    storage = LocalStorage(str(repo_path))
    assert len(storage.list("packs")) == len(set(index.column("pack").to_pylist())) > 1
    for row in index.to_pylist():
        blob = storage.read(pack_name(row["pack"]), row["offset"], row["stored_len"])
        plain = decode_chunk(blob, row["codec"], row["raw_len"], row["chunk_id"], "t")
        assert plain in datas
    assert storage.tmp_files() == []


def test_writer_teardown_discards_the_open_pack(repo_path: Path) -> None:
    compressed = Compressor(3).process(
        Deduplicator(DedupIndex()).process(_chunks(random.Random(8).randbytes(C)))[MAIN_PORT]
    )[MAIN_PORT]
    w = Writer(PackTarget(str(repo_path)))
    w.setup()
    assert INDEX_PORT not in w.process(compressed)
    w.teardown()
    storage = LocalStorage(str(repo_path))
    assert storage.list("packs") == [] and storage.tmp_files() == []


def test_fused_backup_stages_store_every_nonzero_chunk_once(
    repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(300 * KiB + 1234)
    img.random(0, 64 * KiB, seed=1)
    img.write(64 * KiB, img.path.read_bytes()[: 64 * KiB])  # a duplicate of the first 64 KiB
    img.compressible(200 * KiB, 50 * KiB)
    img.random(300 * KiB, 1234, seed=2)
    data = img.path.read_bytes()
    index = DedupIndex()
    f = Fused(
        backup_stages(
            ImageSource(str(img.path)), C, 128 * KiB, index, 3, PackTarget(str(repo_path))
        )
    )
    f.setup()
    ranges = [(0, 128 * KiB), (128 * KiB, 128 * KiB), (256 * KiB, len(data) - 256 * KiB)]
    written = [f.process(_extents(r))[MAIN_PORT] for r in ranges]
    sides = f.flush()
    f.teardown()
    rows = pa.concat_tables(written).to_pylist()
    assert [r["offset"] for r in rows] == list(range(0, len(data), C))
    for r in rows:
        piece = data[r["offset"] : r["offset"] + r["length"]]
        assert r["zero"] == (not any(piece))
        if not r["zero"]:
            assert r["chunk_id"] == blake3.blake3(piece).digest()
    nonzero = {r["chunk_id"] for r in rows if not r["zero"]}
    assert sum(r["new"] for r in rows) == len(nonzero) < sum(not r["zero"] for r in rows)
    index_rows = sides[INDEX_PORT]
    assert sorted(index_rows.column("chunk_id").to_pylist()) == sorted(nonzero)
    storage = LocalStorage(str(repo_path))
    (pack,) = storage.list("packs")
    assert len(parse_pack(storage.read(pack), pack)) == len(nonzero)
    assert np.all(np.array([r["stored_len"] for r in rows if r["new"]]) > 0)


def test_blob_column_seals_each_blob_into_its_place() -> None:
    """In an encrypted repository the compressor's column holds each new blob sealed in place
    (nonce, ciphertext, tag: 28 bytes more), rows without a blob stay null and empty, and every
    value opens with its own chunk id only."""
    from catalog.store.crypto import SEAL_OVERHEAD_BYTES, AesGcmSealer
    from stages.backup import _blob_column

    sealer = AesGcmSealer.from_master(bytes(range(64)))
    blobs: list[bytes | memoryview | None] = [b"a" * 100, None, memoryview(b"b" * 7), None, b"c"]
    ids = [blake3.blake3(bytes([i])).digest() for i in range(len(blobs))]
    col = _blob_column(blobs, sealer, pa.chunked_array([pa.array(ids, pa.binary(32))]))
    assert col.null_count == 2 and col.type == pa.large_binary()
    values = col.to_pylist()
    for blob, cid, value in zip(blobs, ids, values, strict=True):
        if blob is None:
            assert value is None
            continue
        assert len(value) == len(blob) + SEAL_OVERHEAD_BYTES
        assert bytes(sealer.open_blob(value, cid, "t")) == bytes(blob)
        with pytest.raises(Exception, match="authentication"):
            sealer.open_blob(value, ids[1], "t")
    assert _blob_column(blobs).to_pylist() == [
        None if b is None else bytes(b) for b in blobs
    ]  # plain: the blobs as they are
