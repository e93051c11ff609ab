"""Writable overlays: real clients (qemu-io, qemu-img, nbdcopy, nbdinfo) write through
``overlay/NAME``; the base point stays unchanged; writes survive kill -9 after a flush; the
``overlays`` command and its lock (the log itself: test_overlay_log.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    MiB,
    assert_one_line_error,
    need_tool,
)
from drivetest import OVERLAY_CHUNK, OVERLAY_SIZE, OVERLAY_SOURCE, overlay_disk
from s3server import S3Server

import drive.overlays.overlay as overlay
from catalog.errors import UsageError
from catalog.repo import Repository
from drive.overlays.overlay import Overlay

CHUNK, SIZE, SOURCE = OVERLAY_CHUNK, OVERLAY_SIZE, OVERLAY_SOURCE
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Image, str]:
    return overlay_disk(tmp_path)


class Server:
    """``comb serve`` as a subprocess (``python -m pipeline.cli``), so it can be killed."""

    def __init__(self, repo: Path | str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "pipeline.cli", "-r", str(repo), "serve"]
        self.proc = subprocess.Popen(
            [*cmd, "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.line = self.proc.stdout.readline()
        self.port = 0
        if "nbd://127.0.0.1:" in self.line:
            self.port = int(self.line.split("nbd://127.0.0.1:")[1].split("/")[0])

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()
        return err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(20)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.kill()


def serve(servers: list[Server], repo: Path | str, *args: str) -> Server:
    s = Server(repo, *args)
    servers.append(s)
    assert s.port, s.line + (s.proc.stderr.read() if s.proc.poll() is not None else "")  # type: ignore[union-attr]
    return s


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def qemu_io(uri: str, command: str) -> str:
    res = run(need_tool("qemu-io"), "-f", "raw", "-c", command, uri)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr
    return res.stdout


def expected(img: Image, writes: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(img.path.read_bytes())
    for off, b in writes:
        data[off : off + len(b)] = b
    return bytes(data)


def copy(uri: str, out: Path) -> bytes:
    res = run(need_tool("nbdcopy"), uri, str(out))
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


# -- through real clients ----------------------------------------------------------------------


def test_writes_read_back_and_the_base_is_unchanged(
    disk: tuple[Path, Image, str], servers: list[Server], tmp_path: Path, cli: CliRunner
) -> None:
    repo, img, point_id = disk
    s = serve(servers, repo, "--overlay", f"ov1={SOURCE}@latest")
    assert "1 overlay writable" in s.line, s.line
    uri = s.uri("overlay/ov1")
    qemu_io(uri, "write -P 0xab 4096 8192")
    qemu_io(uri, "write -z 2M 64k")  # over the first chunk of the base's second region
    qemu_io(uri, "write -P 0xcd 3000000 70000")  # across a chunk boundary, over base data
    qemu_io(uri, "discard 65536 65536")  # inside the base's first data region
    want = expected(
        img,
        [
            (4096, b"\xab" * 8192),
            (2 * MiB, bytes(CHUNK)),
            (3000000, b"\xcd" * 70000),
            (65536, bytes(65536)),
        ],
    )
    assert copy(uri, tmp_path / "o.img") == want
    (tmp_path / "want.img").write_bytes(want)
    res = run(
        need_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(tmp_path / "want.img"), uri
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "read 512/512" in qemu_io(uri, "read -P 0xab 4096 512")
    # the base point: its export and an export to a file are the image backed up
    assert copy(s.uri(f"{SOURCE}@{point_id}"), tmp_path / "b.img") == img.path.read_bytes()
    res_cli = cli("-r", repo, "export", point_id, tmp_path / "e.img")
    assert res_cli.code == 0, res_cli.err
    assert (tmp_path / "e.img").read_bytes() == img.path.read_bytes()
    # block status: written data is data, zeroed and trimmed ranges and base holes are holes
    res = run(need_tool("nbdinfo"), "--map", "--json", uri)
    assert res.returncode == 0, res.stderr
    runs = [(r["offset"], r["length"], r["type"]) for r in json.loads(res.stdout)]
    assert sum(n for _, n, _ in runs) == SIZE
    data = [(o, n) for o, n, t in runs if t == 0]
    assert data == [
        (0, CHUNK),  # base data with the 0xab write in it
        (2 * CHUNK, MiB - 2 * CHUNK),  # after the discarded chunk
        (2 * MiB + CHUNK, 5 * CHUNK - CHUNK),  # the base's second region, its first chunk zeroed
        (3000000, 70000),  # written into a base hole
    ]
    assert all(t == 3 for _, _, t in runs if t)
    assert "Traceback" not in s.stop()


def test_listing_and_read_only_points_still_refuse_writes(
    disk: tuple[Path, Image, str], servers: list[Server]
) -> None:
    repo, img, point_id = disk
    s = serve(
        servers, repo, "--overlay", f"a={point_id[:8]}", "--overlay", f"b={SOURCE}@{point_id}"
    )
    res = run(need_tool("nbdinfo"), "--json", "--list", s.uri(""))
    assert res.returncode == 0, res.stderr
    exports = {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}
    assert {"overlay/a", "overlay/b", f"{SOURCE}@{point_id}"} <= set(exports)
    assert (
        not exports["overlay/a"]["is_read_only"] and exports[f"{SOURCE}@{point_id}"]["is_read_only"]
    )
    assert exports["overlay/a"]["export-size"] == SIZE
    res = run(
        need_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xcd 0 4k", s.uri(f"{SOURCE}@latest")
    )
    assert res.returncode != 0 or "error" in res.stdout.lower()
    res = run("nbdinfo", s.uri("overlay/nosuch"))
    assert res.returncode != 0
    s.stop()


def test_flushed_writes_survive_kill_9(
    disk: tuple[Path, Image, str], servers: list[Server], tmp_path: Path
) -> None:
    repo, img, _ = disk
    s = serve(servers, repo, "--overlay", f"crash={SOURCE}@latest")
    qemu_io(s.uri("overlay/crash"), "write -P 0x5a 1M 200k")  # qemu-io flushes before it exits
    qemu_io(s.uri("overlay/crash"), "write -P 0x11 0 512")
    s.kill()
    s = serve(servers, repo)  # existing overlays are served without --overlay
    want = expected(img, [(MiB, b"\x5a" * 200 * 1024), (0, b"\x11" * 512)])
    assert copy(s.uri("overlay/crash"), tmp_path / "o.img") == want
    s.stop()


def test_second_server_and_rm_are_refused_while_served(
    disk: tuple[Path, Image, str], servers: list[Server], cli: CliRunner
) -> None:
    repo, _, _ = disk
    s = serve(servers, repo, "--overlay", f"busy={SOURCE}@latest")
    second = Server(repo, "--overlay", f"busy={SOURCE}@latest")
    servers.append(second)
    assert second.proc.wait(20) != 0
    err = second.stop()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("comb: error: ") and "in use" in lines[0], err
    # without --overlay, the second server serves the points and says why not the overlay
    third = serve(servers, repo)
    assert "overlay" not in third.line
    assert "busy is not served" in third.stop()
    assert_one_line_error(cli("-r", repo, "overlays", "rm", "busy"), "in use")
    s.stop()
    res = cli("-r", repo, "overlays", "rm", "busy")
    assert res.code == 0, res.err
    assert overlay.names(Repository.open(str(repo), password=TEST_PASSWORD)) == []


def test_an_overlay_made_again_after_an_interrupted_rm_starts_empty(
    disk: tuple[Path, Image, str],
) -> None:
    repo, _, point_id = disk
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "again", r.resolve(point_id))
    o = Overlay(r, "again")
    o.write(4096, b"old" * 100)
    o.flush()
    o.close()
    (repo / "overlays" / "again" / "overlay.json").unlink()  # an rm killed after its first step
    overlay.create(r, "again", r.resolve(point_id))
    o = Overlay(r, "again")
    assert len(o.map) == 0 and not o.pieces(0, SIZE)  # the old log is not replayed into it
    o.close()


def test_overlays_command(disk: tuple[Path, Image, str], cli: CliRunner) -> None:
    repo, _, point_id = disk
    res = cli("-r", repo, "overlays")
    assert res.code == 0 and "no overlays" in res.out
    res = cli("-r", repo, "overlays", "create", "test-1.a", f"{SOURCE}@latest")
    assert res.code == 0, res.err
    assert_one_line_error(cli("-r", repo, "overlays", "create", "test-1.a", point_id), "exists")
    o = Overlay(Repository.open(str(repo), password=TEST_PASSWORD), "test-1.a")
    o.write(4096, b"x" * 1000)
    o.zero(0, 100)
    o.flush()
    o.close()
    res = cli("-r", repo, "overlays", "--json")
    assert res.code == 0, res.err
    (doc,) = json.loads(res.out)["overlays"]
    assert doc["name"] == "test-1.a" and doc["base"] == point_id and doc["size"] == SIZE
    assert doc["bytes_written"] == 1100 and doc["last_write"]
    res = cli("-r", repo, "overlays", "list")
    assert res.code == 0 and "test-1.a" in res.out and point_id in res.out and "1.1 KiB" in res.out
    assert cli("-r", repo, "overlays", "rm", "test-1.a").code == 0
    assert_one_line_error(cli("-r", repo, "overlays", "rm", "test-1.a"), "no overlay")
    assert not (repo / "overlays" / "test-1.a").exists()


@pytest.mark.parametrize(
    "name", ["", ".hidden", "..", "a/b", "../x", "a" * 65, "sp ace", "é", "a\nb", "x@y"]
)
def test_hostile_names_are_refused(
    disk: tuple[Path, Image, str], cli: CliRunner, name: str
) -> None:
    repo, _, _ = disk
    for args in (
        ("overlays", "create", name, f"{SOURCE}@latest"),
        ("overlays", "rm", name),
        ("serve", "--listen", "127.0.0.1:0", "--overlay", f"{name}={SOURCE}@latest"),
    ):
        assert_one_line_error(cli("-r", repo, *args), "overlay", code=UsageError.exit_code)
    assert not (repo / "overlays").exists() or os.listdir(repo / "overlays") == []


def test_bad_base_point_is_one_line(disk: tuple[Path, Image, str], cli: CliRunner) -> None:
    repo, _, _ = disk
    assert_one_line_error(cli("-r", repo, "overlays", "create", "x", "nosuch@latest"), code=4)
    line = assert_one_line_error(cli("-r", repo, "serve", "--overlay", "x"), "NAME=POINT")
    assert line


# -- the log -----------------------------------------------------------------------------------


# -- on object storage -------------------------------------------------------------------------


def test_an_overlay_in_an_s3_repository(
    tmp_path: Path,
    servers: list[Server],
    cli: CliRunner,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its log and lock are objects in the bucket: flushed writes survive kill -9 of the
    server, the next server waits out the dead one's lease (server's clock), every open writes
    a new log, the overlay backs up as a point, and ``overlays rm`` leaves no object behind."""
    monkeypatch.setenv("COMB_S3_LEASE_SECONDS", "5")
    _, img, _ = overlay_disk(tmp_path)
    bucket = s3_env.bucket()
    repo = f"s3://{bucket}/repo"
    assert cli("-r", repo, "init", "--chunk-size", str(CHUNK)).code == 0
    assert cli("-r", repo, "backup", img.path, "--source-name", SOURCE).code == 0
    s = serve(servers, repo, "--overlay", f"crash={SOURCE}@latest")
    qemu_io(s.uri("overlay/crash"), "write -P 0x5a 1M 200k")  # qemu-io flushes before it exits
    qemu_io(s.uri("overlay/crash"), "write -P 0x11 0 512")
    s.kill()
    assert_one_line_error(cli("-r", repo, "serve", "--overlay", "crash=x"), "in use")
    time.sleep(8)  # the dead server's lease expires (its age passes 5 s by a whole second)
    s = serve(servers, repo)
    want = [(MiB, b"\x5a" * 200 * 1024), (0, b"\x11" * 512)]
    assert copy(s.uri("overlay/crash"), tmp_path / "o.img") == expected(img, want)
    qemu_io(s.uri("overlay/crash"), "write -P 0x22 3M 4k")
    assert s.stop() == ""
    want.append((3 * MiB, b"\x22" * 4096))
    res = cli("-r", repo, "overlays", "--json")
    (doc,) = json.loads(res.out)["overlays"]
    assert doc["bytes_written"] == 200 * 1024 + 512 + 4096 and doc["last_write"], res.out
    assert cli("-r", repo, "backup", "overlay:crash").code == 0
    assert cli("-r", repo, "restore", f"{SOURCE}@latest", tmp_path / "r.img").code == 0
    assert (tmp_path / "r.img").read_bytes() == expected(img, want)
    assert cli("-r", repo, "verify").code == 0
    listed = s3_env.client().list_objects_v2(Bucket=bucket, Prefix="repo/overlays/crash/")
    logs = {o["Key"].split("/")[3] for o in listed["Contents"]}
    assert {"log-0.dat", "log-1.dat", "log-0.dat.parts", "log-1.dat.parts"} <= logs, logs
    assert cli("-r", repo, "overlays", "rm", "crash").code == 0
    listed = s3_env.client().list_objects_v2(Bucket=bucket, Prefix="repo/overlays/")
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")
