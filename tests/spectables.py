"""Reading FORMAT.md's machine-checked tables, and a pack reader built from them alone.

Shared by the tests/catalog/test_format_spec*.py files. Tables are found by a marker line
``<!-- spec:NAME -->`` directly above them.
"""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path
from typing import Any

import blake3
import zstandard

from catalog.store import packs, parity, points

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "FORMAT.md"
GOLDEN = ROOT / "tests" / "data" / "golden-v1"
GOLDEN_EXPECTED = ROOT / "tests" / "data" / "golden-v1.json"

MARKERS = {
    "names",
    "purposes",
    "config",
    "codecs",
    "pack-layout",
    "pack-header",
    "pack-entry",
    "pack-trailer",
    "parity-layout",
    "parity-header",
    "parity-trailer",
    "schema-index",
    "schema-changes",
    "schema-leaves",
    "schema-root",
    "point",
    "constants",
}


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


INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
STRUCTS = {
    "pack-header": packs.PACK_HEADER,
    "pack-entry": packs.PACK_ENTRY,
    "pack-trailer": packs.PACK_TRAILER,
    "parity-header": parity.PARITY_HEADER,
    "parity-trailer": parity.PARITY_TRAILER,
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
        code = f"{m.group(1)}s" if m else INT_CODES[typ]
        assert struct.calcsize("<" + code) == size, f"{name}.{row['Field']}: size vs type"
        codes.append(code)
        pos += size
    return struct.Struct("<" + "".join(codes)), rows


def spec_value(cell: str) -> Any:
    value = ast.literal_eval(cell)
    return value.encode() if isinstance(value, str) else value


def check_values(rows: list[dict[str, str]], records: list[dict[str, Any]]) -> None:
    """Fields whose 'Value' cell is filled in must hold exactly that value."""
    for row in rows:
        if row["Value"]:
            for rec in records:
                assert rec[row["Field"]] == spec_value(row["Value"]), row["Field"]


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
        check_values(hrows, [self.header])
        check_values(erows, self.entries)
        check_values(trows, [self.trailer])
        assert self.trailer["entries_bytes"] == entry.size * self.trailer["count"]
        assert blake3.blake3(self.table).digest()[:16] == self.trailer["entries_hash"]
        for e in self.entries:
            assert header.size <= e["offset"] and e["offset"] + e["stored_len"] <= start

    def blob(self, data: bytes, e: dict[str, Any]) -> bytes:
        return data[e["offset"] : e["offset"] + e["stored_len"]]


def spec_decode(blob: bytes, codec: int, raw_len: int) -> bytes:
    names = {int(r["Number"]): r["Name"] for r in spec_table("codecs")}
    if names[codec] == "zstd":
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=raw_len)
    assert names[codec] == "raw"
    return blob


def golden_points() -> list[Path]:
    found = sorted((GOLDEN / points.POINTS_PREFIX).glob("*.json"))
    assert len(found) == 3
    return found


def spec_point_id(raw: bytes) -> str:
    """FORMAT.md section 9: BLAKE3-256 of the document's exact bytes, first 16 hex digits."""
    return blake3.blake3(raw).hexdigest()[: points.POINT_ID_HEX]
