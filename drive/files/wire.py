"""The frames between comb and its filesystem worker: a JSON header and a byte payload.

A frame is a 4-byte big-endian header length, the header (a JSON object, UTF-8), an 8-byte
payload length and the payload. Both sides use these two functions over a pipe; nothing else
crosses it (no pickles: the worker parses untrusted data and is not trusted in return).

Both sides also compare ``code_stamp``: comb upgraded in place while a long command runs would
start workers of the new code under a parent of the old one, and their frames may not agree.

Owns the framing and the stamp. Must not: know what the headers mean.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from functools import cache
from typing import Any, BinaryIO

MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30


class WireError(Exception):
    """The other side closed the pipe or sent a frame that is not one."""


def send(out: BinaryIO, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    out.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)))
    if payload:
        out.write(payload)
    out.flush()


def _exactly(inp: BinaryIO, n: int) -> bytes:
    """n bytes from the pipe (an unbuffered pipe returns what has arrived: read on)."""
    parts: list[bytes] = []
    while n:
        data = inp.read(n)
        if not data:
            raise WireError("the pipe closed in the middle of a frame" if parts else "closed")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def receive(inp: BinaryIO) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack(">I", _exactly(inp, 4))
    if hlen > MAX_HEADER:
        raise WireError(f"a frame header of {hlen} bytes")
    try:
        header = json.loads(_exactly(inp, hlen))
    except ValueError as err:
        raise WireError(f"a frame header that is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WireError("a frame header that is not a JSON object")
    (plen,) = struct.unpack(">Q", _exactly(inp, 8))
    if plen > MAX_PAYLOAD:
        raise WireError(f"a frame payload of {plen} bytes")
    return header, _exactly(inp, plen) if plen else b""


@cache
def code_stamp() -> str:
    """A digest of the code of this package (both sides of the pipe), as it is on disk now."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]
