"""The Ray engine through the CLI: a round trip, a worker failure, and no Ray process left.

Each Ray start costs seconds, so there are few of these. Ray's session files go under a fresh
RAY_TMPDIR per test, which also tells this test's Ray processes from anyone else's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from combtest import PYTHON, CliRunner, ImageFactory, KiB, MiB, assert_one_line_error, cmp_files

from catalog.errors import StageError

pytestmark = pytest.mark.ray

RAY_NAMES = ("raylet", "gcs_server", "plasma_store", "ray::", "default_worker", "dashboard")


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Short: Ray puts unix sockets under it (107-byte limit).
    path = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ray_processes(marker: str) -> list[str]:
    """Live processes of the Ray session under ``marker``, or Ray children of this process."""
    found = []
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            name = proc.info["name"] or ""
            rayish = any(n in name or n in cmd for n in RAY_NAMES)
            if marker in cmd or (proc.info["pid"] in mine and rayish):
                found.append(f"{proc.info['pid']} {name} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _no_ray_processes_left(marker: str) -> None:
    # Ray's shutdown signals its processes; give them a moment to exit (no timing asserted).
    deadline = time.monotonic() + 20
    left = _ray_processes(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _ray_processes(marker)
    assert left == [], left


def test_ray_full_incremental_restore_round_trip(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, ray_tmp: str
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    img = make_image(6 * MiB + 999)
    img.random(0, 512 * KiB, seed=1)
    img.compressible(2 * MiB, MiB, seed=2)
    img.random(6 * MiB, 999, seed=3)
    timeline = tmp_path / "timeline.json"
    res = cli("-r", repo, "backup", img.path, "--engine", "ray", "--json", "--timeline", timeline)
    assert res.code == 0, res.err
    full = json.loads(res.out)
    assert full["engine"] == "ray" and full["mode"] == "full"
    # the actors' profile reaches the driver, with the index actor's own CPU
    profile = full["stage_cpu_seconds"]
    assert {"reader", "hash", "compress", "seal", "parity", "writer", "index_actor"} <= set(profile)
    assert profile["compress"] > 0 and profile["index_actor"] >= 0
    assert full["stage_seconds"]["read"] > 0 and full["stage_seconds"]["index_wait"] > 0
    # Ray's own events (the actors' calls) and each stage's span on each worker
    events = json.loads(timeline.read_text())
    names = {e["name"] for e in events}
    assert {"reader", "chunker", "deduplicator", "compressor", "writer"} <= names
    assert any(e["cat"] == "task::StageHost.process" for e in events)
    assert all(e["pid"].startswith("worker ") for e in events if e["cat"] == "comb stage")
    s0 = img.snapshot(tmp_path / "s0")
    img.take_changes()
    img.random(100 * KiB, 10, seed=4)
    img.random(4 * MiB, 64 * KiB, seed=5)
    changes = img.changes_file(tmp_path / "c.json")
    res = cli(
        "-r", repo, "backup", img.path, "--engine", "ray", "--changed-extents", changes, "--json"
    )
    assert res.code == 0, res.err
    inc = json.loads(res.out)
    assert inc["engine"] == "ray" and inc["mode"] == "changed-extents"
    assert inc["parent"] == full["id"] and inc["bytes_read"] == 2 * 64 * KiB
    _no_ray_processes_left(ray_tmp)
    for pid, state in ((full["id"], s0), (inc["id"], img.path)):
        out = tmp_path / f"out-{pid}"
        assert cli("-r", repo, "restore", pid, out).code == 0
        cmp_files(state, out)
    assert cli("-r", repo, "verify", "--read-data").code == 0


def test_ray_worker_failure_is_one_line_and_leaves_no_process(
    make_image: ImageFactory, tmp_path: Path, ray_tmp: str
) -> None:
    """A writer inside a Ray actor cannot commit its pack: the job fails with one line."""
    repo = tmp_path / "repo"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    comb = [PYTHON, "-m", "pipeline.cli", "-r", str(repo)]
    assert subprocess.run([*comb, "init"], env=env, capture_output=True).returncode == 0
    for i in range(256):  # every pack directory is a file: sealing any pack fails
        (repo / "packs" / f"{i:02x}").write_bytes(b"")
    img = make_image(2 * MiB)
    img.random(0, MiB)
    proc = subprocess.run(
        [*comb, "backup", str(img.path), "--engine", "ray"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    from combtest import CliResult

    line = assert_one_line_error(
        CliResult(proc.returncode, proc.stdout, proc.stderr),
        "writer",
        "packs/",
        code=StageError.exit_code,
    )
    assert "cannot commit" in line
    assert list((repo / "points").iterdir()) == []
    _no_ray_processes_left(ray_tmp)


def test_a_running_local_ray_is_used_only_when_it_is_this_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address file `ray start` writes is trusted only when it is this user's regular
    file, names this machine, and a head raylet of this user and this Python serves it (the
    positive case, with a real `ray start` under umask 0: test_cluster_and_concurrency)."""
    from pipeline.ray_local import address_file, running_local_ray

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    path = Path(address_file())
    assert path == tmp_path / "ray" / "ray_current_cluster"
    assert running_local_ray() is None  # no file
    path.parent.mkdir()
    path.write_text("127.0.0.1:6379\n")
    assert running_local_ray() is None  # no raylet serves it (a stale file)
    for text in ("203.0.113.9:6379", "head.example:6379", "not an address", ""):
        path.write_text(text)  # another machine's head (a worker node's file), or junk
        assert running_local_ray() is None
    path.unlink()
    os.mkfifo(path)  # anyone can put a FIFO there (/tmp/ray is everyone's): no hang
    assert running_local_ray() is None


def test_only_a_head_raylet_of_this_user_and_python_for_that_address_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The raylet is what proves a local Ray is this user's: another user's, a worker node's
    (no ``--head``), another Python's or another GCS address's raylet does not count."""
    import sys
    from types import SimpleNamespace

    from pipeline import ray_local

    address = "127.0.0.1:6379"
    python = f"--python_worker_command={sys.executable} -u worker.py"

    def raylet(uid: int, *args: str) -> SimpleNamespace:
        info = {"name": "raylet", "uids": SimpleNamespace(real=uid)}
        return SimpleNamespace(info=info, cmdline=lambda: ["raylet", *args])

    me = os.geteuid()
    cases = {
        "own head": (raylet(me, f"--gcs-address={address}", "--head", python), True),
        "another user's": (raylet(me + 1, f"--gcs-address={address}", "--head", python), False),
        "a worker node's": (raylet(me, f"--gcs-address={address}", python), False),
        "another Python's": (
            raylet(me, f"--gcs-address={address}", "--head", "--python_worker_command=/x/py"),
            False,
        ),
        "another address's": (raylet(me, "--gcs-address=127.0.0.1:1", "--head", python), False),
    }
    for what, (proc, expected) in cases.items():
        monkeypatch.setattr(psutil, "process_iter", lambda attrs, p=proc: [p])
        assert ray_local._own_raylet_for(address) is expected, what
