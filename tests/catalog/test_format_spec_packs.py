"""FORMAT.md's pack byte tables against the code, and packs written by the code (plain and
sealed) read with structs built from the spec alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import pytest
from spectables import (
    GOLDEN,
    STRUCTS,
    SpecKeys,
    SpecPack,
    example_hex,
    seal_overhead,
    spec_decode,
    spec_example,
    spec_struct,
    spec_table,
)

from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store import crypto, packs
from catalog.store import format as fmt
from catalog.store.chunks import chunk_id, encode_chunk

_PASSWORD = "spec pässword"  # not ASCII: section 21.2 says UTF-8


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_pack_struct_tables_match_code(name: str) -> None:
    spec, _rows = spec_struct(name)
    code = STRUCTS[name]
    assert spec.format == code.format
    assert spec.size == code.size


def test_pack_layout_table() -> None:
    rows = {r["Part"]: r for r in spec_table("pack-layout")}
    assert list(rows) == ["header", "blobs", "entry table", "trailer"]
    assert rows["header"]["Offset"] == "0"
    assert rows["header"]["Size"] == str(packs.PACK_HEADER_BYTES)
    assert rows["blobs"]["Offset"] == str(packs.PACK_HEADER_BYTES)
    trailer = packs.PACK_TRAILER_BYTES
    assert rows["entry table"]["Offset"] == f"file size − {trailer} − `entries_bytes`"
    entry, seal = packs.PACK_ENTRY_BYTES, crypto.SEAL_OVERHEAD_BYTES
    assert rows["entry table"]["Size"] == (
        f"`entries_bytes` = {entry} × `count`; sealed: {entry} × `count` + {seal}"
    )
    assert seal_overhead() == seal == crypto.AesGcmSealer.overhead
    assert rows["trailer"]["Offset"] == f"file size − {trailer}"
    assert rows["trailer"]["Size"] == str(trailer)


def test_pack_written_by_code_reads_by_spec(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    plain = [b"a" * 65536, bytes(range(256)) * 16, b"short tail \x00\x01"]
    encoded = [encode_chunk(p, fmt.DEFAULT_ZSTD_LEVEL) for p in plain]
    writer = packs.PackWriter(repo.storage)
    assert (
        writer.add_many(
            [chunk_id(p) for p in plain],
            [blob for _c, blob in encoded],
            [len(p) for p in plain],
            [c for c, _blob in encoded],
        )
        == []
    )
    (sealed,) = writer.close()
    name = packs.pack_name(sealed.pack_id)
    data = repo.storage.read(name)
    assert blake3.blake3(data).hexdigest() == sealed.pack_id
    assert len(data) == sealed.size
    pack = SpecPack(data)
    assert [e["chunk_id"] for e in pack.entries] == sealed.chunk_ids
    assert [e["offset"] for e in pack.entries] == sealed.offsets
    assert pack.entries[0]["offset"] == packs.PACK_HEADER_BYTES
    # Blobs are back to back and end where the table starts.
    ends = [e["offset"] + e["stored_len"] for e in pack.entries]
    assert [e["offset"] for e in pack.entries[1:]] == ends[:-1]
    assert ends[-1] == pack.table_start
    for e, p in zip(pack.entries, plain, strict=True):
        assert e["raw_len"] == len(p)
        assert spec_decode(pack.blob(data, e), e["codec"], e["raw_len"]) == p
    assert {e["codec"] for e in pack.entries} == {fmt.CODEC_RAW, fmt.CODEC_ZSTD}
    # The code's own parser agrees.
    assert [pe.offset for pe in packs.parse_pack(data, name)] == sealed.offsets


def test_sealed_pack_written_by_code_reads_by_spec(tmp_path: Path) -> None:
    """Sections 5.3, 6.3 and 6.5 for a sealed pack: flags 1, a table of 52 x count + 28 bytes
    opened with the header as associated data, blobs of codec output + 28 bytes opened with
    their chunk id, keyed chunk ids; the keys come from the key file by the spec alone."""
    repo = Repository.init(str(tmp_path / "repo"), password=_PASSWORD)
    keys = repo.sealer
    assert keys.encrypted
    rnd = random.Random(5)
    plain = [rnd.randbytes(65536), b"z" * 65536, rnd.randbytes(1000)]  # raw, zstd, raw tail
    ids = [chunk_id(p, keys) for p in plain]
    encoded = [encode_chunk(p, fmt.DEFAULT_ZSTD_LEVEL) for p in plain]
    writer = packs.PackWriter(repo.storage)
    writer.add_many(
        ids,
        [keys.seal_blob(blob, cid) for (_c, blob), cid in zip(encoded, ids, strict=True)],
        [len(p) for p in plain],
        [c for c, _blob in encoded],
    )
    (sealed,) = writer.close()
    data = repo.storage.read(packs.pack_name(sealed.pack_id))
    assert blake3.blake3(data).hexdigest() == sealed.pack_id

    (key_file,) = (tmp_path / "repo" / crypto.KEYS_PREFIX).iterdir()
    spec = SpecKeys(key_file.read_bytes(), _PASSWORD, repo.config.id)
    pack = SpecPack(
        data, lambda table, header: spec.open("pack entry table", table, {"pack header": header})
    )
    assert pack.header["flags"] == 1 and all(e["flags"] == 1 for e in pack.entries)
    assert len(pack.table) == 52 * len(plain) + seal_overhead()
    assert [e["chunk_id"] for e in pack.entries] == ids
    for e, p, (codec, blob) in zip(pack.entries, plain, encoded, strict=True):
        assert e["codec"] == codec and e["raw_len"] == len(p)
        assert e["stored_len"] == len(blob) + seal_overhead()
        opened = spec.open("blob", pack.blob(data, e), {"chunk id": e["chunk_id"]})
        got = spec_decode(opened, e["codec"], e["raw_len"])
        assert got == p and spec.chunk_id(got) == e["chunk_id"]
        assert spec.chunk_id(got) != blake3.blake3(got).digest()  # keyed, not plain BLAKE3
    # A raw sealed blob is longer than its chunk (section 5.2): chunk + 28.
    assert pack.entries[0]["codec"] == fmt.CODEC_RAW
    assert pack.entries[0]["stored_len"] == 65536 + seal_overhead()
    # The plain reading of section 6.5 refuses it; the code's reader with the keys accepts it.
    with pytest.raises(AssertionError):
        SpecPack(data)
    assert [pe.chunk_id for pe in packs.parse_pack(data, "sealed", sealer=keys)] == ids
    with pytest.raises(CorruptionError):
        packs.parse_pack(data, "sealed, read as plain")


def test_pack_examples() -> None:
    """Section 6.5's example bytes: the headers every pack starts with, and a golden trailer."""
    for name, flags in (("pack-header-plain", 0), ("pack-header-sealed", packs.PACK_FLAG_SEALED)):
        example = example_hex(spec_example(name))
        assert example == packs.PACK_HEADER.pack(packs.PACK_MAGIC, packs.PACK_VERSION, flags, 0)
    trailer = example_hex(spec_example("golden-pack-trailer"))
    (pack,) = (GOLDEN / "packs").glob("48/485f1c97*.pack")
    data = pack.read_bytes()
    assert data[-packs.PACK_TRAILER_BYTES :] == trailer
    assert SpecPack(data).trailer["count"] == 4


def _with_entries_hash(data: bytearray) -> bytes:
    """Recompute the trailer's entries_hash after an edit of the entry table."""
    trailer, _rows = spec_struct("pack-trailer")
    tpos = len(data) - trailer.size
    count, entries_bytes, _hash, end = trailer.unpack_from(data, tpos)
    table = bytes(data[tpos - entries_bytes : tpos])
    trailer.pack_into(data, tpos, count, entries_bytes, blake3.blake3(table).digest()[:16], end)
    return bytes(data)


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ("pack-header", "flags"),
        ("pack-header", "reserved"),
        ("pack-entry", "flags"),
        ("pack-entry", "reserved"),
    ],
)
def test_non_zero_flags_and_reserved_are_refused(tmp_path: Path, part: str, field: str) -> None:
    """FORMAT.md 6.5: a pack using flags or reserved fields needs a comb that knows them."""
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    writer = packs.PackWriter(repo.storage)
    plain = b"flags" * 1000
    writer.add_many([blake3.blake3(plain).digest()], [plain], [len(plain)], [fmt.CODEC_RAW])
    (sealed,) = writer.close()
    data = bytearray(repo.storage.read(packs.pack_name(sealed.pack_id)))
    packs.parse_pack(bytes(data), "clean")
    struct_, rows = spec_struct(part)
    row = next(r for r in rows if r["Field"] == field)
    base = 0
    if part == "pack-entry":  # the only entry: right before the trailer
        base = len(data) - spec_struct("pack-trailer")[0].size - struct_.size
    data[base + int(row["Offset"])] = 1
    with pytest.raises(CorruptionError):
        packs.parse_pack(_with_entries_hash(data), "flagged")


def test_codecs() -> None:
    spec = {int(r["Number"]): r["Name"] for r in spec_table("codecs")}
    assert spec == fmt.CODEC_NAMES
