"""The NBD server: real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and a raw-socket client
that sends hostile requests, against recovery points of a sparse image."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import Image, MiB, api_backup, flip_byte, need_tool, repo_files

from catalog.errors import UsageError
from catalog.repo import Repository
from drive.nbd import NbdServer
from drive.source import PointSource
from pipeline.serve_cmd import cmd_serve, parse_listen

CHUNK = 64 * 1024
SIZE = 6 * MiB + 1536  # the last chunk is partial (and 512-aligned: qemu rounds sizes up to 512)
ODD_SIZE = 3 * MiB + 777  # not even 512-aligned
SOURCE = "web@01"  # a source name with '@': export names split at the last one

# Spec numbers, written out here so that the test checks the server's constants.
NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED, OPT_SET_META = 1, 2, 3, 7, 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 6
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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("nbd")
    img = Image(tmp / "disk.img", SIZE)  # holes everywhere else
    img.random(100_000, 2 * MiB, seed=1)
    img.zeros(3 * MiB, MiB)  # written zeros: zero chunks, not data
    img.compressible(5 * MiB, MiB + 1536, seed=2)  # up to the partial last chunk
    odd = Image(tmp / "odd.img", ODD_SIZE)
    odd.random(ODD_SIZE - 5000, 5000, seed=3)
    repo = Repository.init(str(tmp / "repo"), CHUNK, 3)
    point = api_backup(repo.location, img.path, name=SOURCE)
    api_backup(repo.location, odd.path, name="odd")
    server = NbdServer(Repository.open(repo.location), port=0)
    thread = start(server)
    yield Served(server, img.path, odd.path, point.id)
    server.shutdown()
    thread.join(10)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# -- real clients ------------------------------------------------------------------------------


def test_nbdinfo_lists_every_point(served: Served) -> None:
    res = run(need_tool("nbdinfo"), "--json", "--list", served.uri(""))
    assert res.returncode == 0, res.stderr
    exports = {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}
    assert len(exports) == 2 and served.export in exports
    assert any(name.startswith("odd@") for name in exports)
    mine = exports[served.export]
    assert mine["export-size"] == SIZE and mine["is_read_only"] and mine["can_multi_conn"]
    assert mine["block_size_preferred"] == CHUNK and mine["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in mine["contexts"]


def test_nbdinfo_map_matches_the_points_allocation(served: Served) -> None:
    res = run(need_tool("nbdinfo"), "--map", "--json", served.uri())
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)
    assert sum(r["length"] for r in runs) == SIZE
    data = [(r["offset"], r["length"]) for r in runs if r["type"] == 0]
    assert all(r["type"] == 3 for r in runs if r["type"] != 0)  # hole,zero
    repo = Repository.open(served.server.repo.location)
    point = next(pt for pt in repo.points() if pt.id == served.point_id)
    assert data == PointSource(repo, point).extents()
    assert not any(off < 4 * MiB and off + n > 3 * MiB for off, n in data)  # written zeros


def test_copies_equal_the_image(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    res = run(need_tool("nbdcopy"), served.uri(), str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == served.image.read_bytes()
    res = run(
        need_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(served.image), served.uri()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out2 = tmp_path / "out2.img"
    res = run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri(), str(out2))
    assert res.returncode == 0, res.stderr
    assert out2.read_bytes() == served.image.read_bytes()


def test_names_latest_prefix_and_unknown(served: Served, tmp_path: Path) -> None:
    nbdcopy = need_tool("nbdcopy")
    for name in (f"{SOURCE}@latest", f"{SOURCE}@{served.point_id[:6]}"):
        res = run(nbdcopy, served.uri(name), "null:")
        assert res.returncode == 0, res.stderr
    odd_out = tmp_path / "odd.img"
    res = run(nbdcopy, served.uri("odd@latest"), str(odd_out))
    assert res.returncode == 0, res.stderr
    assert odd_out.read_bytes() == served.odd.read_bytes()
    for bad in (f"{SOURCE}@ffff", "web@latest", "odd", f"odd@{served.point_id}"):
        res = run(need_tool("nbdinfo"), served.uri(bad))
        assert res.returncode != 0, bad


def test_qemu_io_cannot_write(served: Served) -> None:
    before = {p: p.stat().st_mtime_ns for p in Path(served.server.repo.location).rglob("*")}
    res = run(need_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xcd 0 4k", served.uri())
    assert res.returncode != 0, res.stdout
    after = {p: p.stat().st_mtime_ns for p in Path(served.server.repo.location).rglob("*")}
    assert before == after
    with RawClient(served.port, served.export) as c:
        assert c.read(0, 4096) == served.image.read_bytes()[:4096]


def test_two_clients_read_at_once(served: Served, tmp_path: Path) -> None:
    nbdcopy = need_tool("nbdcopy")
    outs = [tmp_path / f"c{i}.img" for i in range(2)]
    procs = [subprocess.Popen([nbdcopy, served.uri(), str(o)]) for o in outs]
    raw_ok: list[bool] = []

    def raw() -> None:
        with RawClient(served.port, served.export, structured=True) as c:
            data = served.image.read_bytes()
            raw_ok.append(
                all(
                    c.read(o, 300_000) == data[o : o + 300_000]
                    for o in range(0, SIZE - 300_000, 250_000)
                )
            )

    threads = [threading.Thread(target=raw) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [pr.wait(60) for pr in procs] == [0, 0]
    assert raw_ok == [True, True]
    for o in outs:
        assert o.read_bytes() == served.image.read_bytes()


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


@pytest.mark.parametrize("structured", [False, True])
def test_refused_requests_get_errors_and_the_connection_goes_on(
    served: Served, structured: bool
) -> None:
    image = served.image.read_bytes()
    with RawClient(served.port, served.export, structured) as c:
        assert c.size == SIZE and c.flags & 0b11 == 0b11  # has flags, read-only
        for kind, offset, length, want in [
            (READ, SIZE - 100, 200, EINVAL),  # runs past the end
            (READ, SIZE + 4096, 1, EINVAL),  # starts past the end
            (READ, 0, 32 * MiB + 1, EINVAL),  # longer than the advertised maximum
            (42, 0, 0, EINVAL),  # unknown command
            (TRIM, 0, 4096, EPERM),
            (WRITE_ZEROES, 0, 4096, EPERM),
            (BLOCK_STATUS, 0, 4096, EINVAL),  # no metadata context selected
            (FLUSH, 0, 0, 0),
        ]:
            c.request(kind, offset, length)
            assert c.reply()[0] == want, (kind, offset, length)
        c.request(WRITE, 0, 8192)
        c.s.sendall(b"x" * 8192)  # the payload is read and dropped: the stream stays in step
        assert c.reply()[0] == EPERM
        assert c.read(0, SIZE) == image
        assert c.read(SIZE - 1, 1) == image[-1:]
        c.request(DISC, 0, 0)
        assert c.s.recv(1) == b""
    with RawClient(served.port, served.export) as c:
        assert c.read(0, SIZE) == image  # nothing was written


def test_bad_magic_and_broken_clients_only_end_their_own_connection(served: Served) -> None:
    with RawClient(served.port, served.export) as c:
        c.request(READ, 0, 512, magic=0xDEADBEEF)
        assert c.s.recv(1) == b""  # hung up
    c = RawClient(served.port, served.export)
    c.s.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, READ))  # half a request, then gone
    c.s.close()
    c = RawClient(served.port, served.export)
    c.request(WRITE, 0, MiB)
    c.s.sendall(b"x" * 1000)  # a write whose payload never arrives
    c.s.close()
    c = RawClient(served.port)
    c.s.sendall(struct.pack(">QI", IHAVEOPT, OPT_GO))  # half an option
    c.s.close()
    with RawClient(served.port, served.export, structured=True) as c:
        assert c.read(0, SIZE) == served.image.read_bytes()


def test_negotiation(served: Served) -> None:
    with RawClient(served.port) as c:
        assert c.option(99)[-1][0] == REP_ERR_UNSUP
        names = [d[4 : 4 + int.from_bytes(d[:4], "big")].decode() for t, d in c.option(OPT_LIST)]
        assert served.export in names
        assert c.option(OPT_GO, name_data("nosuch@latest", b"\0\0"))[-1][0] == REP_ERR_UNKNOWN
        assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    with RawClient(served.port, flags=1) as c:  # the old way in, with the 124 zero bytes
        c.s.sendall(
            struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(SOURCE) + 7) + b"web@01@latest"
        )
        size, flags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and flags & 1 and c.recv(124) == bytes(124)
        assert c.read(100_000, 5000) == served.image.read_bytes()[100_000:105_000]
    with RawClient(served.port) as c:
        c.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 6) + b"nosuch")
        assert c.s.recv(1) == b""  # no way to say no but hanging up


def test_structured_reads_and_block_status(served: Served) -> None:
    image = served.image.read_bytes()
    with RawClient(served.port, structured=True) as c:
        query = struct.pack(">II", 1, 15) + b"base:allocation"
        replies = c.option(OPT_SET_META, name_data(served.export, query))
        assert [t for t, _ in replies] == [REP_META, REP_ACK]
        assert replies[0][1][4:] == b"base:allocation"
        context = int.from_bytes(replies[0][1][:4], "big")
        c.go(served.export)
        assert c.flags & (1 << 7)  # SEND_DF, with structured replies only
        assert c.read(0, SIZE) == image
        assert TYPE_HOLE in c.kinds and TYPE_DATA in c.kinds
        assert c.read(3 * MiB, MiB) == bytes(MiB) and c.kinds == [TYPE_HOLE]
        assert c.read(0, 4 * MiB, FLAG_DF) == image[: 4 * MiB] and c.kinds == [TYPE_DATA]
        c.request(BLOCK_STATUS, 0, SIZE)
        ((flags, kind, payload),) = c.chunks()
        assert kind == TYPE_STATUS and int.from_bytes(payload[:4], "big") == context
        desc = list(struct.iter_unpack(">II", payload[4:]))
        assert sum(n for n, _ in desc) == SIZE and {s for _, s in desc} == {0, 3}
        c.request(BLOCK_STATUS, 0, 1000, FLAG_REQ_ONE)
        ((_, kind, payload),) = c.chunks()
        assert payload[4:] == struct.pack(">II", 1000, 3)  # one extent, a hole
        c.request(BLOCK_STATUS, SIZE, 512)
        assert c.reply()[0] == EINVAL


def test_a_corrupt_chunk_is_eio_and_the_server_goes_on(tmp_path: Path) -> None:
    img = Image(tmp_path / "d.img", 2 * MiB)
    img.random(0, 2 * MiB, seed=9)
    repo = Repository.init(str(tmp_path / "repo"), CHUNK, 3)
    point = api_backup(repo.location, img.path, name="bad")
    flip_byte(repo_files(Path(repo.location), "packs")[0], 100)
    server = NbdServer(Repository.open(repo.location), port=0)
    thread = start(server)
    try:
        for structured in (False, True):
            with RawClient(server.address[1], f"bad@{point.id}", structured) as c:
                errors = []
                for off in range(0, 2 * MiB, CHUNK):
                    c.request(READ, off, CHUNK)
                    errors.append(c.reply(off, CHUNK)[0])
                assert set(errors) == {0, EIO}
                c.request(READ, 0, 2 * MiB)  # the parallel path
                assert c.reply(0, 2 * MiB)[0] == EIO
                assert c.read(MiB, CHUNK) == img.path.read_bytes()[MiB : MiB + CHUNK]
    finally:
        server.shutdown()
        thread.join(10)


# -- the command -------------------------------------------------------------------------------


def test_serve_command_refuses_bad_addresses(served: Served) -> None:
    for bad in ("nonsense", "127.0.0.1:99999", "127.0.0.1:http", "::1:10809", "[::1]"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":1234") == ("127.0.0.1", 1234)
    repo = served.server.repo.location
    with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
        cmd_serve(repo, argparse.Namespace(listen=f"127.0.0.1:{served.port}"))  # in use
    with pytest.raises(UsageError, match="cannot listen"):
        cmd_serve(repo, argparse.Namespace(listen="no-such-host.invalid:10809"))


def test_serve_command_stops_on_sigterm(served: Served) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "-r",
            served.server.repo.location,
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "serving 2 recovery points" in line, line + proc.stderr.read()
        port = int(line.split("nbd://127.0.0.1:")[1].split("/")[0])
        with RawClient(port, served.export) as c:
            assert c.read(0, 4096) == served.image.read_bytes()[:4096]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            assert c.s.recv(1) == b""  # the open connection was closed
        assert "Traceback" not in proc.stderr.read()


def test_the_chunk_cache_is_configurable(served: Served) -> None:
    """``serve --cache-mib``: each served point's decoded-chunk cache holds at most that much."""
    from drive.nbd_exports import SourceCache

    repo = served.server.repo
    point = repo.points()[0]
    cache = SourceCache(repo, max_sources=1, cache_chunks=2)
    src = cache.get(point).source
    for off in range(0, min(point.size, 8 * point.chunk_size), point.chunk_size):
        src.read(off, 512)
    assert len(src._cache) <= 2
    with pytest.raises(UsageError, match="cache-mib"):
        cmd_serve(repo.location, argparse.Namespace(listen="127.0.0.1:0", cache_mib=0))
