"""The logical volumes of an LVM2 physical volume: its label, PV header, metadata area and the
volume group's text metadata, read in pure Python, as ``Volume`` entries named ``lvm/VG/LV``.

Owns the LVM2 on-disk format (label, PV header, metadata area ring buffer, the text config
format) and where an LV's bytes lie on the disk. An LV is read when it is linear and whole on
this PV in one contiguous run; any other (thin, snapshot, RAID, mirror, striped, spanning PVs,
in pieces) is listed with a note saying why not. The bytes come from an untrusted guest: every
size is checked against the disk and capped, the parser is iterative and bounded, and what does
not check out is a one-line ``FileSystemError`` (returned as text by ``logical_volumes``).

Must not: activate or write anything, trust a name as a path component (only LVM's own
characters pass), or import anything of comb but ``catalog`` and ``drive.files.volumes``.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from catalog.errors import FileSystemError
from catalog.read.source import BlockSource, read_bytes

from .volumes import SECTOR, Volume, detect

LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b"\x20LVM2\x20x[5A%r0N*>"
MDA_HEADER = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
MAX_AREAS = 8  # metadata areas of one PV (LVM makes at most 2)
MAX_TEXT = 4 << 20  # bytes of metadata text
MAX_TEXTS = 2 * MAX_TEXT  # bytes of metadata text parsed in all, over every copy
MAX_LOCATIONS = 4  # raw locations of one metadata area (LVM uses 2)
MAX_TOKENS = 400_000
MAX_DEPTH = 16  # nested sections
MAX_ARRAY = 65536  # values in one array
MAX_DIGITS = 24
MAX_LVS = 4096
MAX_SEGMENTS = 1024
NAME = re.compile(r"[A-Za-z0-9+_.\-]{1,128}")
_TOKEN = re.compile(
    r'(?:\s+|#[^\n]*)*+(?:"(?P<str>[^"\\]*+(?:\\.[^"\\]*+)*+)"|(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[{}\[\]=,])|$)',
    re.S,
)
Config = dict[str, Any]


def lvm_crc(data: bytes) -> int:
    """LVM2's checksum: CRC-32 from 0xf597a6cf without the final inversion."""
    return zlib.crc32(data, INITIAL_CRC ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def logical_volumes(source: BlockSource, pv: Volume) -> list[Volume] | str:
    """The LVs of the VG whose PV is ``pv`` that lie (at least partly) on it, in metadata order;
    or why they cannot be read (one line)."""
    try:
        uuid, areas = _label(source, pv)
        vg_name, vg = _newest(source, pv, areas)
        return _volumes(source, pv, uuid, vg_name, vg)
    except FileSystemError as err:
        return str(err)


# --- label, PV header, metadata areas -----------------------------------------------------------


def _label(source: BlockSource, pv: Volume) -> tuple[str, list[tuple[int, int]]]:
    """(PV UUID without dashes, metadata areas as (offset, size) within the PV)."""
    head = read_bytes(source, pv.offset, min(4 * SECTOR, pv.size))
    for k in range(4):
        label = head[k * SECTOR : (k + 1) * SECTOR]
        if len(label) == SECTOR and label[:8] == LABEL_ID and label[24:32] == LABEL_TYPE:
            break
    else:
        raise FileSystemError("LVM2: no PV label in the first 4 sectors")
    sector, crc, at = struct.unpack_from("<QII", label, 8)
    if sector != k or crc != lvm_crc(label[20:]):
        raise FileSystemError(f"LVM2: the PV label in sector {k} does not check out")
    if not 32 <= at <= SECTOR - 56:
        raise FileSystemError(f"LVM2: PV header at offset {at} of the label sector")
    uuid = label[at : at + 32].decode("latin-1")
    pos = at + 40
    lists: list[list[tuple[int, int]]] = []
    for _ in range(2):  # the data areas, then the metadata areas, each ending in a zero entry
        found: list[tuple[int, int]] = []
        while pos + 16 <= SECTOR:
            offset, size = struct.unpack_from("<QQ", label, pos)
            pos += 16
            if offset == 0:
                break
            found.append((offset, size))
        lists.append(found)
    areas = lists[1][:MAX_AREAS]
    if not areas:
        raise FileSystemError("LVM2: this PV holds no metadata area")
    return uuid, areas


def _newest(source: BlockSource, pv: Volume, areas: list[tuple[int, int]]) -> tuple[str, Config]:
    """(VG name, VG section) of the metadata copy with the highest seqno."""
    best: tuple[int, str, Config] | None = None
    why, budget = "no metadata", MAX_TEXTS
    for start, size in areas:
        try:
            for text in _texts(source, pv, start, size):
                budget -= len(text) if isinstance(text, str) else 0
                if budget < 0:
                    raise FileSystemError(f"LVM2: metadata copies of over {MAX_TEXTS} bytes")
                try:  # a damaged copy is passed over when another one reads
                    name, vg = _vg_of(parse(_checked(text)))
                    seqno = _int(vg, "seqno", 0, 2**63)
                except FileSystemError as err:
                    why = str(err)
                    continue
                if best is None or seqno > best[0]:
                    best = (seqno, name, vg)
        except FileSystemError as err:
            why = str(err)
    if best is None:
        raise FileSystemError(why if why.startswith("LVM2") else f"LVM2: {why}")
    return best[1], best[2]


def _checked(text: str | FileSystemError) -> str:
    if isinstance(text, FileSystemError):
        raise text
    return text


def _texts(
    source: BlockSource, pv: Volume, start: int, size: int
) -> Iterator[str | FileSystemError]:
    """The metadata texts the area at ``start`` points to (its ring buffer may wrap), or why
    one does not check out."""
    if start < SECTOR or size <= MDA_HEADER or start + size > pv.size:
        raise FileSystemError(f"LVM2: metadata area at {start} ({size} bytes) is not in the PV")
    base = pv.offset + start
    header = read_bytes(source, base, MDA_HEADER)
    if len(header) < MDA_HEADER or header[4:20] != MDA_MAGIC:
        raise FileSystemError(f"LVM2: no metadata area header at offset {start}")
    crc, version, at, ring = struct.unpack_from("<I16xIQQ", header)
    if crc != lvm_crc(header[4:]) or version != 1 or at != start or ring != size:
        raise FileSystemError(f"LVM2: the metadata area header at {start} does not check out")
    for i in range(MAX_LOCATIONS):
        offset, length, checksum, flags = struct.unpack_from("<QQII", header, 40 + 24 * i)
        if offset == 0:
            return
        if flags & RAW_LOCN_IGNORED:
            continue
        if length > MAX_TEXT:
            yield FileSystemError(f"LVM2: {length} bytes of metadata (at most {MAX_TEXT})")
        elif not MDA_HEADER <= offset < size or length > size - MDA_HEADER:
            yield FileSystemError(f"LVM2: metadata at {offset} is outside its area")
        else:
            first = min(length, size - offset)
            text = read_bytes(source, base + offset, first)
            text += read_bytes(source, base + MDA_HEADER, length - first)  # round the ring
            if lvm_crc(text) != checksum:
                yield FileSystemError(f"LVM2: checksum mismatch of the metadata at {offset}")
            else:
                yield text.rstrip(b"\0").decode("latin-1")


def _vg_of(config: Config) -> tuple[str, Config]:
    for name, value in config.items():
        if isinstance(value, dict) and "physical_volumes" in value:
            if not _valid(name):
                raise FileSystemError(f"LVM2: VG name {name[:64]!r} is not a valid LVM name")
            return name, value
    raise FileSystemError("LVM2: the metadata holds no volume group")


# --- the text config format ---------------------------------------------------------------------


def _tokens(text: str) -> Iterator[tuple[str, Any]]:
    pos = 0
    for _ in range(MAX_TOKENS):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if pos >= len(text):
                return
            bad = len(text) - len(text[pos:].lstrip())
            raise FileSystemError(f"LVM2 metadata: unexpected {text[bad]!r} at {bad}")
        pos = m.end()
        if m.group("str") is not None:
            yield "str", re.sub(r"\\(.)", r"\1", m.group("str"), flags=re.S)
        elif m.group("word") is not None:
            yield "word", m.group("word")
        elif m.group("punct") is not None:
            yield m.group("punct"), None
    raise FileSystemError(f"LVM2 metadata: over {MAX_TOKENS} tokens")


def _scalar(kind: str, value: Any) -> Any:
    if kind == "str":
        return value
    if kind == "word" and re.fullmatch(r"-?\d+", value):
        if len(value) > MAX_DIGITS:
            raise FileSystemError(f"LVM2 metadata: a number of {len(value)} digits")
        return int(value)
    if kind == "word":
        return value  # a float or a bare word: kept as text
    raise FileSystemError(f"LVM2 metadata: {kind!r} where a value belongs")


def _value(tokens: Iterator[tuple[str, Any]]) -> Any:
    kind, value = next(tokens, ("end", None))
    if kind != "[":
        return _scalar(kind, value)
    items: list[Any] = []
    for kind, value in tokens:
        if kind == "]":
            return items
        if kind != ",":
            if len(items) >= MAX_ARRAY:
                raise FileSystemError(f"LVM2 metadata: an array of over {MAX_ARRAY} values")
            items.append(_scalar(kind, value))
    raise FileSystemError("LVM2 metadata: an array is not closed")


def parse(text: str) -> Config:
    """LVM2's text config format (``name { key = value ... }``, strings, integers, arrays,
    ``#`` comments) as nested dicts; a later key replaces an earlier one."""
    stack: list[Config] = [{}]
    tokens = _tokens(text)
    for kind, word in tokens:
        if kind == "}":
            if len(stack) == 1:
                raise FileSystemError("LVM2 metadata: unbalanced '}'")
            stack.pop()
            continue
        if kind != "word":
            raise FileSystemError(f"LVM2 metadata: {kind!r} where a name belongs")
        after, _ = next(tokens, ("end", None))
        if after == "=":
            stack[-1][word] = _value(tokens)
        elif after == "{":
            if len(stack) > MAX_DEPTH:
                raise FileSystemError(f"LVM2 metadata: sections nested over {MAX_DEPTH} deep")
            child: Config = {}
            stack[-1][word] = child
            stack.append(child)
        else:
            raise FileSystemError(f"LVM2 metadata: {after!r} after {word[:64]!r}")
    if len(stack) != 1:
        raise FileSystemError("LVM2 metadata: a section is not closed")
    return stack[0]


# --- logical volumes ----------------------------------------------------------------------------


def _int(section: Config, key: str, low: int, high: int) -> int:
    value = section.get(key)
    if not isinstance(value, int) or not low <= value <= high:
        raise FileSystemError(f"LVM2 metadata: {key} is {str(value)[:32]!r}")
    return value


def _valid(name: str) -> bool:
    return NAME.fullmatch(name) is not None and name not in (".", "..") and name[0] != "-"


def _volumes(source: BlockSource, pv: Volume, uuid: str, vg_name: str, vg: Config) -> list[Volume]:
    extent = _int(vg, "extent_size", 1, 2**32) * SECTOR
    pvs = vg.get("physical_volumes")
    ours = [
        (name, p)
        for name, p in (pvs.items() if isinstance(pvs, dict) else [])
        if isinstance(p, dict) and str(p.get("id", "")).replace("-", "") == uuid
    ]
    if not ours:
        raise FileSystemError(f"LVM2: this PV is not in the metadata of VG {vg_name}")
    pv_name, pv_section = ours[0]
    data = pv.offset + _int(pv_section, "pe_start", 0, 2**48) * SECTOR
    lvs = vg.get("logical_volumes", {})
    if not isinstance(lvs, dict) or len(lvs) > MAX_LVS:
        raise FileSystemError(f"LVM2: VG {vg_name} has over {MAX_LVS} LVs or none readable")
    found = []
    for i, (lv_name, lv) in enumerate(lvs.items()):
        if not isinstance(lv, dict) or "VISIBLE" not in (lv.get("status") or []):
            continue  # an LV of LVM's own (a thin pool's data, a mirror's image)
        if not _valid(lv_name):
            note = f"LVM LV named {lv_name[:64]!r}: not a valid LVM name, left out"
            found.append(Volume(f"lvm/{vg_name}/#{i + 1}", pv.offset, 0, None, None, note, None))
            continue
        name = f"lvm/{vg_name}/{lv_name}"
        try:
            vol = _lv(source, pv, name, lv, pv_name, data, extent)
        except FileSystemError as err:
            vol = Volume(name, pv.offset, 0, None, None, f"LVM LV damaged: {err}", None)
        if vol is not None:
            found.append(vol)
    return found


def _pieces(lv: Config, pv_name: str) -> tuple[list[tuple[int, int, str, int]], str | None]:
    """The LV's segments as (LV extent, extents, PV name, PV extent), in LV order; or why the
    LV is not made of linear pieces."""
    segments = [s for k, s in lv.items() if k.startswith("segment") and isinstance(s, dict)]
    if len(segments) > MAX_SEGMENTS:
        return [], f"LVM LV in over {MAX_SEGMENTS} segments: not read yet"
    pieces = []
    for seg in segments:
        kind = str(seg.get("type", "?"))
        if kind not in ("striped", "linear"):
            kind = re.sub(r"[^A-Za-z0-9_+.-]", "?", kind[:32])
            return [], f"LVM {kind.removesuffix('-pool')} volume: not read yet"
        count = seg.get("stripe_count", 1)
        if count != 1:
            return [], f"LVM striped volume ({str(count)[:24]} stripes): not read yet"
        stripes = seg.get("stripes")
        if not isinstance(stripes, list) or len(stripes) != 2 or not isinstance(stripes[1], int):
            raise FileSystemError("a segment without its PV")
        start = _int(seg, "start_extent", 0, 2**48)
        length = _int(seg, "extent_count", 1, 2**48)
        pieces.append((start, length, str(stripes[0]), stripes[1]))
    pieces.sort()
    at = 0
    for start, length, _, _ in pieces:
        if start != at:
            raise FileSystemError(f"segments leave a gap or overlap at extent {at}")
        at += length
    if not pieces:
        raise FileSystemError("no segments")
    return pieces, None


def _lv(
    source: BlockSource, pv: Volume, name: str, lv: Config, pv_name: str, data: int, extent: int
) -> Volume | None:
    """The volume of one LV; None when none of it lies on this PV."""
    pieces, why = _pieces(lv, pv_name)
    on = {p[2] for p in pieces}
    if why is None and pv_name not in on:
        return None
    if why is None and len(on) > 1:
        why = f"LVM LV spanning {len(on)} PVs: not read yet"
    runs: list[list[int]] = []
    for _, length, _, pe in pieces:
        if runs and runs[-1][0] + runs[-1][1] == pe:
            runs[-1][1] += length
        else:
            runs.append([pe, length])
    if why is None and len(runs) > 1:
        why = f"LVM LV in {len(runs)} pieces: not read yet"
    if why is not None:
        return Volume(name, pv.offset, 0, None, None, why, None)
    offset = data + runs[0][0] * extent
    end = min(pv.offset + pv.size, source.size)
    if offset >= end:
        return Volume(name, pv.offset, 0, None, None, "LVM LV past the disk's end", None)
    size = min(runs[0][1] * extent, end - offset)
    fstype, label, note = detect(source, offset, size)
    return Volume(name, offset, size, fstype, label, note, None)
