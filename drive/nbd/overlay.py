"""An overlay as a writable NBD export: its written runs on top of its base recovery point.

Owns only the combination: reads take written runs from the overlay's log and the rest from the
base point; block status reports written data as data, and zero records and the base's holes as
holes. Writes, zeroes and flushes go to ``drive.overlays.overlay.Overlay``; the base is never
written.
"""

from __future__ import annotations

from drive.nbd.transmission import ReadOnlyExport
from drive.overlays.overlay import Overlay


class ServedOverlay:
    """``overlay/NAME``: safe for several connections at once (the overlay serialises writes)."""

    writable = True

    def __init__(self, overlay: Overlay, base: ReadOnlyExport, granularity: int) -> None:
        self.overlay = overlay
        self.base = base
        self.size = overlay.size
        self.granularity = granularity

    def read(self, offset: int, length: int) -> bytes:
        if not length:
            return b""
        out = bytearray(length)
        at = offset
        for piece in self.overlay.pieces(offset, length):
            if piece.start > at:
                out[at - offset : piece.start - offset] = self.base.read(at, piece.start - at)
            if piece.pos >= 0:  # zero records are already zeros in ``out``
                out[piece.start - offset : piece.end - offset] = self.overlay.read_piece(piece)
            at = piece.end
        if at < offset + length:
            out[at - offset :] = self.base.read(at, offset + length - at)
        return bytes(out)

    def segments(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        at, end = offset, offset + length
        for piece in self.overlay.pieces(offset, length):
            if piece.start > at:
                runs.extend(self.base.segments(at, piece.start - at))
            runs.append((piece.start, piece.end - piece.start, piece.pos >= 0))
            at = piece.end
        if at < end:
            runs.extend(self.base.segments(at, end - at))
        merged: list[tuple[int, int, bool]] = []
        for at, n, data in runs:
            if merged and merged[-1][2] == data and merged[-1][0] + merged[-1][1] == at:
                merged[-1] = (merged[-1][0], merged[-1][1] + n, data)
            elif n:
                if limit and len(merged) == limit:
                    break
                merged.append((at, n, data))
        return merged

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.overlay.write(offset, data, fua)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.overlay.zero(offset, length, fua)

    def flush(self) -> None:
        self.overlay.flush()
