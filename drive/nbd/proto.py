"""The NBD wire format and the transmission phase of a read-only export.

Owns the magics, option/command/reply numbers, framing helpers (exact reads, option replies,
simple and structured replies) and ``Transmission``: the request loop of one connection over
anything with a size, reads and an allocation map (``ReadOnlyExport``). Numbers follow the NBD
protocol specification (NetworkBlockDevice/nbd ``doc/proto.md``); integers are big-endian.
Knows nothing about recovery points or repositories: ``drive.nbd.server`` owns the exports, the
negotiation and the server.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger("comb.nbd")

# Handshake.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7

# Information types (NBD_OPT_INFO / NBD_OPT_GO).
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# Requests.
REQUEST_MAGIC = 0x25609513
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Replies.
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# Errors.
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ESHUTDOWN = 108

# base:allocation.
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_REQUEST_BYTES = 32 << 20  # the spec's interoperable maximum, advertised as the maximum
MAX_OPTION_BYTES = 64 << 10  # option data larger than this is not a client, it is an attack
MAX_STRING_BYTES = 4096  # the spec's limit for names and queries
MAX_DESCRIPTORS = 4096  # block-status extents per reply; clients ask again for the rest


class Disconnect(Exception):
    """The peer closed the connection, or broke the protocol badly enough to hang up."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ``Disconnect`` when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise Disconnect("peer closed the connection")
        got += k
    return bytes(buf)


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (a write's payload), keeping the stream in step."""
    while n:
        n -= len(recv_exact(sock, min(n, 1 << 20)))


def send_parts(sock: socket.socket, parts: Iterable[bytes]) -> None:
    """Send several buffers as one message (header and payload without a copy)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def option_reply(sock: socket.socket, option: int, reply: int, data: bytes = b"") -> None:
    send_parts(sock, [struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)), data])


def option_error(sock: socket.socket, option: int, reply: int, message: str) -> None:
    option_reply(sock, option, reply, message.encode()[:MAX_STRING_BYTES])


def simple_reply(sock: socket.socket, cookie: int, error: int = 0, data: bytes = b"") -> None:
    send_parts(sock, [struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie), data])


def chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def structured_error(sock: socket.socket, cookie: int, error: int, message: str) -> None:
    text = message.encode()[:MAX_STRING_BYTES]
    payload = struct.pack(">IH", error, len(text)) + text
    send_parts(
        sock, [chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)), payload]
    )


def parse_string(data: bytes, at: int) -> tuple[str, int]:
    """A u32-length-prefixed UTF-8 string at ``at``; ValueError if it overruns or is invalid."""
    if at + 4 > len(data):
        raise ValueError("truncated length")
    (n,) = struct.unpack_from(">I", data, at)
    if n > MAX_STRING_BYTES or at + 4 + n > len(data):
        raise ValueError("string overruns the option")
    return data[at + 4 : at + 4 + n].decode(), at + 4 + n


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: export name and the information types asked for."""
    name, at = parse_string(data, 0)
    if at + 2 > len(data):
        raise ValueError("no information request count")
    (count,) = struct.unpack_from(">H", data, at)
    if at + 2 + 2 * count != len(data):
        raise ValueError("information request count does not match the option length")
    return name, list(struct.unpack_from(f">{count}H", data, at + 2))


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: export name and the queries."""
    name, at = parse_string(data, 0)
    if at + 4 > len(data):
        raise ValueError("no query count")
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    queries = []
    for _ in range(count):
        query, at = parse_string(data, at)
        queries.append(query)
    if at != len(data):
        raise ValueError("trailing bytes after the queries")
    return name, queries


def meta_matches(query: str, listing: bool) -> bool:
    """Whether a meta-context query selects ``base:allocation``. The bare ``base:`` namespace
    is a wildcard only when listing; unknown namespaces and leaves are ignored, not errors."""
    if query == META_BASE_ALLOCATION:
        return True
    return listing and query == "base:"


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
