"""Reading FORMAT.md's machine-checked tables and examples, and readers built from them alone:
a pack reader (plain and sealed) and the primitives of an encrypted repository (key files,
purpose keys, associated data, sealed objects).

Shared by the tests/catalog/test_format_spec*.py files. Tables are found by a marker line
``<!-- spec:NAME -->`` directly above them, examples by ``<!-- example:NAME -->`` directly
above a fenced code block. Nothing here uses comb's readers: only the spec's tables, its rules
(written out below, each with its section) and standard primitives (BLAKE3, AES-GCM, Argon2id).
"""

from __future__ import annotations

import ast
import base64
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from catalog.store import blocks, packs, parity, points

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "FORMAT.md"
GOLDEN = ROOT / "tests" / "data" / "golden-v1"
GOLDEN_EXPECTED = ROOT / "tests" / "data" / "golden-v1.json"

MARKERS = {
    "names",
    "condemned",
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
    "schema-files",
    "point",
    "constants",
    "times",
    "seal",
    "associated-data",
    "sealed-envelope",
    "blocks-layout",
    "blocks-trailer",
    "lock",
    "overlay",
    "overlay-record",
    "key-file",
}
EXAMPLES = {
    "pack-header-plain",
    "pack-header-sealed",
    "golden-pack-trailer",
    "blocks",
    "point",
    "golden-point",
}


def _split_row(inner: str) -> list[str]:
    """Cells of a table row's inside, split at pipes not escaped as ``\\|`` (GFM)."""
    cells, cell, i = [], "", 0
    while i < len(inner):
        if inner.startswith("\\|", i):
            cell, i = cell + "|", i + 2
        elif inner[i] == "|":
            cells.append(cell)
            cell, i = "", i + 1
        else:
            cell, i = cell + inner[i], i + 1
    return [*cells, cell]


def _cells(line: str) -> list[str]:
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), f"not a table row: {line!r}"
    return [c.strip() for c in _split_row(inner[1:-1])]


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
        if not line.lstrip().startswith("|"):  # (a table may be indented in a list item)
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"{name}: row has {len(cells)} cells: {line!r}"
        rows.append({h: _unquote(c) for h, c in zip(header, cells, strict=True)})
    assert rows, f"{name}: empty table"
    return rows


def spec_example(name: str) -> str:
    """The fenced code block under ``<!-- example:NAME -->``."""
    text = SPEC.read_text(encoding="utf-8")
    marker = f"<!-- example:{name} -->\n"
    assert text.count(marker) == 1, f"FORMAT.md must hold exactly one {marker.strip()}"
    m = re.match(r"```[a-z]*\n(.*?)```", text[text.index(marker) + len(marker) :], re.S)
    assert m, f"example {name}: no fenced code block under its marker"
    return m.group(1)


def example_hex(text: str) -> bytes:
    """The bytes of a hex example: pairs of hex digits; ``|`` separates fields."""
    return bytes.fromhex(text.replace("|", " "))


def section(number: str) -> str:
    """The text of FORMAT.md section NUMBER (a ``## N.`` or ``### N.M`` heading) up to the next
    heading of the same or a higher level."""
    text = SPEC.read_text(encoding="utf-8")
    level = "###" if "." in number else "##"
    m = re.search(rf"^{level} {re.escape(number)}[. ].*$", text, re.M)
    assert m, f"FORMAT.md has no section {number}"
    rest = text[m.end() :]
    ends = [rest.find(f"\n{h} ") for h in (["##", "###"] if level == "###" else ["##"])]
    ends = [e for e in ends if e >= 0]
    return rest[: min(ends)] if ends else rest


INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i64": "q"}
STRUCTS = {
    "pack-header": packs.PACK_HEADER,
    "pack-entry": packs.PACK_ENTRY,
    "pack-trailer": packs.PACK_TRAILER,
    "parity-header": parity.PARITY_HEADER,
    "parity-trailer": parity.PARITY_TRAILER,
    "blocks-trailer": blocks._TRAILER,
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


def check_values(
    rows: list[dict[str, str]], records: list[dict[str, Any]], column: str = "Value"
) -> None:
    """Fields whose ``column`` cell ('Value', or 'Plain'/'Sealed') is filled in must hold
    exactly that value."""
    for row in rows:
        if row[column]:
            for rec in records:
                assert rec[row["Field"]] == spec_value(row[column]), row["Field"]


def seal_overhead() -> int:
    """Section 2.1: the bytes a seal adds (nonce and tag), from the seal table."""
    rows = {r["Part"]: r for r in spec_table("seal")}
    return int(rows["nonce"]["Size"]) + int(rows["tag"]["Size"])


def spec_open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Section 2.1: open ``nonce ‖ ciphertext ‖ tag`` (AES-256-GCM); raises on any change."""
    rows = {r["Part"]: r for r in spec_table("seal")}
    nonce, tag = int(rows["nonce"]["Size"]), int(rows["tag"]["Size"])
    assert rows["ciphertext"]["Offset"] == str(nonce)
    assert rows["tag"]["Offset"] == f"stored length − {tag}"
    assert len(sealed) >= nonce + tag
    return AESGCM(key).decrypt(sealed[:nonce], sealed[nonce:], aad)


class SpecPack:
    """A pack parsed with nothing but FORMAT.md's byte tables (section 6). ``open_table``: a
    sealed pack's table opener (stored table, header bytes) -> plain entries."""

    def __init__(
        self, data: bytes, open_table: Callable[[bytes, bytes], bytes] | None = None
    ) -> None:
        header, hrows = spec_struct("pack-header")
        entry, erows = spec_struct("pack-entry")
        trailer, trows = spec_struct("pack-trailer")
        form = "Plain" if open_table is None else "Sealed"
        assert len(data) >= header.size + trailer.size
        self.header = dict(
            zip([r["Field"] for r in hrows], header.unpack_from(data, 0), strict=True)
        )
        tpos = len(data) - trailer.size
        self.trailer = dict(
            zip([r["Field"] for r in trows], trailer.unpack_from(data, tpos), strict=True)
        )
        start = tpos - self.trailer["entries_bytes"]
        assert start >= header.size
        self.table = data[start:tpos]
        self.table_start = start
        check_values(hrows, [self.header], form)
        check_values(trows, [self.trailer])
        overhead = 0 if open_table is None else seal_overhead()
        assert self.trailer["entries_bytes"] == entry.size * self.trailer["count"] + overhead
        assert blake3.blake3(self.table).digest()[:16] == self.trailer["entries_hash"]
        plain = self.table if open_table is None else open_table(self.table, data[: header.size])
        names = [r["Field"] for r in erows]
        self.entries = [
            dict(zip(names, entry.unpack_from(plain, i * entry.size), strict=True))
            for i in range(self.trailer["count"])
        ]
        check_values(erows, self.entries, form)
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


# ---------------------------------------------------------------------------------------------
# Block lists (section 7.1) and overlay records (section 19.3)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SpecBlockList:
    """A block list parsed with section 7.1's tables and rules alone."""

    def __init__(self, data: bytes) -> None:
        trailer, rows = spec_struct("blocks-trailer")
        layout = {r["Part"]: r for r in spec_table("blocks-layout")}
        assert layout["trailer"]["Offset"] == f"list size − {trailer.size}"
        assert layout["trailer"]["Size"] == str(trailer.size)
        assert len(data) >= trailer.size
        names = [r["Field"] for r in rows]
        self.t: dict[str, Any] = dict(
            zip(names, trailer.unpack_from(data, len(data) - trailer.size), strict=True)
        )
        check_values(rows, [self.t])
        t = self.t
        assert t["block_bytes"] >= 1 and t["range_rows"] >= 1
        assert t["blocks"] == ceil_div(t["file_bytes"], t["block_bytes"])
        k = ceil_div(t["rows"], t["range_rows"])
        assert len(data) == 16 * k + 32 * t["blocks"] + trailer.size
        self.ranges = [struct.unpack_from("<qq", data, 16 * i) for i in range(k)]
        self.hashes = [data[16 * k + 32 * i : 16 * k + 32 * (i + 1)] for i in range(t["blocks"])]

    def check_file(self, stored: bytes) -> None:
        """The file's size and every block against the list."""
        size = self.t["block_bytes"]
        assert len(stored) == self.t["file_bytes"]
        for i, h in enumerate(self.hashes):
            assert blake3.blake3(stored[i * size : (i + 1) * size]).digest() == h


def spec_records(log: bytes) -> list[tuple[dict[str, Any], bytes, int]]:
    """(header fields, stored payload, record offset) of every record of a log, by 19.3."""
    spec, rows = spec_struct("overlay-record")
    names = [r["Field"] for r in rows]
    out, at = [], 0
    while at < len(log):
        rec = dict(zip(names, spec.unpack_from(log, at), strict=True))
        check_values(rows, [rec])
        assert rec["kind"] in (1, 2) and rec["flags"] in (0, 1)
        assert not (rec["flags"] and rec["kind"] == 2)
        stored = 0 if rec["kind"] == 2 else rec["length"] + (seal_overhead() if rec["flags"] else 0)
        payload = log[at + spec.size : at + spec.size + stored]
        assert len(payload) == stored
        digest = blake3.blake3(log[at : at + 24] + payload).digest()[:16]
        assert digest == rec["checksum"]
        out.append((rec, payload, at))
        at += spec.size + stored
    return out


# ---------------------------------------------------------------------------------------------
# Encrypted repositories from the spec alone (sections 2.1, 21.1, 21.2)


def _context_template() -> str:
    """Section 21.1: the BLAKE3 key-derivation context, ``... <purpose>``."""
    m = re.search(r"context string is `([^`]*<purpose>)`", section("21.1").replace("\n", " "))
    assert m, "section 21.1 must give the derivation context as `... <purpose>`"
    return m.group(1)


def spec_aad(obj: str, values: dict[str, bytes | str | int]) -> bytes:
    """The associated data of a sealed object, evaluated from section 2.1's table: the cell's
    code spans in order; a quoted span is UTF-8 text with ``<name>`` replaced by the value as
    text (ints decimal), an unquoted ``<name>`` span the value's raw bytes."""
    rows = {r["Sealed object"]: r for r in spec_table("associated-data")}
    cell = rows[obj]["Associated data"]
    spans = re.findall(r"`([^`]*)`", cell) or [cell]  # (a cell of one span comes unquoted)
    out = b""
    for span in spans:
        if span.startswith('"') and span.endswith('"'):
            text = re.sub(r"<([^>]+)>", lambda m: str(values[m.group(1)]), span[1:-1])
            out += text.encode("utf-8")
        else:
            m = re.fullmatch(r"<([^>]+)>", span)
            assert m, f"{obj}: span {span!r} is neither quoted text nor <name>"
            raw = values[m.group(1)]
            assert isinstance(raw, bytes)
            out += raw
    return out


def spec_key_of(obj: str) -> str:
    """The purpose of the key that seals ``obj`` (section 2.1's table), or 'KEK'."""
    rows = {r["Sealed object"]: r for r in spec_table("associated-data")}
    return rows[obj]["Key"]


class SpecKeys:
    """An encrypted repository's keys, from a key file and a password by sections 2.1, 21.1 and
    21.2 alone."""

    def __init__(self, key_file: bytes, password: str, config_id: str) -> None:
        doc = json.loads(key_file)
        fields = {r["Field"]: r for r in spec_table("key-file")}
        for name, row in fields.items():
            if row["Written"] and name in ("format", "version", "algorithm", "kdf.name"):
                node = doc
                for part in name.split("."):
                    node = node[part]
                assert node == ast.literal_eval(row["Written"]), name
        kdf = doc["kdf"]
        if "check" in doc:  # section 21.2, "Check"
            used = [kdf["name"], kdf["memory_kib"], kdf["iterations"], kdf["lanes"], kdf["salt"]]
            text = "\n".join(str(v) for v in [*used, doc["wrapped"]])
            assert doc["check"] == blake3.blake3(text.encode("utf-8")).hexdigest()
        kek = Argon2id(
            salt=base64.b64decode(kdf["salt"], validate=True),
            length=32,
            iterations=kdf["iterations"],
            lanes=kdf["lanes"],
            memory_cost=kdf["memory_kib"],
        ).derive(password.encode("utf-8"))
        aad = spec_aad("master secret in a key file", {"config id": config_id})
        self.master = spec_open(kek, base64.b64decode(doc["wrapped"], validate=True), aad)
        assert len(self.master) == 64
        template = _context_template()
        self.keys = {
            r["Purpose"]: blake3.blake3(
                self.master, derive_key_context=template.replace("<purpose>", r["Purpose"])
            ).digest()
            for r in spec_table("purposes")
        }

    def share_ids(self, config: dict[str, Any]) -> None:
        """Section 21.1, "Shared chunk-id key": the chunk-id key config.json holds sealed."""
        template = _context_template()
        purpose = "shared chunk id"
        self.keys[purpose] = blake3.blake3(
            self.master, derive_key_context=template.replace("<purpose>", purpose)
        ).digest()
        sealed = base64.b64decode(config["encryption"]["id_key"], validate=True)
        key = self.open("shared chunk-id key in config.json", sealed, {"config id": config["id"]})
        assert len(key) == 32
        self.keys["chunk id"] = key

    def open(self, obj: str, sealed: bytes, values: dict[str, bytes | str | int]) -> bytes:
        """Open a sealed ``obj`` (a row of section 2.1's table) with its key and data."""
        return spec_open(self.keys[spec_key_of(obj)], sealed, spec_aad(obj, values))

    def chunk_id(self, plain: bytes) -> bytes:
        """Section 1: keyed BLAKE3-256 with the chunk-id key."""
        return blake3.blake3(plain, key=self.keys["chunk id"]).digest()

    def open_envelope(self, obj: str, raw: bytes, values: dict[str, bytes | str | int]) -> bytes:
        """Section 2.2: a sealed document's plain bytes."""
        env = json.loads(raw)
        rows = {r["Field"]: r for r in spec_table("sealed-envelope")}
        assert set(env) == set(rows)
        assert env["format"] == ast.literal_eval(rows["format"]["Value"])
        return self.open(obj, base64.b64decode(env["data"], validate=True), values)
