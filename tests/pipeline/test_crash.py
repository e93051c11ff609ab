"""Real crashes: a backup process SIGKILLed before, during or after its N-th file commit, and one
killed from outside in the middle of a large backup. Afterwards the repository verifies, every
earlier point restores identically, no point appears unless its document was committed, and the
next backup succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from combtest import (
    PYTHON,
    CliRunner,
    ImageFactory,
    KiB,
    MiB,
    backup_json,
    cmp_files,
    point_ids,
    run_python,
)

# Runs `comb` in a child that kills itself around its N-th commit of a repository file.
# mode: "before" (tmp file written and fsynced, not renamed), "mid" (renamed, directory not yet
# fsynced), "after" (fully committed), "none" (no crash; the log shows the commit order).
CRASHER = r"""
import os, sys, threading
import catalog.store.local as storage
from pipeline.cli import main

mode, n, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
state = {"count": 0, "arm_sync": False}
orig_commit = storage._LocalNewFile.commit
orig_sync = storage.LocalStorage.sync_dir

def note(text):
    with open(log, "a") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())

def commit(self, name, durable=True):
    if name.startswith("locks/"):  # the backup's lock and heartbeats: not data commits
        return orig_commit(self, name, durable)
    with lock:
        state["count"] += 1
        k = state["count"]
    note(f"{k} {name}")
    if mode == "before" and k == n:
        os.kill(os.getpid(), 9)
    if mode == "mid" and k == n:
        state["arm_sync"] = True
    orig_commit(self, name, durable)
    if mode == "after" and k == n:
        os.kill(os.getpid(), 9)

def sync_dir(self, path):
    if state["arm_sync"]:
        os.kill(os.getpid(), 9)
    orig_sync(self, path)

storage._LocalNewFile.commit = commit
storage.LocalStorage.sync_dir = sync_dir
sys.exit(main(sys.argv[4:]))
"""

# The order of the commit protocol: parity file and pack, index segment and its block list,
# leaves and their block list, root, change table, point document.
ORDER = [
    "parity/",
    "packs/",
    "index/",
    "index/.blocks",
    "manifests/leaves/",
    "manifests/leaves/.blocks",
    "manifests/roots/",
    "manifests/changes/",
    "points/",
]


def _kind(name: str) -> str:
    prefix = next(k for k in ORDER if name.startswith(k))
    return prefix + ".blocks" if name.endswith(".blocks") else prefix


@dataclass
class Setup:
    repo: Path
    image: Path
    earlier: list[tuple[str, Path]]  # committed points and the image as it was
    changes: Path
    tmp: Path


@pytest.fixture
def setup(cli: CliRunner, make_image: ImageFactory, tmp_path: Path) -> Setup:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    img = make_image(8 * MiB + 777, "disk.img")
    img.random(0, 700 * KiB, seed=1)
    img.compressible(3 * MiB, 512 * KiB, seed=2)
    img.random(8 * MiB, 777, seed=3)
    p0 = str(backup_json(cli, repo, img.path)["id"])
    earlier = [(p0, img.snapshot(tmp_path / "s0"))]
    img.take_changes()
    img.random(64 * KiB, 100, seed=4)
    img.random(5 * MiB, 300 * KiB, seed=5)
    img.zeros(3 * MiB, 64 * KiB)
    changes = img.changes_file(tmp_path / "changes.json")
    return Setup(repo, img.path, earlier, changes, tmp_path)


def _crash(s: Setup, mode: str, n: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = s.tmp / f"commits-{mode}-{n}.log"
    argv = ["-r", str(s.repo), "backup", str(s.image), "--workers", "1", "--engine", "local"]
    argv += ["--changed-extents", str(s.changes)]
    proc = run_python(CRASHER, mode, str(n), str(log), *argv)
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []
    return proc, names


def _after_crash_checks(cli: CliRunner, s: Setup, committed_point: bool) -> None:
    res = cli("-r", s.repo, "verify", "--read-data")
    assert res.code == 0, res.err
    assert "clean" in res.out
    ids = point_ids(cli, s.repo)
    expected = len(s.earlier) + (1 if committed_point else 0)
    assert len(ids) == expected, ids
    assert ids[: len(s.earlier)] == [pid for pid, _ in s.earlier]
    outs = [(pid, snap) for pid, snap in s.earlier]
    if committed_point:
        outs.append((ids[-1], s.image))
    for pid, snap in outs:
        out = s.tmp / f"restore-{pid}"
        res = cli("-r", s.repo, "restore", pid, out)
        assert res.code == 0, res.err
        cmp_files(snap, out)
    # The next backup works (with the same change list) and restores identically.
    doc = backup_json(cli, s.repo, s.image, "--changed-extents", s.changes)
    assert doc["parent"] == ids[-1]
    out = s.tmp / "restore-next"
    assert cli("-r", s.repo, "restore", str(doc["id"]), out).code == 0
    cmp_files(s.image, out)
    assert cli("-r", s.repo, "verify", "--read-data").code == 0


def test_commit_order_of_a_backup(cli: CliRunner, setup: Setup) -> None:
    proc, names = _crash(setup, "none", 0)
    assert proc.returncode == 0, proc.stderr
    # The file catalog is committed after the point, on its own (its document last).
    catalog = [n for n in names if n.startswith("files/")]
    assert catalog and names[-len(catalog) :] == catalog and catalog[-1].endswith(".json")
    names = names[: -len(catalog)]
    kinds = [_kind(name) for name in names]
    assert kinds == sorted(kinds, key=ORDER.index), names
    assert kinds[-1] == "points/" and kinds.count("points/") == 1
    assert set(kinds) == set(ORDER)
    assert len(point_ids(cli, setup.repo)) == 2


@pytest.mark.parametrize(
    ("mode", "n"),
    [(m, n) for n in range(1, 10) for m in ("before", "after")] + [("mid", 1), ("mid", 9)],
)
def test_crash_around_the_nth_commit(cli: CliRunner, setup: Setup, mode: str, n: int) -> None:
    proc, names = _crash(setup, mode, n)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert len(names) == n, names
    # With one worker and one pack, commit 9 is the point document.
    assert [_kind(x) for x in names] == ORDER[:n]
    committed = names[-1].startswith("points/") and mode in ("after", "mid")
    _after_crash_checks(cli, setup, committed)


@pytest.mark.parametrize("mode", ["before", "after"])
def test_crash_while_the_file_catalog_is_written(cli: CliRunner, setup: Setup, mode: str) -> None:
    """Killed around the commit of the catalog's change file (the 10th commit; its document
    comes next): the point is committed, the catalog is not; everything reads, and the next
    backup's catalog is built without it."""
    proc, names = _crash(setup, mode, 10)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert names[-1].startswith("files/") and names[8].startswith("points/")
    _after_crash_checks(cli, setup, True)
    got = cli("-r", setup.repo, "query", "SELECT count(*) AS n FROM file_changes", "--json")
    assert got.code == 0, got.err
    # Prune removes the change file no catalog names (killed after its commit), nothing else.
    orphan = Path(setup.repo) / names[-1]
    assert orphan.exists() == (mode == "after")
    before = sorted(p.name for p in (Path(setup.repo) / "files").iterdir())
    got = cli("-r", setup.repo, "prune")
    assert got.code == 0, got.err
    assert not orphan.exists()
    after = sorted(p.name for p in (Path(setup.repo) / "files").iterdir())
    assert after == [n for n in before if n != orphan.name]
    assert cli("-r", setup.repo, "verify").code == 0
    assert cli("-r", setup.repo, "query", "SELECT count(*) FROM files").code == 0


def _largest_tmp_file(tmpdir: Path) -> int:
    sizes = [0]
    for p in tmpdir.iterdir():
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:  # committed (renamed) meanwhile
            pass
    return max(sizes)


def test_killed_from_outside_during_a_large_backup(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    img = make_image(160 * MiB + 5, "big.img")
    img.random(0, MiB, seed=1)
    p0 = str(backup_json(cli, repo, img.path)["id"])
    s0 = img.snapshot(tmp_path / "s0")
    with open(img.path, "r+b") as fh:
        fh.seek(2 * MiB)
        fh.write(os.urandom(150 * MiB))
    child = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "pipeline.cli",
            "-r",
            str(repo),
            "backup",
            str(img.path),
            "--engine",
            "local",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Wait until pack data is being written, then kill (no timing is asserted).
    tmpdir = repo / "tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if _largest_tmp_file(tmpdir) > 4 * MiB:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the backup ended before it could be killed"
    res = cli("-r", repo, "verify", "--read-data")
    assert res.code == 0, res.err
    assert point_ids(cli, repo) == [p0]
    out = tmp_path / "r0"
    assert cli("-r", repo, "restore", p0, out).code == 0
    cmp_files(s0, out)
    doc = backup_json(cli, repo, img.path)
    assert doc["parent"] == p0
    out.unlink()
    assert cli("-r", repo, "restore", str(doc["id"]), out).code == 0
    cmp_files(img.path, out)
    assert json.loads(cli("-r", repo, "verify", "--json").out)["ok"] is True
