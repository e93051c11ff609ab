"""The write log of an overlay: record format, replay, and the in-memory extent map.

Owns the bytes of ``overlays/<name>/log-<n>.dat`` (FORMAT.md, "Overlays"): append-only files of
records, each a fixed header (magic, kind, offset, length, BLAKE3 of header and payload) and,
for data records, the payload. Replay rebuilds the extent map (later records win); a torn or
bad record at the end of the last log is a crash mid-write and is cut off, one anywhere else is
corruption. Knows nothing about locks, names or NBD (``drive.overlay``).
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import blake3

from catalog.errors import CorruptionError

RECORD_MAGIC = b"CMBW"
KIND_DATA = 1
KIND_ZERO = 2
# magic, kind, 3 reserved bytes, offset, length, then 16 bytes of BLAKE3 over the first 24
# header bytes and the payload (a record is whole or it is not: torn writes are found).
HEADER = struct.Struct("<4sB3xQQ16s")
HEADER_BYTES = HEADER.size  # 40
_CHECKED = 24  # header bytes covered by the checksum (everything before it)
_READ_BYTES = 4 << 20  # replay reads the log in pieces of this size


def checksum(head: bytes, payload: bytes | memoryview) -> bytes:
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest(16)


def encode_header(kind: int, offset: int, length: int, payload: bytes | memoryview) -> bytes:
    head = HEADER.pack(RECORD_MAGIC, kind, offset, length, bytes(16))[:_CHECKED]
    return head + checksum(head, payload)


@dataclass(frozen=True)
class Piece:
    """A run of the overlay: [start, end) of the disk, from ``log`` at ``pos`` (-1: zeros)."""

    start: int
    end: int
    log: int
    pos: int


class ExtentMap:
    """Non-overlapping written runs, sorted by start; a later write replaces what it covers."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._pieces: list[Piece] = []

    def __len__(self) -> int:
        return len(self._pieces)

    def add(self, start: int, end: int, log: int, pos: int) -> None:
        if end <= start:
            return
        i = bisect_right(self._starts, start) - 1
        if i < 0 or self._pieces[i].end <= start:
            i += 1
        j = bisect_left(self._starts, end)
        keep: list[Piece] = []
        if i < j:
            first, last = self._pieces[i], self._pieces[j - 1]
            if first.start < start:
                keep.append(Piece(first.start, start, first.log, first.pos))
            keep.append(Piece(start, end, log, pos))
            if last.end > end:
                shift = -1 if last.pos < 0 else last.pos + (end - last.start)
                keep.append(Piece(end, last.end, last.log, shift))
        else:
            keep.append(Piece(start, end, log, pos))
        self._pieces[i:j] = keep
        self._starts[i:j] = [p.start for p in keep]

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """The written runs overlapping [offset, offset+length), clipped to it."""
        end = offset + length
        i = max(0, bisect_right(self._starts, offset) - 1)
        out = []
        while i < len(self._pieces) and self._pieces[i].start < end:
            p = self._pieces[i]
            if p.end > offset:
                lo, hi = max(p.start, offset), min(p.end, end)
                pos = -1 if p.pos < 0 else p.pos + (lo - p.start)
                out.append(Piece(lo, hi, p.log, pos))
            i += 1
        return out


@dataclass
class Replayed:
    """What replaying one log found: its good length, and whether a torn tail follows it."""

    good_bytes: int
    torn: bool
    written_bytes: int


def replay(path: str, log: int, last: bool, size: int, into: ExtentMap | None) -> Replayed:
    """Read every record of one log file in order, adding it to ``into`` (None: only count).
    A bad record at the end of the last log is a torn tail; anywhere else CorruptionError."""
    with open(path, "rb", buffering=0) as fh:
        total = os.fstat(fh.fileno()).st_size
        at = written = 0
        while at < total:
            head = os.pread(fh.fileno(), HEADER_BYTES, at)
            bad = _bad_header(head, size)
            if bad is None:
                magic, kind, offset, length, digest = HEADER.unpack(head)
                body = length if kind == KIND_DATA else 0
                end = at + HEADER_BYTES + body
                if end > total:
                    bad = "the record runs past the end of the file"
                elif into is not None and checksum(head[:_CHECKED], _read(fh, at, body)) != digest:
                    bad = "checksum mismatch"
            if bad is not None:
                if last and (bad.startswith("the record runs") or _tail(fh, at, total, head)):
                    return Replayed(at, True, written)
                raise CorruptionError(f"overlay log {path} at offset {at}: {bad}")
            if into is not None:
                into.add(offset, offset + length, log, at + HEADER_BYTES if body else -1)
            written += length
            at = end
    return Replayed(at, False, written)


def _read(fh: object, at: int, n: int) -> bytes:
    fd = fh.fileno()  # type: ignore[attr-defined]
    parts = []
    pos = at + HEADER_BYTES
    while n:
        part = os.pread(fd, min(n, _READ_BYTES), pos)
        if not part:
            break
        parts.append(part)
        pos += len(part)
        n -= len(part)
    return b"".join(parts)


def _bad_header(head: bytes, size: int) -> str | None:
    if len(head) < HEADER_BYTES:
        return "the record runs past the end of the file (a partial header)"
    magic, kind, offset, length, _ = HEADER.unpack(head)
    if magic != RECORD_MAGIC:
        return "bad record magic"
    if kind not in (KIND_DATA, KIND_ZERO):
        return f"unknown record kind {kind}"
    if offset + length > size:
        return f"record {offset}+{length} is beyond the disk's end ({size})"
    return None


def _tail(fh: object, at: int, total: int, head: bytes) -> bool:
    """Whether a bad record at ``at`` is the last thing in the file (a write torn by a crash):
    its declared end reaches the end of the file, or the rest is zeros (never written)."""
    if len(head) >= HEADER_BYTES and head[:4] == RECORD_MAGIC:
        _, kind, _, length, _ = HEADER.unpack(head)
        if at + HEADER_BYTES + (length if kind == KIND_DATA else 0) >= total:
            return True
    rest = _read(fh, at - HEADER_BYTES, total - at)
    return not rest.strip(b"\0")
