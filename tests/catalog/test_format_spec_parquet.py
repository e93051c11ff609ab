"""FORMAT.md's Parquet column tables against the code and the golden files, and the golden
images rebuilt with nothing but the rules of FORMAT.md (no comb reader code).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spectables import (
    GOLDEN,
    GOLDEN_EXPECTED,
    SpecPack,
    golden_points,
    spec_decode,
    spec_point_id,
    spec_table,
)

from catalog.store import changes, index, manifest, points
from catalog.store import leaves as store_leaves
from catalog.store.local import LocalStorage

# ---------------------------------------------------------------------------------------------
# Parquet schemas

_SCHEMAS = {
    "schema-index": (index.INDEX_SCHEMA, "index"),
    "schema-leaves": (manifest.LEAF_SCHEMA, "manifests/leaves"),
    "schema-root": (manifest.ROOT_SCHEMA, "manifests/roots"),
    "schema-changes": (changes.CHANGES_SCHEMA, "manifests/changes"),
}
# Files golden-v1 (written by comb 0.1) has; change tables came later.
_IN_GOLDEN_V1 = sorted(set(_SCHEMAS) - {"schema-changes"})


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


@pytest.mark.parametrize("name", _IN_GOLDEN_V1)
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
    writer.add_leaf(0, store_leaves.Leaf(np.array([0, 1, 5], np.int16), id_rows))
    writer.add_ref(manifest.LeafRef(1, "cd" * 32, 0))
    leaves_id, root_id, _written = writer.commit()
    table = changes.ChangeTableWriter(storage)
    table.add(
        np.array([0, 65536, 5 * 65536]),
        changes.chunk_keys(id_rows),
        np.array([False, False, True]),
        np.array([True, False, False]),
        np.array([100, 0, 0]),
        np.array([65536, 65536, 65536]),
    )
    changes_id, _size = table.commit()
    assert seg_id is not None and leaves_id is not None
    for name, file_id in (
        ("schema-index", seg_id),
        ("schema-leaves", leaves_id),
        ("schema-root", root_id),
        ("schema-changes", changes_id),
    ):
        path = tmp_path / _SCHEMAS[name][1] / f"{file_id}.parquet"
        assert blake3.blake3(path.read_bytes()).hexdigest() == file_id
        _check_parquet_file(path, name)
        _check_page_checksums(path)


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
            plain = spec_decode(blob, loc["codec"], loc["raw_len"])
            assert len(plain) == loc["raw_len"] == length
            assert blake3.blake3(plain).digest() == r["chunk_id"]
            out[offset : offset + length] = plain
    return bytes(out)


def test_spec_alone_reads_golden_images() -> None:
    expected = {p["id"]: p for p in json.loads(GOLDEN_EXPECTED.read_bytes())["points"]}
    idx = _spec_index()
    for path in golden_points():
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
