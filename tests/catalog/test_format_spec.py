"""FORMAT.md and the code must agree: every machine-checked table against the code it describes.

Tables are found by a marker line ``<!-- spec:NAME -->`` directly above them. Beyond comparing
constants, two tests use the spec alone: a pack written by the code is parsed with structs built
from the spec's byte tables, and the golden repository's images are rebuilt with nothing but the
rules of FORMAT.md (pyarrow, blake3 and zstandard, no comb reader code).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import json
import re
import struct
import types
import typing
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from catalog import format as fmt
from catalog import index, manifest, packs, points
from catalog.errors import CorruptionError, RepositoryError
from catalog.format import Features, RepoConfig, parse_config
from catalog.points import PointStats, RecoveryPoint
from catalog.repo import Repository
from catalog.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "FORMAT.md"
GOLDEN = ROOT / "tests" / "data" / "golden-v1"
GOLDEN_EXPECTED = ROOT / "tests" / "data" / "golden-v1.json"

MARKERS = {
    "names",
    "config",
    "codecs",
    "pack-layout",
    "pack-header",
    "pack-entry",
    "pack-trailer",
    "schema-index",
    "schema-leaves",
    "schema-root",
    "point",
    "constants",
}

# ---------------------------------------------------------------------------------------------
# Reading the spec's tables


def _cells(line: str) -> list[str]:
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), f"not a table row: {line!r}"
    return [c.strip() for c in inner[1:-1].split("|")]


def _unquote(cell: str) -> str:
    """`x` -> x (a cell that is one code span); anything else unchanged."""
    if len(cell) >= 2 and cell[0] == cell[-1] == "`" and cell.count("`") == 2:
        return cell[1:-1]
    return cell


def spec_table(name: str) -> list[dict[str, str]]:
    """The rows of the table under ``<!-- spec:NAME -->`` as dicts keyed by header."""
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    marker = f"<!-- spec:{name} -->"
    at = [i for i, line in enumerate(lines) if line.strip() == marker]
    assert len(at) == 1, f"FORMAT.md must hold exactly one {marker} (found {len(at)})"
    header = _cells(lines[at[0] + 1])
    assert all(set(c) <= set("-: ") for c in _cells(lines[at[0] + 2])), f"{name}: no separator"
    rows = []
    for line in lines[at[0] + 3 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"{name}: row has {len(cells)} cells: {line!r}"
        rows.append({h: _unquote(c) for h, c in zip(header, cells, strict=True)})
    assert rows, f"{name}: empty table"
    return rows


def test_every_marker_has_a_table() -> None:
    found = set(re.findall(r"<!-- spec:([a-z0-9-]+) -->", SPEC.read_text(encoding="utf-8")))
    assert found == MARKERS
    for name in sorted(MARKERS):
        spec_table(name)


# ---------------------------------------------------------------------------------------------
# Constants


def _code_object(path: str) -> Any:
    module, attr = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def test_constants_match_code() -> None:
    for row in spec_table("constants"):
        expected = ast.literal_eval(row["Value"])
        actual = _code_object(row["Code"])
        assert actual == expected, f"{row['Code']}: code has {actual!r}, FORMAT.md {expected!r}"
        if not isinstance(expected, set):
            assert type(actual) is type(expected), row["Code"]


@pytest.mark.parametrize(
    "module",
    [
        "catalog.format",
        "catalog.packs",
        "catalog.points",
        "catalog.index",
        "catalog.manifest",
        "catalog.parquet_io",
        "catalog.storage",
        "catalog.repo",
    ],
)
def test_every_format_constant_is_in_the_spec(module: str) -> None:
    """A new constant in a format module must be added to FORMAT.md's constants table."""
    documented = {row["Code"].rsplit(".", 1)[1] for row in spec_table("constants")}
    mod = importlib.import_module(module)
    plain = (int, str, bytes, frozenset, tuple)
    names = {
        k
        for k, v in vars(mod).items()
        if k.isupper() and not k.startswith("_") and type(v) in plain
    }
    assert names <= documented, f"{module}: not in FORMAT.md: {sorted(names - documented)}"


# ---------------------------------------------------------------------------------------------
# Packs

_INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
_STRUCTS = {
    "pack-header": packs.PACK_HEADER,
    "pack-entry": packs.PACK_ENTRY,
    "pack-trailer": packs.PACK_TRAILER,
}


def spec_struct(name: str) -> tuple[struct.Struct, list[dict[str, str]]]:
    """A little-endian struct built from a byte table, after checking its offsets and sizes."""
    rows = spec_table(name)
    codes = []
    pos = 0
    for row in rows:
        typ, size, offset = row["Type"], int(row["Size"]), int(row["Offset"])
        assert offset == pos, f"{name}.{row['Field']}: offset {offset}, expected {pos}"
        m = re.fullmatch(r"byte\[(\d+)\]", typ)
        code = f"{m.group(1)}s" if m else _INT_CODES[typ]
        assert struct.calcsize("<" + code) == size, f"{name}.{row['Field']}: size vs type"
        codes.append(code)
        pos += size
    return struct.Struct("<" + "".join(codes)), rows


def _spec_value(cell: str) -> Any:
    value = ast.literal_eval(cell)
    return value.encode() if isinstance(value, str) else value


def _check_values(rows: list[dict[str, str]], records: list[dict[str, Any]]) -> None:
    """Fields whose 'Value' cell is filled in must hold exactly that value."""
    for row in rows:
        if row["Value"]:
            for rec in records:
                assert rec[row["Field"]] == _spec_value(row["Value"]), row["Field"]


@pytest.mark.parametrize("name", sorted(_STRUCTS))
def test_pack_struct_tables_match_code(name: str) -> None:
    spec, _rows = spec_struct(name)
    code = _STRUCTS[name]
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


class SpecPack:
    """A pack parsed with nothing but FORMAT.md's byte tables."""

    def __init__(self, data: bytes) -> None:
        header, hrows = spec_struct("pack-header")
        entry, erows = spec_struct("pack-entry")
        trailer, trows = spec_struct("pack-trailer")
        self.header = dict(
            zip([r["Field"] for r in hrows], header.unpack_from(data, 0), strict=True)
        )
        tpos = len(data) - trailer.size
        self.trailer = dict(
            zip([r["Field"] for r in trows], trailer.unpack_from(data, tpos), strict=True)
        )
        start = tpos - self.trailer["entries_bytes"]
        self.table = data[start:tpos]
        self.table_start = start
        names = [r["Field"] for r in erows]
        self.entries = [
            dict(zip(names, entry.unpack_from(self.table, i * entry.size), strict=True))
            for i in range(self.trailer["count"])
        ]
        _check_values(hrows, [self.header])
        _check_values(erows, self.entries)
        _check_values(trows, [self.trailer])
        assert self.trailer["entries_bytes"] == entry.size * self.trailer["count"]
        assert blake3.blake3(self.table).digest()[:16] == self.trailer["entries_hash"]
        for e in self.entries:
            assert header.size <= e["offset"] and e["offset"] + e["stored_len"] <= start

    def blob(self, data: bytes, e: dict[str, Any]) -> bytes:
        return data[e["offset"] : e["offset"] + e["stored_len"]]


def _decode(blob: bytes, codec: int, raw_len: int) -> bytes:
    names = {int(r["Number"]): r["Name"] for r in spec_table("codecs")}
    if names[codec] == "zstd":
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=raw_len)
    assert names[codec] == "raw"
    return blob


def test_pack_written_by_code_reads_by_spec(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"))
    plain = [b"a" * 65536, bytes(range(256)) * 16, b"short tail \x00\x01"]
    from catalog.chunks import chunk_id, encode_chunk

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
        assert _decode(pack.blob(data, e), e["codec"], e["raw_len"]) == p
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
    repo = Repository.init(str(tmp_path / "repo"))
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


# ---------------------------------------------------------------------------------------------
# Parquet schemas

_SCHEMAS = {
    "schema-index": (index.INDEX_SCHEMA, "index"),
    "schema-leaves": (manifest.LEAF_SCHEMA, "manifests/leaves"),
    "schema-root": (manifest.ROOT_SCHEMA, "manifests/roots"),
}


@pytest.mark.parametrize("name", sorted(_SCHEMAS))
def test_parquet_schemas_match_code(name: str) -> None:
    schema, _dir = _SCHEMAS[name]
    spec = [(r["Column"], r["Arrow type"], r["Nullable"]) for r in spec_table(name)]
    code = [(f.name, str(f.type), "yes" if f.nullable else "no") for f in schema]
    assert spec == code


def _data_page_encodings(col: Any) -> set[str]:
    """A column chunk's data page encodings: without the RLE of its definition levels and the
    PLAIN of its dictionary page."""
    found = set(col.encodings) - {"RLE"}
    if col.has_dictionary_page:
        found.discard("PLAIN")
    return found


def _check_parquet_file(path: Path, name: str) -> None:
    """Columns, Parquet physical types, encodings and Arrow schema as the spec's table says."""
    schema, _directory = _SCHEMAS[name]
    rows = spec_table(name)
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.equals(schema), path.name
    md = pf.metadata
    assert md.num_row_groups > 0, path.name
    for i, row in enumerate(rows):
        col = pf.schema.column(i)
        m = re.fullmatch(r"([A-Z_0-9]+)(?:\((\d+)\))?", row["Parquet type"])
        assert m, row["Parquet type"]
        assert col.name == row["Column"]
        assert col.physical_type == m.group(1), f"{path.name}: {col.name}"
        if m.group(2):
            assert col.length == int(m.group(2))
        for rg in range(md.num_row_groups):
            chunk = md.row_group(rg).column(i)
            assert chunk.compression == "ZSTD", f"{path.name}: {col.name}"
            assert chunk.is_stats_set, f"{path.name}: {col.name}"
            assert _data_page_encodings(chunk) == {row["Encoding"]}, f"{path.name}: {col.name}"
            assert chunk.has_dictionary_page == (row["Encoding"] == "RLE_DICTIONARY")


def _check_page_checksums(path: Path) -> None:
    """Every column chunk's pages carry a CRC: a flipped byte in a page body is found by the
    checksum, before decompression."""
    data = path.read_bytes()
    pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    md = pq.ParquetFile(path).metadata
    for rg in range(md.num_row_groups):
        for i in range(md.num_columns):
            chunk = md.row_group(rg).column(i)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            last = start + chunk.total_compressed_size - 1  # inside the last page's body
            damaged = bytearray(data)
            damaged[last] ^= 0x01
            with pytest.raises((OSError, pa.ArrowException), match="CRC"):
                pq.read_table(pa.BufferReader(bytes(damaged)), page_checksum_verification=True)


@pytest.mark.parametrize("name", sorted(_SCHEMAS))
def test_parquet_types_of_golden_files(name: str) -> None:
    """The files on disk have the spec's columns, types, encodings and page checksums."""
    _schema, directory = _SCHEMAS[name]
    files = sorted((GOLDEN / directory).glob("*.parquet"))
    assert files
    for path in files:
        _check_parquet_file(path, name)
        _check_page_checksums(path)


def test_parquet_files_written_by_code_follow_the_spec(tmp_path: Path) -> None:
    """The current writers (not only the frozen golden files) use the spec's encodings."""
    storage = LocalStorage(str(tmp_path))
    ids = [blake3.blake3(bytes([i])).digest() for i in range(3)]
    seg = index.IndexSegmentWriter(storage)
    seg.add(
        pa.table(
            {
                "chunk_id": pa.array(ids, pa.binary(32)),
                "pack": pa.array(["ab" * 32] * 3),
                "offset": pa.array([16, 116, 216], pa.int64()),
                "stored_len": pa.array([100, 100, 90], pa.int32()),
                "raw_len": pa.array([65536, 65536, 4000], pa.int32()),
                "codec": pa.array([1, 1, 0], pa.int8()),
            }
        )
    )
    seg_id, _size = seg.commit()
    writer = manifest.ManifestWriter(storage)
    id_rows = np.frombuffer(b"".join(ids), np.uint8).reshape(3, 32)
    writer.add_leaf(0, manifest.Leaf(np.array([0, 1, 5], np.int16), id_rows))
    writer.add_ref(manifest.LeafRef(1, "cd" * 32, 0))
    leaves_id, root_id, _written = writer.commit()
    assert seg_id is not None and leaves_id is not None
    for name, file_id in (
        ("schema-index", seg_id),
        ("schema-leaves", leaves_id),
        ("schema-root", root_id),
    ):
        path = tmp_path / _SCHEMAS[name][1] / f"{file_id}.parquet"
        assert blake3.blake3(path.read_bytes()).hexdigest() == file_id
        _check_parquet_file(path, name)
        _check_page_checksums(path)


# ---------------------------------------------------------------------------------------------
# JSON documents


def _json_type(hint: Any) -> str:
    if hint is str:
        return "string"
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if dataclasses.is_dataclass(hint):
        return "object"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args == (str, ...):
        return "array of strings"
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_json_type(inner)} or null"
    raise AssertionError(f"no JSON type for {hint!r}")


def _fields_of(cls: type, nested: dict[str, type]) -> dict[str, str]:
    """{"field": json type, "nested.field": json type} of a dataclass document."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        out[name] = _json_type(hint)
        if name in nested:
            for sub, sub_hint in typing.get_type_hints(nested[name]).items():
                out[f"{name}.{sub}"] = _json_type(sub_hint)
    return out


def _keys_of(doc: dict[str, Any]) -> set[str]:
    out = set()
    for k, v in doc.items():
        out.add(k)
        if isinstance(v, dict):
            out |= {f"{k}.{sub}" for sub in v}
    return out


def test_config_fields_match_code() -> None:
    spec = {r["Field"]: r["JSON type"] for r in spec_table("config")}
    assert spec == _fields_of(RepoConfig, {"features": Features})


def test_config_json_has_the_spec_fields() -> None:
    spec = {r["Field"] for r in spec_table("config")}
    new = json.loads(RepoConfig.new().to_json())
    assert _keys_of(new) == spec
    assert _keys_of(json.loads((GOLDEN / fmt.CONFIG_NAME).read_bytes())) == spec
    assert new["chunk_size"] == fmt.DEFAULT_CHUNK_SIZE_BYTES
    assert new["leaf_chunks"] == fmt.DEFAULT_LEAF_CHUNKS
    assert new["features"] == {"compat": [], "ro_compat": [], "incompat": []}


def _config(**changes: Any) -> bytes:
    doc = json.loads(RepoConfig.new().to_json())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_size": fmt.MIN_CHUNK_SIZE_BYTES},
        {"chunk_size": fmt.MAX_CHUNK_SIZE_BYTES},
        {"leaf_chunks": 1},
        {"leaf_chunks": fmt.MAX_LEAF_CHUNKS},
        {"features": {"compat": ["later-hint"], "ro_compat": [], "incompat": []}},
        {"added_by_a_later_comb": True},
    ],
)
def test_config_values_the_spec_allows_are_opened(changes: dict[str, Any]) -> None:
    config = parse_config(_config(**changes), "config.json")
    assert not config.read_only


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_size": fmt.MIN_CHUNK_SIZE_BYTES // 2},
        {"chunk_size": fmt.MAX_CHUNK_SIZE_BYTES * 2},
        {"chunk_size": 3 * 16384},
        {"leaf_chunks": 0},
        {"leaf_chunks": fmt.MAX_LEAF_CHUNKS + 1},
        {"hash": "sha256"},
        {"version": fmt.REPO_FORMAT_VERSION + 1},
        {"features": {"compat": [], "ro_compat": [], "incompat": ["later-must-know"]}},
    ],
)
def test_config_values_the_spec_forbids_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(RepositoryError):
        parse_config(_config(**changes), "config.json")


def test_unknown_ro_compat_feature_opens_read_only() -> None:
    feats = {"compat": [], "ro_compat": ["later-writers-must-know"], "incompat": []}
    assert parse_config(_config(features=feats), "config.json").read_only


def test_point_fields_match_code() -> None:
    """The table lists the document's fields: every field of RecoveryPoint but the id, which is
    not in the document but names its file."""
    spec = {r["Field"]: r["JSON type"] for r in spec_table("point")}
    code = _fields_of(RecoveryPoint, {"stats": PointStats})
    assert code.pop("id") == "string"
    assert spec == code


def _golden_points() -> list[Path]:
    found = sorted((GOLDEN / points.POINTS_PREFIX).glob("*.json"))
    assert len(found) == 3
    return found


def test_point_documents_have_the_spec_fields() -> None:
    spec = {r["Field"] for r in spec_table("point")}
    for path in _golden_points():
        assert _keys_of(json.loads(path.read_bytes())) == spec, path.name


def spec_point_id(raw: bytes) -> str:
    """FORMAT.md section 9: BLAKE3-256 of the document's exact bytes, first 16 hex digits."""
    return blake3.blake3(raw).hexdigest()[: points.POINT_ID_HEX]


def _made_point() -> RecoveryPoint:
    return RecoveryPoint(
        source="disk é ☃",
        source_path="/dev/disk",
        time="2026-01-02T03:04:05.000006+00:00",
        size=12345,
        chunk_size=65536,
        leaf_chunks=16,
        root="ab" * 32,
        leaves=None,
        parent=None,
        index_segment=None,
        engine="local",
        mode="full",
        stats=PointStats(seconds=1e-05),
    )


def test_point_id_rule(tmp_path: Path) -> None:
    for path in _golden_points():
        assert spec_point_id(path.read_bytes()) == path.stem
    storage = LocalStorage(str(tmp_path))
    made = points.commit_point(storage, _made_point())
    raw = storage.read(points.point_name(made.id))
    assert spec_point_id(raw) == made.id
    # What writers write (section 9); the id is not a field of the document.
    body = json.loads(raw)
    assert "id" not in body
    assert raw == (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def test_point_readers_follow_the_spec() -> None:
    """Section 9: the hash is over the bytes as stored, whatever their layout; unknown fields
    are ignored; a name that does not match the bytes is damage."""
    raw = _golden_points()[0].read_bytes()
    doc = json.loads(raw)
    expected = points.parse_point(raw, "golden", spec_point_id(raw))
    doc["added_by_a_later_comb"] = {"x": 1}
    doc["stats"]["later_stat"] = 2
    for other in (
        json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(),
        json.dumps(dict(reversed(doc.items())), indent=4).encode(),
    ):
        got = points.parse_point(other, "reformatted", spec_point_id(other))
        assert dataclasses.replace(got, id=expected.id) == expected
        with pytest.raises(CorruptionError, match="does not match"):
            points.parse_point(other, "misnamed", expected.id)
    del doc["change_id"]
    for k in list(doc["stats"]):
        del doc["stats"][k]
    minimal = json.dumps(doc).encode()
    got = points.parse_point(minimal, "minimal", spec_point_id(minimal))
    assert got.change_id is None and got.stats == PointStats()
    for required in ("format", "version", "stats", "root", "size", "mode"):
        broken = {k: v for k, v in doc.items() if k != required}
        raw_broken = json.dumps(broken).encode()
        with pytest.raises(CorruptionError):
            points.parse_point(raw_broken, "broken", spec_point_id(raw_broken))


def test_point_example_is_a_golden_document() -> None:
    """The example of section 9 is a golden point document byte for byte."""
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 9. Recovery point documents") : text.index("## 10. Constants")]
    m = re.search(
        r"`points/([0-9a-f]{16})\.json`, byte for byte.*?```json\n(.*?)```", section, re.S
    )
    assert m, "section 9 must show a golden point document in a json code block"
    example = m.group(2).encode()
    assert spec_point_id(example) == m.group(1)
    assert (GOLDEN / points.POINTS_PREFIX / f"{m.group(1)}.json").read_bytes() == example


# ---------------------------------------------------------------------------------------------
# Names and content addressing

_EXAMPLE_ID = "0123456789abcdef" * 4
_EXAMPLE_POINT = "fedcba9876543210"


def _fill(pattern: str) -> str:
    return (
        pattern.replace("<id[0:2]>", _EXAMPLE_ID[:2])
        .replace("<id>", _EXAMPLE_ID)
        .replace("<point id>", _EXAMPLE_POINT)
    )


def test_names_table_matches_code() -> None:
    for row in spec_table("names"):
        obj, pattern = _code_object(row["Code"]), row["Name"]
        if callable(obj):
            arg = _EXAMPLE_POINT if "<point id>" in pattern else _EXAMPLE_ID
            assert obj(arg) == _fill(pattern), row["Object"]
        elif "/" in pattern:
            assert pattern.startswith(obj + "/"), row["Object"]
        else:
            assert pattern == obj, row["Object"]
    # The index segment has no name function: the Parquet writer names it under its prefix.
    index_row = next(r for r in spec_table("names") if r["Object"] == "index segment")
    assert index_row["Name"] == f"{index.INDEX_PREFIX}/<id>.parquet"


def _name_regex(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern)
    rx = rx.replace(re.escape("<id[0:2]>"), "(?P<fan>[0-9a-f]{2})")
    rx = rx.replace(re.escape("<id>"), "(?P<id>[0-9a-f]{64})")
    rx = rx.replace(re.escape("<point id>"), "(?P<point>[0-9a-f]{16})")
    rx = rx.replace(re.escape("<pid>-<16 hex>"), r"\d+-[0-9a-f]{16}")
    return re.compile(rx)


def test_golden_files_follow_names_and_content_addressing() -> None:
    patterns = {r["Object"]: _name_regex(r["Name"]) for r in spec_table("names")}
    files = sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file())
    kinds: dict[str, int] = {}
    for name in files:
        matches = [(obj, rx.fullmatch(name)) for obj, rx in patterns.items() if rx.fullmatch(name)]
        assert len(matches) == 1, f"{name} matches {len(matches)} name patterns"
        obj, m = matches[0]
        assert m is not None
        kinds[obj] = kinds.get(obj, 0) + 1
        groups = m.groupdict()
        if groups.get("id"):
            digest = blake3.blake3((GOLDEN / name).read_bytes()).hexdigest()
            assert digest == groups["id"], f"{name} is not named by its content"
            if groups.get("fan"):
                assert groups["fan"] == groups["id"][:2]
    assert kinds == {
        "config": 1,
        "pack": 3,
        "index segment": 3,
        "leaves file": 3,
        "root file": 3,
        "point document": 3,
    }


# ---------------------------------------------------------------------------------------------
# The spec alone is enough to read a repository


def _spec_read(path: Path, name: str) -> pa.Table:
    """Section 2: read only the spec's columns, by name, verifying page checksums."""
    columns = [r["Column"] for r in spec_table(name)]
    return pq.read_table(path, columns=columns, page_checksum_verification=True)


def _spec_index() -> dict[bytes, dict[str, Any]]:
    out: dict[bytes, dict[str, Any]] = {}
    for path in sorted((GOLDEN / "index").glob("*.parquet")):
        for row in _spec_read(path, "schema-index").to_pylist():
            out.setdefault(row["chunk_id"], row)
    return out


def _spec_image(doc: dict[str, Any], idx: dict[bytes, dict[str, Any]]) -> bytes:
    """FORMAT.md section 8.3, literally."""
    size, c, lc = doc["size"], doc["chunk_size"], doc["leaf_chunks"]
    out = bytearray(size)
    root = _spec_read(GOLDEN / "manifests" / "roots" / f"{doc['root']}.parquet", "schema-root")
    leaf_nos = root.column("leaf_no").to_pylist()
    assert leaf_nos == sorted(set(leaf_nos))
    pack_cache: dict[str, bytes] = {}
    for ref in root.to_pylist():
        file = ref["leaf_file"] if ref["leaf_file"] is not None else doc["leaves"]
        leaves = _spec_read(GOLDEN / "manifests" / "leaves" / f"{file}.parquet", "schema-leaves")
        rows = [r for r in leaves.to_pylist() if r["leaf"] == ref["leaf"]]
        assert rows and [r["slot"] for r in rows] == sorted({r["slot"] for r in rows})
        for r in rows:
            assert 0 <= r["slot"] < lc
            offset = (ref["leaf_no"] * lc + r["slot"]) * c
            length = min(c, size - offset)
            loc = idx[r["chunk_id"]]
            pid = loc["pack"]
            if pid not in pack_cache:
                data = (GOLDEN / "packs" / pid[:2] / f"{pid}.pack").read_bytes()
                assert blake3.blake3(data).hexdigest() == pid
                SpecPack(data)  # header, table and trailer as the spec says
                pack_cache[pid] = data
            blob = pack_cache[pid][loc["offset"] : loc["offset"] + loc["stored_len"]]
            plain = _decode(blob, loc["codec"], loc["raw_len"])
            assert len(plain) == loc["raw_len"] == length
            assert blake3.blake3(plain).digest() == r["chunk_id"]
            out[offset : offset + length] = plain
    return bytes(out)


def test_spec_alone_reads_golden_images() -> None:
    expected = {p["id"]: p for p in json.loads(GOLDEN_EXPECTED.read_bytes())["points"]}
    idx = _spec_index()
    for path in _golden_points():
        raw = path.read_bytes()
        point_id = spec_point_id(raw)
        assert point_id == path.stem
        doc = json.loads(raw)
        assert doc["format"] == points.POINT_FORMAT_NAME
        assert doc["version"] == points.POINT_FORMAT_VERSION
        image = _spec_image(doc, idx)
        assert len(image) == expected[point_id]["size"]
        assert hashlib.sha256(image).hexdigest() == expected[point_id]["sha256"], point_id


def test_leaves_files_follow_the_spec_rules() -> None:
    """Sorted by (leaf, slot), dense ordinals, and leaf statistics in every row group."""
    for path in sorted((GOLDEN / "manifests" / "leaves").glob("*.parquet")):
        table = pq.read_table(path)
        keys = list(
            zip(table.column("leaf").to_pylist(), table.column("slot").to_pylist(), strict=True)
        )
        assert keys == sorted(set(keys)), path.name
        ordinals = sorted({k[0] for k in keys})
        assert ordinals == list(range(len(ordinals))), path.name
        md = pq.ParquetFile(path).metadata
        col = md.schema.to_arrow_schema().get_field_index("leaf")
        for rg in range(md.num_row_groups):
            stats = md.row_group(rg).column(col).statistics
            assert stats is not None and stats.has_min_max, path.name
