"""Helpers shared by the tests (importable as ``combtest``: conftest.py puts tests/ on sys.path).

Images are real sparse files: ``truncate`` makes holes, writes make data (random, compressible
or explicit zeros). ``Image`` remembers every byte range written since the last
``take_changes()`` so that a test can hand the exact change list to ``--changed-extents``.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import psutil

from catalog.maint.check import check_repository
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from pipeline.engines import LocalEngine
from pipeline.jobs.backup import run_backup
from pipeline.jobs.restore import restore_point
from pipeline.jobs.runner import BackupOptions

KiB = 1024
MiB = 1024 * 1024
PYTHON = sys.executable

# The password of the tests' encrypted repositories: library calls pass it (Repository.open,
# Repository.init); the CLI run in-process reads it from COMB_PASSWORD (tests/conftest.py).
TEST_PASSWORD = "comb test password"


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


CliRunner = Callable[..., CliResult]


class Image:
    """A sparse disk image under construction; records the ranges written."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.changes: list[tuple[int, int]] = []
        with open(path, "wb") as fh:
            fh.truncate(size)

    @property
    def size(self) -> int:
        return os.stat(self.path).st_size

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)
        if data:
            self.changes.append((offset, len(data)))

    def random(self, offset: int, length: int, seed: int = 0) -> bytes:
        data = random.Random(seed * 1_000_003 + offset).randbytes(length)
        self.write(offset, data)
        return data

    def compressible(self, offset: int, length: int, seed: int = 0) -> bytes:
        """Text-like data that zstd shrinks a lot."""
        words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"block ", b"sector ", b"%d " % seed]
        rng = random.Random(seed)
        parts: list[bytes] = []
        n = 0
        while n < length:
            w = rng.choice(words)
            parts.append(w)
            n += len(w)
        data = b"".join(parts)[:length]
        self.write(offset, data)
        return data

    def zeros(self, offset: int, length: int) -> None:
        """Written (allocated) zeros: not a hole, but all-zero chunks."""
        self.write(offset, bytes(length))

    def resize(self, size: int) -> None:
        old = self.size
        with open(self.path, "r+b") as fh:
            fh.truncate(size)
        if size > old:
            self.changes.append((old, size - old))

    def take_changes(self) -> list[tuple[int, int]]:
        out, self.changes = self.changes, []
        return out

    def changes_file(self, path: Path, extents: list[tuple[int, int]] | None = None) -> Path:
        """Write a changed-extents JSON file (default: the changes since the last take)."""
        ext = self.take_changes() if extents is None else extents
        path.write_text(json.dumps([{"offset": o, "length": n} for o, n in ext]))
        return path

    def snapshot(self, dest: Path) -> Path:
        shutil.copyfile(self.path, dest)
        return dest

    def clone(self, dest: Path) -> Image:
        """A copy of this image as a new Image (with no changes recorded)."""
        img = Image.__new__(Image)
        img.path, img.changes = self.snapshot(dest), []
        return img


ImageFactory = Callable[..., Image]


def assert_one_line_error(res: CliResult, *needles: str, code: int | None = None) -> str:
    """A failed command: non-zero exit, exactly one `comb: error:` line, no traceback."""
    assert res.code != 0, f"expected a failure, got exit 0: {res.out!r} {res.err!r}"
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("comb: error: ")]
    assert len(errors) == 1, f"want one error line, got: {res.err!r}"
    line = errors[0]
    assert "internal error" not in line, f"untranslated exception: {line}"
    if code is not None:
        assert res.code == code, f"exit {res.code} != {code}: {line}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def same_file(a: Path | str, b: Path | str) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def cmp_files(a: Path | str, b: Path | str) -> None:
    """Byte-identical, judged by cmp(1)."""
    res = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    assert res.returncode == 0, f"cmp: {res.stdout}{res.stderr}"


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh interpreter of this venv (crashes, isolation)."""
    full_env = dict(os.environ)
    full_env["COMB_ENGINE"] = "local"
    full_env.update(env or {})
    return subprocess.run(
        [PYTHON, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def repo_files(repo: Path, prefix: str, block_lists: bool = False) -> list[Path]:
    """The files under ``prefix``; block lists (catalog.store.blocks) only with ``block_lists``."""
    return sorted(
        p
        for p in (repo / prefix).rglob("*")
        if p.is_file() and (block_lists or not p.name.endswith(".blocks"))
    )


def flip_byte(path: Path, pos: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as fh:
        fh.seek(pos)
        old = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([old[0] ^ mask]))


def points_json(cli: CliRunner, repo: Path | str) -> list[dict[str, object]]:
    res = cli("-r", repo, "points", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    points = doc["points"] if isinstance(doc, dict) else doc
    assert isinstance(points, list)
    return points


def point_ids(cli: CliRunner, repo: Path | str) -> list[str]:
    return [str(p["id"]) for p in points_json(cli, repo)]


def backup_json(cli: CliRunner, repo: Path, *args: object) -> dict[str, object]:
    res = cli("-r", repo, "backup", *args, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert isinstance(doc, dict)
    return doc


def api_backup(
    repo: Path | str,
    source: Path | str,
    changed: Path | str | None = None,
    name: str | None = None,
    workers: int = 2,
    batch_bytes: int = 16 * MiB,
    pack_target_bytes: int | None = None,
) -> RecoveryPoint:
    """A backup through the library (local engine), for tests below the CLI."""
    opts = BackupOptions(
        source_name=name,
        changed_extents=None if changed is None else str(changed),
        batch_bytes=batch_bytes,
    )
    if pack_target_bytes is not None:
        opts = replace(opts, pack_target_bytes=pack_target_bytes)
    return run_backup(
        Repository.open(str(repo), password=TEST_PASSWORD), str(source), LocalEngine(workers), opts
    )


def api_restore(repo: Path | str, point: str, output: Path | str) -> None:
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    restore_point(r, r.resolve(point), str(output))


def assert_restores(repo: Path | str, images: dict[str, Path], out_dir: Path) -> None:
    """Each point of ``images`` (point id -> a copy of the image it was made from) restores
    byte for byte."""
    for pid, image in images.items():
        out = out_dir / f"r-{pid}.img"
        api_restore(repo, pid, out)
        cmp_files(out, image)
        out.unlink()


def assert_verified(repo: Path | str, clean: bool = True) -> None:
    """What ``verify --read-data`` checks (catalog.maint.check: every chunk read back and
    checked against its id) finds no error; ``clean``: no leftover either (none is left after
    a prune that finished)."""
    storage = Repository.open(str(repo), password=TEST_PASSWORD).storage
    report = check_repository(storage, read_data=True)
    assert report.ok, report.errors
    assert not clean or not report.warnings, report.warnings


def assert_intact(repo: Path | str, images: dict[str, Path], out_dir: Path) -> None:
    """After a prune: every kept point (``images``, as for ``assert_restores``) restores byte
    for byte, and ``verify --read-data`` is clean."""
    assert_restores(repo, images, out_dir)
    assert_verified(repo)


def need_tool(name: str) -> str:
    """The path of a command-line tool; missing: a skip locally, a failure in CI (CI=true)."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} is not installed")
    return path


def _unavailable(why: str) -> None:
    """A test's requirement is missing: a skip locally, a failure in CI (CI=true)."""
    import os

    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def need_tls_psk() -> None:
    """ssl's PSK callbacks (Python 3.13+), or a skip locally and a failure in CI."""
    import ssl

    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        _unavailable(f"ssl's PSK callbacks (Python 3.13+; this is {sys.version.split()[0]})")


def need_root(why: str) -> None:
    """Root, or a skip locally and a failure in CI (``why``: what needs it)."""
    if os.geteuid() != 0:
        _unavailable(f"root ({why})")


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """A loop device over ``backing``, made of ``size`` bytes of 0xA5 (so regions a restore
    should have zeroed show); needs root and losetup."""
    losetup = need_tool("losetup")
    need_root("loop devices")
    backing.write_bytes(b"\xa5" * size)
    made = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if made.returncode != 0:
        _unavailable(f"no loop device here (losetup: {made.stderr.strip()})")
    dev = made.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "--detach", dev], capture_output=True)


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session ``sid`` (a zombie has exited: only its parent, or the
    init that adopted it, has not reaped it yet)."""

    def of_session(p: psutil.Process) -> bool:
        try:
            return os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE
        except (ProcessLookupError, PermissionError, psutil.Error):
            return False

    return [p for p in psutil.process_iter() if of_session(p)]
