"""The NBD wire format: the numbers, framing and parsing both phases of a connection use.

Owns the magics, option/command/reply numbers, framing helpers (exact reads, option replies,
simple and structured replies) and the parsers of option data (export names, information
requests, meta-context queries). Numbers follow the NBD protocol specification
(NetworkBlockDevice/nbd ``doc/proto.md``); integers are big-endian. Must not keep state or
decide anything: the request loop is ``drive.nbd.transmission``'s; the exports, the negotiation
and the server are ``drive.nbd.server``'s, and it knows nothing about recovery points or
repositories.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable

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
REP_ERR_TLS_REQD = (1 << 31) + 5
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
    """Send several buffers as one message (header and payload without a copy; over TLS,
    which has no ``sendmsg``, joined into one record stream)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(parts))
        return
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
