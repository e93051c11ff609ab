"""An overlay's log and lock in the library: torn and corrupt records, the exclusive lock, one
pwritev per write, the extent map, raw writes and their errors, and verify's overlay checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    assert_one_line_error,
)
from drivetest import OVERLAY_CHUNK, OVERLAY_SIZE, OVERLAY_SOURCE, overlay_disk

import drive.overlays.log as overlay_log
import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store.sealing import PLAIN
from drive.overlays.overlay import Overlay, OverlayBusy

CHUNK, SIZE, SOURCE = OVERLAY_CHUNK, OVERLAY_SIZE, OVERLAY_SOURCE
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Image, str]:
    return overlay_disk(tmp_path)


def _log(repo: Path, name: str) -> Path:
    return repo / "overlays" / name / "log-0.dat"


def _written(repo: Path, name: str) -> Overlay:
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, name, r.resolve(f"{SOURCE}@latest"))
    o = Overlay(r, name)
    o.write(0, b"a" * 5000)
    o.write(100_000, b"b" * 3000)
    o.zero(2000, 1000)
    o.write(8192, b"c" * 4096, fua=True)
    o.flush()
    return o


def _contents(o: Overlay) -> list[tuple[int, int, bytes]]:
    return [(p.start, p.end, o.read_piece(p)) for p in o.pieces(0, SIZE)]


def test_torn_last_record_is_ignored_and_truncated(disk: tuple[Path, Image, str]) -> None:
    repo, _, _ = disk
    o = _written(repo, "torn")
    before = _contents(o)
    o.close()
    log = _log(repo, "torn")
    good = log.stat().st_size
    with open(log, "ab") as fh:  # a record that never finished: its header and part of its data
        fh.write(overlay_log.encode_record(1, 0, 4096, b"z" * 4096, PLAIN)[0] + b"z" * 100)
    o = Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "torn")
    assert _contents(o) == before and log.stat().st_size == good  # cut away on open
    o.close()
    os.truncate(log, good - 3)  # now the last complete record is torn
    o = Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "torn")
    after = _contents(o)
    assert after != before and (8192, 12288, b"c" * 4096) not in after
    assert (0, 2000, b"a" * 2000) in after
    o.write(8192, b"d" * 10)  # appends after the cut
    o.flush()
    o.close()
    o = Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "torn")
    assert (8192, 8202, b"d" * 10) in _contents(o)
    o.close()


def test_corrupt_middle_record_is_an_error(disk: tuple[Path, Image, str], cli: CliRunner) -> None:
    repo, _, _ = disk
    _written(repo, "bad").close()
    log = _log(repo, "bad")
    with open(log, "r+b") as fh:
        fh.seek(overlay_log.HEADER_BYTES + 10)  # inside the first record's payload
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptionError, match=r"log-0\.dat at offset 0: checksum mismatch"):
        Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "bad")
    # the lock was released: a second try fails the same way, not with "in use"
    with pytest.raises(CorruptionError):
        Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "bad")
    args = ("serve", "--listen", "127.0.0.1:0", "--overlay", f"bad={SOURCE}@latest")
    assert_one_line_error(cli("-r", repo, *args), "log-0.dat", "checksum", code=7)
    res = cli("-r", repo, "overlays")  # listing reads headers only: it still works
    assert res.code == 0 and "bad" in res.out


def test_lock_is_exclusive_in_process(disk: tuple[Path, Image, str]) -> None:
    repo, _, _ = disk
    o = _written(repo, "lk")
    with pytest.raises(OverlayBusy, match="in use"):
        Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "lk")
    with pytest.raises(OverlayBusy):
        overlay.remove(Repository.open(str(repo), password=TEST_PASSWORD), "lk")
    o.close()
    overlay.remove(Repository.open(str(repo), password=TEST_PASSWORD), "lk")


def test_a_write_costs_one_pwritev(
    disk: tuple[Path, Image, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NBD write path: one gathered write per record, an fsync only when asked (FUA)."""
    repo, _, _ = disk
    o = _written(repo, "sys")
    calls: list[str] = []

    def counted(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            calls.append(name)
            return real(*args)

        return call

    for name in ("pwritev", "pwrite", "fsync", "fdatasync", "ftruncate", "fstat", "open"):
        monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
    o.write(4096, b"w" * 512)
    o.zero(0, 100)
    o.write(0, b"f", fua=True)
    monkeypatch.undo()
    assert calls == ["pwritev", "pwritev", "pwritev", "fsync"]
    o.close()


def test_extent_map_later_writes_win() -> None:
    m = overlay_log.ExtentMap()
    m.add(0, 100, 0, 1000)
    m.add(50, 60, 0, -1)
    m.add(90, 200, 1, 5000)
    m.add(10, 20, 0, 7000)
    got = [(p.start, p.end, p.log, p.pos) for p in m.pieces(0, 300)]
    assert got == [
        (0, 10, 0, 1000),
        (10, 20, 0, 7000),
        (20, 50, 0, 1020),
        (50, 60, 0, -1),
        (60, 90, 0, 1060),
        (90, 200, 1, 5000),
    ]
    assert [(p.start, p.pos) for p in m.pieces(55, 10)] == [(55, -1), (60, 1060)]
    m.add(0, 300, 2, 0)
    assert len(m) == 1


# -- the protocol, with a raw-socket client ----------------------------------------------------


def test_raw_writes_flags_and_errors(disk: tuple[Path, Image, str]) -> None:
    import threading  # noqa: PLC0415

    from nbdtest import EINVAL, FLUSH, READ, TRIM, WRITE, WRITE_ZEROES, RawClient  # noqa: PLC0415

    from drive.nbd.server import NbdServer  # noqa: PLC0415
    from pipeline.cli.serve_cmd import close_overlays, open_overlays  # noqa: PLC0415

    repo, img, _ = disk
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlays = open_overlays(r, r.points(), {"raw": f"{SOURCE}@latest"})
    server = NbdServer(r, port=0, overlays=overlays)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for structured in (False, True):
            with RawClient(server.address[1], "overlay/raw", structured) as c:
                assert c.size == SIZE and c.flags & 0b1101101 == 0b1101101  # writable, flush...
                assert not c.flags & 0b10  # ...fua, trim, write zeroes; not read-only
                c.request(WRITE, SIZE - 10, 20)
                c.s.sendall(b"y" * 20)  # beyond the end: refused, the payload still read
                assert c.reply()[0] == EINVAL
                c.request(WRITE, 100, 5, flags=1)  # FUA
                c.s.sendall(b"hello")
                assert c.reply()[0] == 0
                c.request(WRITE_ZEROES, 0, 50, flags=2)  # NO_HOLE
                assert c.reply()[0] == 0
                c.request(TRIM, 0, 10, flags=4)  # DF makes no sense here
                assert c.reply()[0] == EINVAL
                c.request(FLUSH, 0, 0)
                assert c.reply()[0] == 0
                c.request(READ, 0, 200)
                error, data = c.reply(0, 200)
                assert error == 0
                assert (
                    data
                    == bytes(50)
                    + img.path.read_bytes()[50:100]
                    + b"hello"
                    + (img.path.read_bytes()[105:200])
                )
    finally:
        server.shutdown()
        thread.join(10)
        close_overlays(overlays)
    o = Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "raw")  # the lock was released
    assert o.read_piece(o.pieces(100, 5)[0]) == b"hello"
    o.close()


def test_verify_checks_overlays(disk: tuple[Path, Image, str], cli: CliRunner) -> None:
    repo, _, _ = disk
    o = _written(repo, "v1")
    o.close()
    res = cli("-r", repo, "verify")
    assert res.code == 0 and "clean" in res.out, res.err
    log = _log(repo, "v1")
    data = bytearray(log.read_bytes())
    data[overlay_log.HEADER_BYTES + 10] ^= 1  # inside the first record's payload
    log.write_bytes(bytes(data))
    res = cli("-r", repo, "verify")
    assert res.code != 0 and "overlay v1" in res.err and "checksum mismatch" in res.err
    log.write_bytes(bytes(data[: overlay_log.HEADER_BYTES]))  # only a torn tail is left
    res = cli("-r", repo, "verify")
    assert res.code == 0 and "torn record" in res.err, res.err
    base = overlay.read_doc(Repository.open(str(repo), password=TEST_PASSWORD), "v1")["base"]
    os.unlink(repo / "points" / f"{base}.json")
    res = cli("-r", repo, "verify")
    assert res.code != 0 and f"base recovery point {base} is missing" in res.err
