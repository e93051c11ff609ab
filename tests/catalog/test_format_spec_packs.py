"""FORMAT.md's pack byte tables against the code, and a pack written by the code read with
structs built from the spec alone.
"""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
from spectables import (
    STRUCTS,
    SpecPack,
    spec_decode,
    spec_struct,
    spec_table,
)

from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store import format as fmt
from catalog.store import packs


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
    assert rows["entry table"]["Size"] == f"`entries_bytes` = {packs.PACK_ENTRY_BYTES} × `count`"
    assert rows["trailer"]["Offset"] == f"file size − {trailer}"
    assert rows["trailer"]["Size"] == str(trailer)


def test_pack_written_by_code_reads_by_spec(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    plain = [b"a" * 65536, bytes(range(256)) * 16, b"short tail \x00\x01"]
    from catalog.store.chunks import chunk_id, encode_chunk

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
