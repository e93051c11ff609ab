"""Shared by the NBD tests (importable as ``nbdtest``): the spec's numbers, a served
repository, and a raw-socket client that sends what real clients never would."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, Image, MiB, api_backup

from catalog.repo import Repository
from drive.nbd.server import NbdServer

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
SIZE = 6 * MiB + 1536  # the last chunk is partial (and 512-aligned: qemu rounds sizes up to 512)
ODD_SIZE = 3 * MiB + 777  # not even 512-aligned
SOURCE = "web@01"  # a source name with '@': export names split at the last one

# Spec numbers, written out here so that the test checks the server's constants.
NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED, OPT_SET_META = 1, 2, 3, 7, 8, 10
OPT_STARTTLS = 5
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 6
REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_TLS_REQD = 2**31 + 2, 2**31 + 3, 2**31 + 5
REQUEST_MAGIC, SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 6, 7
FLAG_DF, FLAG_REQ_ONE = 1 << 2, 1 << 3
TYPE_NONE, TYPE_DATA, TYPE_HOLE, TYPE_STATUS, TYPE_ERROR = 0, 1, 2, 5, 2**15 + 1
EPERM, EIO, EINVAL = 1, 5, 22


class Served:
    def __init__(self, server: NbdServer, image: Path, odd: Path, point_id: str) -> None:
        self.server = server
        self.port = server.address[1]
        self.image, self.odd, self.point_id = image, odd, point_id
        self.export = f"{SOURCE}@{point_id}"

    def uri(self, export: str | None = None) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export or self.export}"


def start(server: NbdServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def serving(
    tmp_path_factory: pytest.TempPathFactory, tls: ssl.SSLContext | None = None
) -> Iterator[Served]:
    """A server on an ephemeral port over two backed-up points (a module fixture's body);
    with ``tls``, clients must start TLS first."""
    tmp = tmp_path_factory.mktemp("nbd")
    img = Image(tmp / "disk.img", SIZE)  # holes everywhere else
    img.random(100_000, 2 * MiB, seed=1)
    img.zeros(3 * MiB, MiB)  # written zeros: zero chunks, not data
    img.compressible(5 * MiB, MiB + 1536, seed=2)  # up to the partial last chunk
    odd = Image(tmp / "odd.img", ODD_SIZE)
    odd.random(ODD_SIZE - 5000, 5000, seed=3)
    repo = Repository.init(str(tmp / "repo"), CHUNK, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name=SOURCE)
    api_backup(repo.location, odd.path, name="odd")
    server = NbdServer(Repository.open(repo.location, password=TEST_PASSWORD), port=0, tls=tls)
    thread = start(server)
    yield Served(server, img.path, odd.path, point.id)
    server.shutdown()
    thread.join(10)


# -- a raw-socket client -----------------------------------------------------------------------


def name_data(export: str, tail: bytes) -> bytes:
    return struct.pack(">I", len(export.encode())) + export.encode() + tail


class RawClient:
    """Just enough NBD to send what real clients never would."""

    def __init__(
        self, port: int, export: str | None = None, structured: bool = False, flags: int = 3
    ) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt, hflags) == (NBDMAGIC, IHAVEOPT, 3)  # fixed newstyle, no zeroes
        self.s.sendall(struct.pack(">I", flags))
        self.structured = structured
        self.kinds: list[int] = []
        if structured:
            assert self.option(OPT_STRUCTURED) == [(REP_ACK, b"")]
        if export is not None:
            self.go(export)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.s.recv(n - len(buf))
            if not part:
                raise EOFError("server closed the connection")
            buf += part
        return buf

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, echoed, rtype, n = struct.unpack(">QIII", self.recv(20))
            assert (magic, echoed) == (OPT_REPLY_MAGIC, opt)
            replies.append((rtype, self.recv(n)))
            if rtype == REP_ACK or rtype & 2**31:
                return replies

    def starttls(self, context: ssl.SSLContext) -> None:
        """NBD_OPT_STARTTLS, then the rest of the connection through TLS."""
        assert self.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        self.s = context.wrap_socket(self.s, server_hostname="127.0.0.1")

    def go(self, export: str) -> None:
        replies = self.option(OPT_GO, name_data(export, struct.pack(">H", 0)))
        assert replies[-1][0] == REP_ACK, replies
        info = next(d for t, d in replies if t == REP_INFO and d[:2] == b"\0\0")
        _, self.size, self.flags = struct.unpack(">HQH", info)

    def request(
        self, kind: int, offset: int, length: int, flags: int = 0, magic: int = REQUEST_MAGIC
    ) -> None:
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, kind, 7, offset, length))

    def chunks(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            magic, flags, kind, cookie, n = struct.unpack(">IHHQI", self.recv(20))
            assert (magic, cookie) == (STRUCTURED_MAGIC, 7)
            out.append((flags, kind, self.recv(n)))
            if flags & 1:
                return out

    def reply(self, offset: int = 0, length: int = 0) -> tuple[int, bytes]:
        """(error, data) of a read (or of any command, with length 0)."""
        if not self.structured:
            magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
            assert (magic, cookie) == (SIMPLE_MAGIC, 7)
            return error, b"" if error else self.recv(length)
        buf, error = bytearray(length), 0
        chunks = self.chunks()
        self.kinds = [kind for _, kind, _ in chunks]
        for _, kind, payload in chunks:
            if kind == TYPE_DATA:
                at = struct.unpack(">Q", payload[:8])[0] - offset
                buf[at : at + len(payload) - 8] = payload[8:]
            elif kind == TYPE_ERROR:
                error, n = struct.unpack(">IH", payload[:6])
                assert n and len(payload) == 6 + n  # a message for humans
            else:
                assert kind in (TYPE_HOLE, TYPE_NONE), kind
        return error, bytes(buf)

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        self.request(READ, offset, length, flags)
        error, data = self.reply(offset, length)
        assert error == 0
        return data


# -- hostile and protocol-level requests -------------------------------------------------------


# -- processes ---------------------------------------------------------------------------------


def serve_process(repo: str, *args: str) -> subprocess.Popen[str]:
    """``comb -r REPO serve ARGS`` as its own process, stdout and stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", repo, "serve", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )


def run_tool(*cmd: str) -> subprocess.CompletedProcess[str]:
    """A client tool (qemu-img, nbdinfo, ...), its output captured; a minute at most."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
