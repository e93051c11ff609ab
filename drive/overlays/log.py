"""The write log of an overlay: record format, replay, and the in-memory extent map.

Owns the bytes of ``overlays/<name>/log-<n>.dat`` (FORMAT.md, "Overlays"): append-only files of
records, each a fixed header (magic, kind, offset, length, BLAKE3 of header and payload) and,
for data records, the payload. Replay rebuilds the extent map (later records win); a torn or
bad record at the end of the last log is a crash mid-write and is cut off, one anywhere else is
corruption. Reads and writes go through a storage's log handle (``catalog.store.inplace``).
Knows nothing about locks, names or NBD (``drive.overlays.overlay``).

In an encrypted repository every data record is sealed (flag bit 0): its payload is
``nonce ‖ AES-256-GCM(plain) ‖ tag`` with the first 24 header bytes, the overlay's random id,
the log number and the record's position in the log as associated data (``record_aad``), so a
record cannot be moved to another offset, overlay, log or place in a log (records cut off the
end of a log are not detected). A run of a sealed record is read by opening the whole record
(``Sealed.read``); the last few opened records are kept for sequential reads.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field

import blake3

from catalog.errors import CorruptionError
from catalog.store.crypto import SEAL_OVERHEAD_BYTES
from catalog.store.inplace import LogFile
from catalog.store.sealing import Sealer

RECORD_MAGIC = b"CMBW"
KIND_DATA = 1
KIND_ZERO = 2
FLAG_SEALED = 1
SEAL_OVERHEAD = SEAL_OVERHEAD_BYTES  # nonce and tag of a sealed payload
# magic, kind, flags, 2 reserved bytes, offset, length, then 16 bytes of BLAKE3 over the first
# 24 header bytes and the stored payload (a record is whole or it is not: torn writes are found).
HEADER = struct.Struct("<4sBB2xQQ16s")
HEADER_BYTES = HEADER.size  # 40
_CHECKED = 24  # header bytes covered by the checksum (everything before it)
_READ_BYTES = 4 << 20  # replay reads the log in pieces of this size


def checksum(head: bytes, payload: bytes | memoryview) -> bytes:
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest(16)


def record_aad(head: bytes, ident: str, log: int, at: int) -> bytes:
    """Associated data of a sealed record: its header, and where it belongs."""
    return head[:_CHECKED] + f"|{ident}|{log}|{at}".encode()


def encode_record(
    kind: int,
    offset: int,
    length: int,
    payload: bytes | memoryview,
    sealer: Sealer,
    where: tuple[str, int, int] = ("", 0, 0),
) -> tuple[bytes, bytes | memoryview]:
    """(header, stored payload) of one record; a data record's payload is sealed in an
    encrypted repository, bound to ``where`` = (overlay id, log number, position in the log)."""
    flags = FLAG_SEALED if sealer.encrypted and kind == KIND_DATA else 0
    head = HEADER.pack(RECORD_MAGIC, kind, flags, offset, length, bytes(16))[:_CHECKED]
    if flags:
        payload = sealer.seal_record(payload, record_aad(head, *where))
    return head + checksum(head, payload), payload


def stored_length(kind: int, flags: int, length: int) -> int:
    if kind != KIND_DATA:
        return 0
    return length + (SEAL_OVERHEAD if flags & FLAG_SEALED else 0)


@dataclass
class Sealed:
    """Reads runs of sealed records: where each record of each log starts, and a few opened
    records (an NBD read usually covers parts of the same record as the previous one)."""

    sealer: Sealer
    ident: str  # the overlay's id (overlay.json), bound into every record
    starts: dict[int, list[int]] = field(default_factory=dict)  # log -> record offsets
    _cache: OrderedDict[tuple[int, int], bytes] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, log: int, at: int) -> None:
        with self._lock:
            self.starts.setdefault(log, []).append(at)

    def read(self, file: LogFile, log: int, pos: int, n: int, where: str) -> bytes:
        """``n`` plain bytes at ``pos`` (the record's payload start + the plain offset)."""
        with self._lock:
            starts = self.starts.get(log, [])
            i = bisect_right(starts, pos - HEADER_BYTES) - 1
            at = starts[i] if i >= 0 else -1
            plain = self._cache.get((log, at))
            if plain is not None:
                self._cache.move_to_end((log, at))
        if at < 0:
            raise CorruptionError(f"{where}: log {log} has no record at {pos}")
        if plain is None:
            head = file.pread(HEADER_BYTES, at)
            _magic, kind, flags, _off, length, _ = HEADER.unpack(head)
            body = file.pread(stored_length(kind, flags, length), at + HEADER_BYTES)
            aad = record_aad(head, self.ident, log, at)
            plain = bytes(self.sealer.open_record(body, aad, f"{where} log {log} at {at}"))
            with self._lock:
                self._cache[(log, at)] = plain
                while len(self._cache) > 8:
                    self._cache.popitem(last=False)
        lo = pos - at - HEADER_BYTES
        if lo + n > len(plain):
            raise CorruptionError(f"{where}: log {log} is shorter than its map")
        return plain[lo : lo + n]


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
    file_bytes: int  # its length as replayed (with a torn tail)
    modified: float  # when it was last written (``LogFile.modified``)


def replay(
    file: LogFile,
    path: str,
    log: int,
    last: bool,
    size: int,
    into: ExtentMap | None,
    sealed: Sealed | None = None,
    encrypted: bool | None = None,
) -> Replayed:
    """Read every record of one log file (``path`` in messages) in order, adding it to ``into``
    (None: only count). A bad record at the end of the last log is a torn tail; anywhere else
    CorruptionError. ``sealed``: an encrypted repository's sealer and record index (every data
    record must be sealed and is authenticated here); ``encrypted`` False: no record may be
    sealed."""
    total = file.size()
    at = written = 0
    while at < total:
        head = file.pread(HEADER_BYTES, at)
        bad = _bad_header(head, size)
        if bad is None:
            magic, kind, flags, offset, length, digest = HEADER.unpack(head)
            body = stored_length(kind, flags, length)
            end = at + HEADER_BYTES + body
            if end > total:
                bad = "the record runs past the end of the file"
            elif into is not None:
                payload = _read(file, at, body)
                if checksum(head[:_CHECKED], payload) != digest:
                    bad = "checksum mismatch"
                elif kind == KIND_DATA and _sealing_wrong(flags, sealed, encrypted):
                    raise CorruptionError(
                        f"overlay log {path} at offset {at}: a "
                        f"{'sealed' if flags else 'plain'} record in "
                        f"{'an encrypted' if sealed else 'a plain'} repository (tampered)"
                    )
                elif sealed is not None and kind == KIND_DATA:
                    aad = record_aad(head, sealed.ident, log, at)
                    sealed.sealer.open_record(payload, aad, f"overlay log {path} at {at}")
                    sealed.add(log, at)
        if bad is not None:
            if last and (bad.startswith("the record runs") or _tail(file, at, total, head)):
                return Replayed(at, True, written, total, file.modified())
            raise CorruptionError(f"overlay log {path} at offset {at}: {bad}")
        if into is not None:
            into.add(offset, offset + length, log, at + HEADER_BYTES if body else -1)
        written += length
        at = end
    return Replayed(at, False, written, total, file.modified())


def _sealing_wrong(flags: int, sealed: Sealed | None, encrypted: bool | None) -> bool:
    if sealed is not None:
        return not flags & FLAG_SEALED
    return bool(flags & FLAG_SEALED) and encrypted is False


def _read(file: LogFile, at: int, n: int) -> bytes:
    parts = []
    pos = at + HEADER_BYTES
    while n:
        part = file.pread(min(n, _READ_BYTES), pos)
        if not part:
            break
        parts.append(part)
        pos += len(part)
        n -= len(part)
    return b"".join(parts)


def _bad_header(head: bytes, size: int) -> str | None:
    if len(head) < HEADER_BYTES:
        return "the record runs past the end of the file (a partial header)"
    magic, kind, flags, offset, length, _ = HEADER.unpack(head)
    if magic != RECORD_MAGIC:
        return "bad record magic"
    if kind not in (KIND_DATA, KIND_ZERO):
        return f"unknown record kind {kind}"
    if flags & ~FLAG_SEALED or (flags and kind != KIND_DATA):
        return f"unknown record flags {flags:#x}"
    if offset + length > size:
        return f"record {offset}+{length} is beyond the disk's end ({size})"
    return None


def _tail(file: LogFile, at: int, total: int, head: bytes) -> bool:
    """Whether a bad record at ``at`` is the last thing in the file (a write torn by a crash):
    its declared end reaches the end of the file, or the rest is zeros (never written)."""
    if len(head) >= HEADER_BYTES and head[:4] == RECORD_MAGIC:
        _, kind, flags, _, length, _ = HEADER.unpack(head)
        if at + HEADER_BYTES + stored_length(kind, flags, length) >= total:
            return True
    rest = _read(file, at - HEADER_BYTES, total - at)
    return not rest.strip(b"\0")
