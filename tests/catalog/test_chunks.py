"""Chunk encoding: zstd when it helps, raw otherwise; every decode checks the id."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import blake3
import pytest

from catalog.errors import CorruptionError
from catalog.store.chunks import chunk_id, decode_chunk, encode_chunk
from catalog.store.format import CODEC_RAW, CODEC_ZSTD

RANDOM = random.Random(7).randbytes(65536)
TEXT = (b"the quick brown fox jumps over the lazy dog " * 2000)[:65536]


def test_chunk_id_is_blake3_of_plain_bytes() -> None:
    assert chunk_id(TEXT) == blake3.blake3(TEXT).digest()
    assert chunk_id(memoryview(TEXT)) == chunk_id(TEXT)
    assert len(chunk_id(b"")) == 32


def test_compressible_chunks_are_zstd_and_round_trip() -> None:
    codec, blob = encode_chunk(TEXT, 3)
    assert codec == CODEC_ZSTD
    assert len(blob) < len(TEXT) // 10
    assert decode_chunk(blob, codec, len(TEXT), chunk_id(TEXT), "w") == TEXT


def test_incompressible_chunks_stay_raw() -> None:
    codec, blob = encode_chunk(memoryview(RANDOM), 3)
    assert codec == CODEC_RAW
    assert blob == RANDOM
    assert decode_chunk(blob, codec, len(RANDOM), chunk_id(RANDOM), "w") == RANDOM


@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["zstd", "raw"])
def test_any_flipped_byte_is_detected(data: bytes) -> None:
    codec, blob = encode_chunk(data, 3)
    cid = chunk_id(data)
    for pos in [0, 1, len(blob) // 2, len(blob) - 1]:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x40
        with pytest.raises(CorruptionError, match=r"pack P offset 9: chunk [0-9a-f]{16} "):
            decode_chunk(bytes(damaged), codec, len(data), cid, "pack P offset 9")


def test_wrong_id_wrong_length_and_unknown_codec() -> None:
    codec, blob = encode_chunk(TEXT, 3)
    with pytest.raises(CorruptionError, match="does not match its id"):
        decode_chunk(blob, codec, len(TEXT), chunk_id(RANDOM), "w")
    with pytest.raises(CorruptionError, match="w: chunk"):
        decode_chunk(blob, codec, len(TEXT) - 1, chunk_id(TEXT), "w")
    with pytest.raises(CorruptionError, match="unknown codec 9"):
        decode_chunk(blob, 9, len(TEXT), chunk_id(TEXT), "w")
    with pytest.raises(CorruptionError, match="does not match its id"):
        decode_chunk(RANDOM[:-1], CODEC_RAW, len(RANDOM), chunk_id(RANDOM), "w")


def test_threads_encode_and_decode_independently() -> None:
    datas = [(b"%d " % i) * 5000 for i in range(64)]

    def work(d: bytes) -> bool:
        codec, blob = encode_chunk(d, 3)
        return decode_chunk(blob, codec, len(d), chunk_id(d), "w") == d

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, datas))


def test_encode_chunks_is_encode_chunk_for_each_slice() -> None:
    """Many chunks of one buffer in one zstd call: the same codec and bytes as one call each,
    raw where compressing does not help (a view of the input, not a copy)."""
    import os

    import numpy as np

    from catalog.store.chunks import encode_chunks

    parts = [b"a" * 65536, os.urandom(65536), b"log line 17\n" * 3000, os.urandom(1), b"z"]
    data = b"".join(parts)
    lengths = np.array([len(p) for p in parts], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    codecs, blobs = encode_chunks(memoryview(data), starts, lengths, 1)
    assert [(c, bytes(b)) for c, b in zip(codecs, blobs, strict=True)] == [
        encode_chunk(p, 1) for p in parts
    ]
    assert codecs == [CODEC_ZSTD, CODEC_RAW, CODEC_ZSTD, CODEC_RAW, CODEC_RAW]
    assert blobs[1].obj is data and bytes(blobs[1]) == parts[1]  # a view, not a copy
    # a subset of the chunks (the new ones), read-only input
    codecs2, blobs2 = encode_chunks(data, starts[[2, 0]], lengths[[2, 0]], 3)
    assert [bytes(b) for b in blobs2] == [
        encode_chunk(parts[2], 3)[1],
        encode_chunk(parts[0], 3)[1],
    ]
    assert encode_chunks(data, starts[:0], lengths[:0], 1) == ([], [])


def test_encode_chunks_without_the_batch_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """zstandard's CFFI backend (PyPy) has no multi_compress_to_buffer: one call per chunk,
    the same result."""
    import numpy as np

    from catalog.store import chunks

    data = TEXT + RANDOM
    starts, lengths = np.array([0, len(TEXT)]), np.array([len(TEXT), len(RANDOM)])
    want = chunks.encode_chunks(data, starts, lengths, 1)
    real = chunks._compressor

    class PerChunkOnly:
        def __init__(self, level: int) -> None:
            self.compress = real(level).compress

    monkeypatch.setattr(chunks, "_compressor", PerChunkOnly)
    got = chunks.encode_chunks(data, starts, lengths, 1)
    assert got[0] == want[0] == [CODEC_ZSTD, CODEC_RAW]
    assert [bytes(b) for b in got[1]] == [bytes(b) for b in want[1]]
