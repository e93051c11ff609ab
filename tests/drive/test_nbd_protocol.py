"""The NBD protocol through a raw-socket client: refused and hostile requests, negotiation,
structured replies and block status."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, Image, MiB, api_backup, flip_byte, repo_files
from nbdtest import (
    BLOCK_STATUS,
    CHUNK,
    DISC,
    EINVAL,
    EIO,
    EPERM,
    FLAG_DF,
    FLAG_REQ_ONE,
    FLUSH,
    IHAVEOPT,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_SET_META,
    READ,
    REP_ACK,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REQUEST_MAGIC,
    SIZE,
    SOURCE,
    TRIM,
    TYPE_DATA,
    TYPE_HOLE,
    TYPE_STATUS,
    WRITE,
    WRITE_ZEROES,
    RawClient,
    Served,
    name_data,
    serving,
    start,
)

from catalog.repo import Repository
from drive.nbd.server import NbdServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serving(tmp_path_factory)


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


def test_export_names_are_point_specs(served: Served) -> None:
    """A client names a point as every command does (``catalog.store.points.resolve``): an id,
    a unique prefix, SOURCE@latest or SOURCE@PREFIX; the export answers with its canonical
    name, and a name that names no point is refused with the reason."""
    info_name = 1  # NBD_INFO_NAME
    head = served.image.read_bytes()[:4096]
    short = served.point_id[:8]
    for name in (served.point_id, short, f"{SOURCE}@latest", f"{SOURCE}@{short}"):
        with RawClient(served.port) as c:
            replies = c.option(OPT_GO, name_data(name, struct.pack(">HH", 1, info_name)))
            assert replies[-1][0] == REP_ACK, (name, replies)
            assert (REP_INFO, struct.pack(">H", info_name) + served.export.encode()) in replies
            assert c.read(0, 4096) == head
    with RawClient(served.port) as c:
        for name, reason in [
            ("nosuch@latest", "no recovery point for source 'nosuch'"),
            (f"odd@{served.point_id}", f"no recovery point '{served.point_id}' of source 'odd'"),
            ("odd", "'odd' is not a recovery point id"),
        ]:
            kind, message = c.option(OPT_GO, name_data(name, b"\0\0"))[-1]
            assert kind == REP_ERR_UNKNOWN and reason in message.decode(), (name, message)


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
    repo = Repository.init(str(tmp_path / "repo"), CHUNK, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name="bad")
    flip_byte(repo_files(Path(repo.location), "packs")[0], 100)
    server = NbdServer(Repository.open(repo.location, password=TEST_PASSWORD), port=0)
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
