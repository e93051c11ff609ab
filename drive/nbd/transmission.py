"""The transmission phase of one NBD connection: the request loop over an export.

Owns ``Transmission`` (reads with simple or structured replies, block status for
``base:allocation``, cache and flush; on a writable export writes, trims and write-zeroes),
what it needs of an export (``ReadOnlyExport``, ``WritableExport``) and how a refused request
is answered (``RequestError``: an NBD error code, the connection goes on). The wire format is
``drive.nbd.proto``'s. Knows nothing about recovery points, repositories or the negotiation
(``drive.nbd.server``).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Protocol

from drive.nbd.proto import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
    ENOSPC,
    EPERM,
    MAX_DESCRIPTORS,
    MAX_REQUEST_BYTES,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    Disconnect,
    chunk_header,
    discard,
    recv_exact,
    send_parts,
    simple_reply,
    structured_error,
)

log = logging.getLogger("comb.nbd")


class ReadOnlyExport(Protocol):
    """What the transmission phase needs from an export."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def segments(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering the range, at most ``limit`` (0: all)."""
        ...


class WritableExport(ReadOnlyExport, Protocol):
    """An export that takes writes (``writable`` is True); FUA asks for durability on return."""

    writable: bool

    def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    def zero(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...


class RequestError(Exception):
    """A request the server refuses with an NBD error code (the connection goes on)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


_WRITES = {CMD_WRITE: "write", CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write zeroes"}


class Transmission:
    """The request loop of one connection: reads (simple or structured replies), block status
    for ``base:allocation``, cache as a no-op; on a read-only export flush is a no-op and
    writes are refused with EPERM, on a writable one (``WritableExport``) writes, trims and
    write-zeroes go to the export and flush makes them durable.

    ``read_errors`` are the exceptions a read may raise for damaged or unreadable data; they
    become EIO for that request only (ENOSPC for a full disk when writing)."""

    def __init__(
        self,
        sock: socket.socket,
        export: ReadOnlyExport,
        structured: bool,
        meta_context: int | None,
        read_errors: tuple[type[Exception], ...],
    ) -> None:
        self.sock = sock
        self.export = export
        self.structured = structured
        self.meta_context = meta_context
        self.read_errors = read_errors
        self.writable = bool(getattr(export, "writable", False))

    def serve(self) -> None:
        """Until NBD_CMD_DISC or end of stream; a bad request magic raises ``Disconnect``."""
        while True:
            try:
                header = recv_exact(self.sock, REQUEST.size)
            except Disconnect:
                return
            magic, flags, kind, cookie, offset, length = REQUEST.unpack(header)
            if magic != REQUEST_MAGIC:
                raise Disconnect(f"bad request magic {magic:#x}")
            if kind == CMD_DISC:
                return
            payload = b""
            if kind == CMD_WRITE:
                if length > MAX_REQUEST_BYTES:
                    raise Disconnect(f"write payload of {length} bytes")
                if self.writable:
                    payload = recv_exact(self.sock, length)
                else:
                    discard(self.sock, length)
            try:
                if kind in _WRITES and self.writable:
                    self._write(flags, kind, cookie, offset, length, payload)
                else:
                    self._command(flags, kind, cookie, offset, length)
            except RequestError as err:
                (log.warning if err.error == EIO else log.debug)("request refused: %s", err)
                self._error(cookie, err.error, str(err))

    def _command(self, flags: int, kind: int, cookie: int, offset: int, length: int) -> None:
        if kind in _WRITES:
            raise RequestError(EPERM, f"{_WRITES[kind]}: the export is read-only")
        if kind == CMD_FLUSH:
            if self.writable:
                self._check(flags, 0, offset, 0, 0)
                self._guard("flush", self.export.flush)  # type: ignore[attr-defined]
            self._ok(cookie)
        elif kind == CMD_READ:
            allowed = CMD_FLAG_FUA | (CMD_FLAG_DF if self.structured else 0)
            self._check(flags, allowed, offset, length, MAX_REQUEST_BYTES)
            self._read(flags, cookie, offset, length)
        elif kind == CMD_CACHE:
            self._check(flags, CMD_FLAG_FUA, offset, length, 1 << 32)
            self._ok(cookie)
        elif kind == CMD_BLOCK_STATUS:
            if self.meta_context is None:
                raise RequestError(EINVAL, "block status: no metadata context was selected")
            self._check(flags, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, offset, length, 1 << 32)
            if not length:
                raise RequestError(EINVAL, "block status of zero bytes")
            self._block_status(flags, cookie, offset, length)
        else:
            raise RequestError(EINVAL, f"unknown command {kind}")

    def _write(
        self, flags: int, kind: int, cookie: int, offset: int, length: int, payload: bytes
    ) -> None:
        export: WritableExport = self.export  # type: ignore[assignment]
        allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if kind == CMD_WRITE_ZEROES else 0)
        self._check(
            flags, allowed, offset, length, MAX_REQUEST_BYTES if kind == CMD_WRITE else 1 << 32
        )
        fua = bool(flags & CMD_FLAG_FUA)
        what = f"{_WRITES[kind]} {offset}+{length}"
        if kind == CMD_WRITE:
            self._guard(what, lambda: export.write(offset, payload, fua))
        else:  # a trimmed range reads back as zeros, as written zeroes do
            self._guard(what, lambda: export.zero(offset, length, fua))
        self._ok(cookie)

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as err:
            code = ENOSPC if err.errno in (errno.ENOSPC, errno.EDQUOT) else EIO
            raise RequestError(code, f"{what}: {err.strerror or err}") from None
        except self.read_errors as err:
            raise RequestError(EIO, f"{what}: {err}") from None

    def _check(self, flags: int, allowed: int, offset: int, length: int, most: int) -> None:
        if flags & ~allowed:
            raise RequestError(EINVAL, f"unsupported command flags {flags:#x}")
        if length > most:
            raise RequestError(EINVAL, f"length {length} exceeds the maximum {most}")
        if offset + length > self.export.size:
            raise RequestError(
                EINVAL, f"{offset}+{length} is beyond the end of the export ({self.export.size})"
            )

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        whole = not self.structured or flags & CMD_FLAG_DF
        pieces: list[tuple[int, int, bytes | None]]
        try:
            if whole:
                pieces = [(offset, length, self.export.read(offset, length))]
            else:
                pieces = [
                    (at, n, self.export.read(at, n) if data else None)
                    for at, n, data in self.export.segments(offset, length)
                ]
        except self.read_errors as err:
            raise RequestError(EIO, f"read {offset}+{length}: {err}") from None
        if not self.structured:
            simple_reply(self.sock, cookie, 0, pieces[0][2] or b"")
            return
        pieces = [piece for piece in pieces if piece[1]]
        if not pieces:
            self._ok(cookie)
            return
        for k, (at, n, data) in enumerate(pieces):
            done = REPLY_FLAG_DONE if k == len(pieces) - 1 else 0
            if data is None:
                body = struct.pack(">QI", at, n)
                self._chunk(done, REPLY_TYPE_OFFSET_HOLE, cookie, body)
            else:
                self._chunk(done, REPLY_TYPE_OFFSET_DATA, cookie, struct.pack(">Q", at), data)

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        limit = 1 if flags & CMD_FLAG_REQ_ONE else MAX_DESCRIPTORS
        extents = self.export.segments(offset, min(length, self.export.size - offset), limit)
        body = struct.pack(">I", self.meta_context) + b"".join(
            struct.pack(">II", n, 0 if data else STATE_HOLE | STATE_ZERO) for _, n, data in extents
        )
        self._chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, body)

    def _chunk(self, flags: int, kind: int, cookie: int, *payload: bytes) -> None:
        header = chunk_header(flags, kind, cookie, sum(len(x) for x in payload))
        send_parts(self.sock, [header, *payload])

    def _ok(self, cookie: int) -> None:
        if self.structured:
            self._chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie)
        else:
            simple_reply(self.sock, cookie)

    def _error(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            structured_error(self.sock, cookie, error, message)
        else:
            simple_reply(self.sock, cookie, error)
