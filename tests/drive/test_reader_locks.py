"""Readers hold a shared lock for their whole life (FORMAT.md 13): while ``serve``, ``mount`` or
``boot`` runs, ``prune`` waits for it and, after ``COMB_LOCK_WAIT``, refuses with one line
naming the reader's lock and removes nothing, so a served point forgotten meanwhile still reads;
once the reader stops, prune runs. ``export`` holds one too, and a lock's heartbeat survives a
failed refresh (a server runs for days)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, Image, MiB, api_backup, assert_one_line_error
from nbdtest import RawClient

from catalog.errors import LockedError, RepositoryError, UsageError
from catalog.repo import Repository
from catalog.store import locks
from catalog.store.local import LocalStorage
from catalog.store.points import RecoveryPoint
from drive.formats import export as formats_export
from pipeline.cli import export_cmd as drive_cmds
from pipeline.cli import serve_cmd

ROOT = Path(__file__).resolve().parents[2]
SIZE = 2 * MiB
HOST = socket.gethostname()


@dataclass
class History:
    repo: Path
    old: RecoveryPoint  # forgotten by the tests while a reader runs
    new: RecoveryPoint
    old_image: bytes


def _history(tmp_path: Path, cli: CliRunner, first_prune: bool = False) -> History:
    """Two points of one disk with nothing in common; the repository uses locks (a prune ran)
    unless ``first_prune``."""
    img = Image(tmp_path / "d.img", SIZE)
    img.random(0, SIZE, seed=1)
    old_image = img.path.read_bytes()
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    old = api_backup(repo.location, img.path, name="d")
    img.random(0, SIZE, seed=2)
    new = api_backup(repo.location, img.path, name="d")
    if not first_prune:
        assert cli("-r", repo.location, "prune").code == 0  # sets the `locks` feature
    return History(Path(repo.location), old, new, old_image)


def _files(repo: Path) -> set[str]:
    skip = ("locks", "tmp")
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.parts[-2] not in skip}


def _refused(cli: CliRunner, h: History, holder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune waits one second for ``holder`` (a description's start), then refuses with one
    line naming it; nothing is removed."""
    before = _files(h.repo)
    monkeypatch.setenv(locks.WAIT_ENV, "1")
    res = cli("-r", h.repo, "prune")
    assert_one_line_error(res, "repository is locked", holder, code=11)
    waits = [ln for ln in res.err.splitlines() if ln.startswith("comb: waiting")]
    assert len(waits) == 1 and holder in waits[0], res.err
    assert before <= _files(h.repo)  # nothing removed (repacking may have added packs)
    monkeypatch.setenv(locks.WAIT_ENV, "0")
    assert len(cli("-r", h.repo, "prune").err.splitlines()) == 1  # no wait: the one line


def _pruned(cli: CliRunner, h: History) -> None:
    """Once the reader stopped: no lock left, and prune removes the forgotten point's data."""
    assert locks.read_locks(Repository.open(str(h.repo), password=TEST_PASSWORD).storage) == []
    res = cli("-r", h.repo, "prune", "--json")
    assert res.code == 0 and '"packs_removed": 0' not in res.out, res.err


def _comb(*args: object, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env=env, start_new_session=True,  # its own group, for the teardown
    )  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # after a failure: the command and what it started (a fake QEMU)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


@pytest.mark.parametrize("first_prune", [False, True], ids=["locks", "first-prune"])
def test_prune_waits_for_serve_and_the_forgotten_point_still_reads(
    tmp_path: Path,
    cli: CliRunner,
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    first_prune: bool,
) -> None:
    """Also a server started before the repository's first forget and prune (no `locks`
    feature yet) holds its lock: the prune that sets the feature must not pull data from it."""
    h = _history(tmp_path, cli, first_prune)
    proc = _comb("-r", h.repo, "serve", "--listen", "127.0.0.1:0")
    procs.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith("serving 2 recovery points"), line + proc.stderr.read()
    port = int(line.split("nbd://127.0.0.1:")[1].split("/")[0])
    with RawClient(port, f"d@{h.old.id}", structured=True) as client:  # opens nothing yet
        assert cli("-r", h.repo, "forget", h.old.id).code == 0
        _refused(cli, h, f"serve (shared) by {HOST} pid {proc.pid} since", monkeypatch)
        assert client.read(0, SIZE) == h.old_image  # its leaves, segment and packs are there
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err, err  # Ctrl-C: as mount and boot
    _pruned(cli, h)


def _need_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    pytest.importorskip("pyfuse3")


def test_prune_waits_for_mount(
    tmp_path: Path,
    cli: CliRunner,
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _need_fuse()
    h = _history(tmp_path, cli)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _comb("-r", h.repo, "mount", mnt)
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("mounted "), line
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert cli("-r", h.repo, "forget", h.old.id).code == 0
        _refused(cli, h, f"mount (shared) by {HOST} pid {proc.pid} since", monkeypatch)
        assert (mnt / "d" / h.old.id / "disk.img").read_bytes() == h.old_image
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:  # after a failure: no process and no dead mount left (ismount is False on one)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        with open("/proc/self/mountinfo") as fh:
            if any(ln.split()[4] == str(mnt) for ln in fh):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    _pruned(cli, h)


def test_prune_waits_for_boot(
    tmp_path: Path,
    cli: CliRunner,
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stand-in QEMU that just waits: boot's server and lock are up while it runs."""
    h = _history(tmp_path, cli)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexec sleep 60\n")
    qemu.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = _comb("-r", h.repo, "boot", h.new.id, "--accel", "tcg", extra_env={"PATH": path})
    procs.append(proc)
    assert proc.stderr is not None
    assert "comb: accelerator tcg" in proc.stderr.readline()
    assert "booting recovery point" in proc.stderr.readline()
    assert cli("-r", h.repo, "forget", h.old.id).code == 0
    _refused(cli, h, f"boot (shared) by {HOST} pid {proc.pid} since", monkeypatch)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err
    _pruned(cli, h)


def test_export_holds_a_shared_lock(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _history(tmp_path, cli)
    storage = Repository.open(str(h.repo), password=TEST_PASSWORD).storage
    seen: list[list[str]] = []
    real = formats_export.export_image

    def export_image(*args: object, **kwargs: object) -> int:
        seen.append([f"{lk.kind} {lk.exclusive}" for lk in locks.read_locks(storage)])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(drive_cmds, "export_image", export_image)
    res = cli("-r", h.repo, "export", h.old.id, tmp_path / "out.img")
    assert res.code == 0, res.err
    assert seen == [["export False"]] and locks.read_locks(storage) == []
    assert (tmp_path / "out.img").read_bytes() == h.old_image


@pytest.mark.parametrize("error", [UsageError("cannot listen"), KeyboardInterrupt()])
def test_serve_releases_its_lock_on_errors(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    h = _history(tmp_path, cli, first_prune=True)
    storage = Repository.open(str(h.repo), password=TEST_PASSWORD).storage
    seen: list[list[str]] = []

    def failing(repo: Repository, *args: object, **kwargs: object) -> None:
        seen.append([lk.kind for lk in locks.read_locks(storage)])
        raise error

    monkeypatch.setattr(serve_cmd, "NbdServer", failing)
    with pytest.raises(type(error)):
        serve_cmd.cmd_serve(
            str(h.repo), argparse.Namespace(listen="127.0.0.1:0", password=TEST_PASSWORD)
        )
    assert seen == [["serve"]] and locks.read_locks(storage) == []


def test_heartbeat_survives_a_failed_refresh(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write (a full disk, a network hiccup) must not end the heartbeat: a server's
    lock would go stale ten minutes later and prune would remove what it serves."""
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.02)
    real = type(repo.storage).write_atomic
    failures = [0]

    def flaky(storage: object, name: str, data: bytes) -> None:
        if name.startswith("locks/") and failures[0] < 3:
            failures[0] += 1
            raise RepositoryError(f"cannot write {name}: No space left on device")
        real(storage, name, data)  # type: ignore[arg-type]

    lock = locks.acquire(repo.storage, "serve")
    try:
        monkeypatch.setattr(type(repo.storage), "write_atomic", flaky)
        first = lock.info.heartbeat
        deadline = time.monotonic() + 5
        while failures[0] < 3 or locks.read_locks(repo.storage)[0].heartbeat == first:
            assert lock._thread.is_alive(), "the heartbeat thread died"
            assert time.monotonic() < deadline, "no heartbeat after the failed refreshes"
            time.sleep(0.02)
    finally:
        lock.release()
    assert locks.read_locks(repo.storage) == []


def test_serve_reads_without_a_lock_on_read_only_media(
    tmp_path: Path,
    cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = _history(tmp_path, cli)
    storage = Repository.open(str(h.repo), password=TEST_PASSWORD).storage
    real = type(storage).write_atomic

    def read_only(s: object, name: str, data: bytes) -> None:
        if name.startswith("locks/"):
            raise RepositoryError(f"cannot create {name}: Read-only file system")
        real(s, name, data)  # type: ignore[arg-type]

    monkeypatch.setattr(type(storage), "write_atomic", read_only)
    seen: list[int] = []

    def stopped(repo: Repository, *args: object, **kwargs: object) -> None:
        seen.append(len(locks.read_locks(storage)))
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_cmd, "NbdServer", stopped)
    with pytest.raises(KeyboardInterrupt):
        serve_cmd.cmd_serve(
            str(h.repo), argparse.Namespace(listen="127.0.0.1:0", password=TEST_PASSWORD)
        )
    assert seen == [0]  # it went on, without a lock
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "comb: note: serve holds no lock" in err, err


def test_key_changes_are_not_held_up_by_readers(tmp_path: Path) -> None:
    """A server's shared lock lasts for days: `key add` must not wait for it, while key
    changes still exclude each other and prune still waits for the server."""
    r = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    other = subprocess.Popen(["sleep", "60"])  # a live process that "holds" the locks
    try:
        time.sleep(0.05)
        serve = _lock_of(other.pid, r, "serve")
        locks.acquire(r.storage, "key", wait_s=0).release()  # not held up by the server
        with pytest.raises(LockedError, match="serve"):
            locks.acquire(r.storage, "prune", wait_s=0)
        serve.release()
        key = _lock_of(other.pid, r, "key")
        with pytest.raises(LockedError, match="key"):
            locks.acquire(r.storage, "key", wait_s=0)
        key.release()
    finally:
        other.kill()
        other.wait()


def _lock_of(pid: int, r: Repository, kind: str) -> locks.Lock:
    """A lock of ``kind`` as process ``pid`` holds it (a process never conflicts with itself)."""
    real = os.getpid
    try:
        os.getpid = lambda: pid
        return locks.acquire(r.storage, kind, wait_s=0)
    finally:
        os.getpid = real


def test_a_reader_that_cannot_read_the_locks_stops(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a lock file that cannot be written lets a reader go on without its lock (read-only
    media); locks that cannot be read (here: a GET of one fails) stop it, or a prune could
    remove what it reads. (Before: any error taking the lock was taken for read-only media.)"""
    h = _history(tmp_path, cli)
    real = LocalStorage.read

    def read(self: LocalStorage, name: str, offset: int = 0, length: int = -1) -> bytes:
        if name.startswith("locks/"):
            raise RepositoryError(f"cannot read {name}: the server hung up")
        return real(self, name, offset, length)

    monkeypatch.setattr(LocalStorage, "read", read)
    res = cli("-r", h.repo, "restore", h.new.id, tmp_path / "out.img")
    assert_one_line_error(res, "the server hung up")
    assert not (tmp_path / "out.img").exists()
