"""Packs: content-named, self-describing (footer last); damage is a CorruptionError with offset."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from catalog.errors import CorruptionError
from catalog.store.chunks import chunk_id, encode_chunk
from catalog.store.local import LocalStorage
from catalog.store.packs import (
    PACK_ENTRY,
    PACK_ENTRY_BYTES,
    PACK_HEADER_BYTES,
    PACK_TRAILER,
    PACK_TRAILER_BYTES,
    PackWriter,
    SealedPack,
    pack_name,
    parse_pack,
)
from catalog.store.storage import TMP_DIR


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def _chunks(
    n: int, seed: int = 1
) -> tuple[list[bytes], list[bytes], list[int], list[int], list[bytes]]:
    rng = random.Random(seed)
    plain = [rng.randbytes(3000 + i) if i % 2 else (b"abc" * 2000)[: 3000 + i] for i in range(n)]
    encoded = [encode_chunk(p, 3) for p in plain]
    ids = [chunk_id(p) for p in plain]
    return ids, [b for _, b in encoded], [len(p) for p in plain], [c for c, _ in encoded], plain


def _write_pack(storage: LocalStorage, n: int = 5) -> tuple[SealedPack, bytes]:
    ids, blobs, raw_lens, codecs, _ = _chunks(n)
    w = PackWriter(storage)
    assert w.add_many(ids, blobs, raw_lens, codecs) == []
    (sealed,) = w.close()
    return sealed, storage.read(pack_name(sealed.pack_id))


def test_pack_is_named_by_its_content_and_parses_back(storage: LocalStorage) -> None:
    ids, blobs, raw_lens, codecs, _ = _chunks(5)
    sealed, data = _write_pack(storage)
    assert sealed.pack_id == blake3.blake3(data).hexdigest()
    assert sealed.size == len(data)
    assert storage.list("packs") == [pack_name(sealed.pack_id)]
    assert pack_name(sealed.pack_id).startswith(f"packs/{sealed.pack_id[:2]}/")
    entries = parse_pack(data, "p")
    assert [e.chunk_id for e in entries] == ids == sealed.chunk_ids
    assert [e.offset for e in entries] == sealed.offsets
    assert entries[0].offset == PACK_HEADER_BYTES
    for e, blob, raw_len, codec in zip(entries, blobs, raw_lens, codecs, strict=True):
        assert data[e.offset : e.offset + e.stored_len] == blob
        assert (e.raw_len, e.codec) == (raw_len, codec)
    table_start = len(data) - PACK_TRAILER_BYTES - 5 * PACK_ENTRY_BYTES
    assert entries[-1].offset + entries[-1].stored_len == table_start
    assert storage.tmp_files() == []


def test_pack_seals_at_target_size(storage: LocalStorage) -> None:
    ids, blobs, raw_lens, codecs, _ = _chunks(10)
    w = PackWriter(storage, target_bytes=4000)
    sealed = w.add_many(ids, blobs, raw_lens, codecs)
    sealed += w.close()
    assert len(sealed) >= 3
    assert [c for sp in sealed for c in sp.chunk_ids] == ids
    assert len(storage.list("packs")) == len(sealed)
    for sp in sealed:
        assert [e.chunk_id for e in parse_pack(storage.read(pack_name(sp.pack_id)), "p")] == (
            sp.chunk_ids
        )


def test_close_without_data_and_abort_leave_nothing(storage: LocalStorage) -> None:
    w = PackWriter(storage)
    assert w.close() == []
    ids, blobs, raw_lens, codecs, _ = _chunks(3)
    w.add_many(ids, blobs, raw_lens, codecs)
    assert len(storage.tmp_files()) == 1
    w.abort()
    assert storage.tmp_files() == []
    assert storage.list("packs") == []


def test_truncated_pack(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    with pytest.raises(CorruptionError, match="pack X is truncated"):
        parse_pack(data[:40], "X")
    # Cut in the middle: the trailer magic is then garbage.
    with pytest.raises(CorruptionError, match="pack X has a bad trailer at offset"):
        parse_pack(data[: len(data) - 7], "X")


def test_bad_header_magic_and_version(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    with pytest.raises(CorruptionError, match="bad header magic at offset 0"):
        parse_pack(b"X" + data[1:], "X")
    bad_version = data[:8] + (7).to_bytes(2, "little") + data[10:]
    with pytest.raises(CorruptionError, match="unknown pack version 7"):
        parse_pack(bad_version, "X")


def test_flipped_entry_table_byte_names_the_table_offset(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    start = len(data) - PACK_TRAILER_BYTES - 5 * PACK_ENTRY_BYTES
    damaged = bytearray(data)
    damaged[start + 40] ^= 0x10
    with pytest.raises(CorruptionError, match=f"corrupt entry table at offset {start}"):
        parse_pack(bytes(damaged), "X")


def test_inconsistent_entry_count(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    tpos = len(data) - PACK_TRAILER_BYTES
    count, tlen, thash, magic = PACK_TRAILER.unpack_from(data, tpos)
    damaged = data[:tpos] + PACK_TRAILER.pack(count + 1, tlen, thash, magic)
    with pytest.raises(CorruptionError, match=f"inconsistent entry table at offset {tpos}"):
        parse_pack(damaged, "X")
    huge = data[:tpos] + PACK_TRAILER.pack(10_000, 10_000 * PACK_ENTRY_BYTES, thash, magic)
    with pytest.raises(CorruptionError, match="inconsistent entry table"):
        parse_pack(huge, "X")


def test_entry_pointing_outside_the_data_area(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    tpos = len(data) - PACK_TRAILER_BYTES
    count, tlen, _thash, magic = PACK_TRAILER.unpack_from(data, tpos)
    start = tpos - tlen
    table = bytearray(data[start:tpos])
    cid, off, slen, rlen, codec, f, r = PACK_ENTRY.unpack_from(table, 2 * PACK_ENTRY_BYTES)
    PACK_ENTRY.pack_into(table, 2 * PACK_ENTRY_BYTES, cid, off, slen + 10**6, rlen, codec, f, r)
    trailer = PACK_TRAILER.pack(count, tlen, blake3.blake3(bytes(table)).digest()[:16], magic)
    damaged = data[:start] + bytes(table) + trailer
    with pytest.raises(CorruptionError, match="entry 2 points outside the data area"):
        parse_pack(damaged, "X")


def test_damaged_chunk_bytes_are_not_a_structure_error(storage: LocalStorage) -> None:
    """parse_pack checks structure only; chunk contents are checked by decode (ids)."""
    sealed, data = _write_pack(storage)
    damaged = bytearray(data)
    damaged[sealed.offsets[1] + 5] ^= 0xFF
    assert len(parse_pack(bytes(damaged), "X")) == 5
    assert os.path.exists(storage.path(pack_name(sealed.pack_id)))


def test_reserved_header_and_entry_flags_are_refused(storage: LocalStorage) -> None:
    _, data = _write_pack(storage)
    flagged = data[:10] + (2).to_bytes(2, "little") + data[12:]
    with pytest.raises(CorruptionError, match="header flags 0x2"):
        parse_pack(flagged, "X")
    sealed = data[:10] + (1).to_bytes(2, "little") + data[12:]  # sealed, in a plain repository
    with pytest.raises(CorruptionError, match="sealed .encrypted., unlike the repository"):
        parse_pack(sealed, "X")
    tpos = len(data) - PACK_TRAILER_BYTES
    count, tlen, _thash, magic = PACK_TRAILER.unpack_from(data, tpos)
    start = tpos - tlen
    table = bytearray(data[start:tpos])
    cid, off, slen, rlen, codec, _f, r = PACK_ENTRY.unpack_from(table, 0)
    PACK_ENTRY.pack_into(table, 0, cid, off, slen, rlen, codec, 4, r)
    trailer = PACK_TRAILER.pack(count, tlen, blake3.blake3(bytes(table)).digest()[:16], magic)
    with pytest.raises(CorruptionError, match="entry 0 uses flags"):
        parse_pack(data[:start] + bytes(table) + trailer, "X")
