"""The NBD server with real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and the serve
command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, MiB, need_tool
from nbdtest import (
    CHUNK,
    SIZE,
    SOURCE,
    RawClient,
    Served,
    serving,
)

from catalog.errors import UsageError
from catalog.repo import Repository
from pipeline.cli.serve_cmd import cmd_serve, parse_listen


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serving(tmp_path_factory)


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
    repo = Repository.open(served.server.repo.location, password=TEST_PASSWORD)
    point = next(pt for pt in repo.points() if pt.id == served.point_id)
    assert data == repo.reader(point).extents()
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


def test_serve_command_refuses_bad_addresses(served: Served) -> None:
    for bad in ("nonsense", "127.0.0.1:99999", "127.0.0.1:http", "::1:10809", "[::1]"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":1234") == ("127.0.0.1", 1234)
    repo = served.server.repo.location
    in_use = argparse.Namespace(listen=f"127.0.0.1:{served.port}", password=TEST_PASSWORD)
    with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
        cmd_serve(repo, in_use)
    with pytest.raises(UsageError, match="cannot listen"):
        cmd_serve(
            repo, argparse.Namespace(listen="no-such-host.invalid:10809", password=TEST_PASSWORD)
        )


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
    from drive.nbd.exports import SourceCache

    repo = served.server.repo
    point = repo.points()[0]
    cache = SourceCache(repo, max_sources=1, cache_chunks=2)
    src = cache.get(point).source
    for off in range(0, min(point.size, 8 * point.chunk_size), point.chunk_size):
        src.read(off, 512)
    assert len(src._cache) <= 2
    with pytest.raises(UsageError, match="cache-mib"):
        cmd_serve(
            repo.location,
            argparse.Namespace(listen="127.0.0.1:0", cache_mib=0, password=TEST_PASSWORD),
        )
