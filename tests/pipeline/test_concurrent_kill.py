"""Two backups and a prune at once, as separate `comb` processes; one of them is SIGKILLed at a
chosen moment (issue "Concurrency": killing any of them loses nothing).

Each process is the real CLI (``pipeline.cli.main``) in its own interpreter, started together
and released by a go file. The victim freezes at its moment (just before or after a given file
commit or removal), tells the test by a marker file and waits to be SIGKILLed; the others may
be held at a moment of their own too and resumed, which forces the order that makes prune hard
(see ``_choreograph``): no timing is guessed, every kill lands in its window. A prune waits out
a frozen backup's session (its lock) once it has condemned, and goes on once the dead one is
reaped (its lock is then stale); a backup waits only at its commit, for a prune frozen
mid-removal.
Afterwards: ``comb unlock --stale`` removes exactly the dead process's lock, ``verify
--read-data`` finds no error, every point committed before and every point the survivors
committed restores byte-identically, the killed backup's point is there
exactly when its document was committed, a further prune finishes the dead one's work and
leaves no garbage (only the dead process's temporary files), and a new backup works.

The repository (built once): sources a, b, c, d with points a1 c1 b1 a2 c2 d1; a1, c1 and d1
are forgotten. So prune has garbage (d1's pack, manifests), a pack to repack (c1's: one live
chunk range in three), and both backups store content that only forgotten points had: block 3
(a dead range in a1's live pack) and blocks 5 and 6 (dead in c1's pack, which the prune
retires while they run: only its exclusive phase can see that they need it again).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from combtest import PYTHON, CliRunner, MiB, api_backup, cmp_files, point_ids

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
WAITING = "comb: waiting for the lock"  # what a command that waits for a lock says, once
SIZE = 8 * MiB

# Blocks (1 MiB of random bytes each, by seed) at MiB offsets 0, 1, 2, ...
HISTORY = [  # (point, source, blocks), backed up in this order with one worker (one pack each)
    ("a1", "a", [1, 2, 3, 4]),
    ("c1", "c", [5, 6, 7, 1]),
    ("b1", "b", [8, 9, 7]),
    ("a2", "a", [1, 2, 10, 4]),
    ("c2", "c", [15, 11, 7, 1]),
    ("d1", "d", [20, 21, 22, 23]),
]
FORGOTTEN = ("a1", "c1", "d1")
# The concurrent backups: a's next point and b's, sharing block 40, reusing forgotten 3, 5, 6.
NEXT = {"A": ("a", [1, 2, 10, 4, 3, 6, 30, 40]), "B": ("b", [8, 9, 7, 5, 31, 40])}

# The child: the real CLI, started on a go file, optionally frozen at one storage operation.
# pause: "" or "commit:PREFIX:N:before|after" or "remove:PREFIX:N:before|after" (the N-th
# matching file; lock files never count). Frozen, it writes the marker and blocks (that thread
# and any other that commits or removes a file) until the resume file appears or it is killed.
CHILD = r"""
import os, sys, threading, time
import catalog.store.local as storage
from pipeline.cli import main

go, pause, marker, resume = sys.argv[1:5]
argv = sys.argv[5:]
mutex = threading.Lock()
state = {"count": 0, "frozen": False}
op, prefix, n, when = pause.split(":") if pause else ("", "", "0", "")

def wait_resume():
    while not os.path.exists(resume):
        time.sleep(0.005)

def check(kind, name, moment):
    if name.startswith("locks/"):
        return
    if state["frozen"]:
        wait_resume()
    if kind != op or moment != when or not name.startswith(prefix):
        return
    with mutex:
        state["count"] += 1
        hit = state["count"] == int(n)
        if hit:
            state["frozen"] = True
    if hit:
        with open(marker + ".tmp", "w") as fh:
            fh.write(f"{moment} {kind} {name}")
        os.rename(marker + ".tmp", marker)
        wait_resume()

orig_commit = storage._LocalNewFile.commit
orig_remove = storage.LocalStorage.remove

def commit(self, name, durable=True):
    check("commit", name, "before")
    orig_commit(self, name, durable)
    check("commit", name, "after")

def remove(self, name):
    check("remove", name, "before")
    orig_remove(self, name)
    check("remove", name, "after")

storage._LocalNewFile.commit = commit
storage.LocalStorage.remove = remove
while not os.path.exists(go):
    time.sleep(0.002)
sys.exit(main(argv))
"""


def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(MiB)


def _write_image(path: Path, blocks: list[int]) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
        for i, seed in enumerate(blocks):
            fh.seek(i * MiB)
            fh.write(_block(seed))
    return path


@dataclass
class Template:
    dir: Path
    kept: dict[str, str]  # point id -> image file name (under dir) as it was backed up


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("conc")
    repo = base / "repo"
    assert main(["-r", str(repo), "init"]) == 0
    ids: dict[str, str] = {}
    for name, source, blocks in HISTORY:
        img = _write_image(base / f"{name}.img", blocks)
        ids[name] = api_backup(repo, img, name=source, workers=1).id
    assert main(["-r", str(repo), "forget", "--json", *(ids[n] for n in FORGOTTEN)]) == 0
    for name in FORGOTTEN:
        (base / f"{name}.img").unlink()
    for who, (_, blocks) in NEXT.items():
        _write_image(base / f"{who}.img", blocks)
    kept = {ids[n]: f"{n}.img" for n, _, _ in HISTORY if n not in FORGOTTEN}
    return Template(base, kept)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    go: Path
    marker: Path
    resume_file: Path
    out: Path
    err: Path
    code: int | None = None

    def release(self) -> None:
        self.go.touch()

    def resume(self) -> None:
        self.resume_file.touch()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def frozen_or_ended(self) -> bool:
        return self.marker.exists() or self.proc.poll() is not None

    def waiting_or_ended(self) -> bool:
        return WAITING in self.stderr() or self.proc.poll() is not None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.code = self.proc.wait(timeout=30)  # reaped: its pid is gone, its lock stale

    def finish(self, timeout: float = 90) -> int:
        self.code = self.proc.wait(timeout=timeout)
        return self.code

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.out.read_text().strip().splitlines()[-1])
        assert isinstance(doc, dict)
        return doc


@dataclass
class Run:
    dir: Path
    repo: Path
    children: dict[str, Child] = field(default_factory=dict)

    def spawn(self, name: str, pause: str, *argv: str) -> Child:
        go, marker = self.dir / f"go-{name}", self.dir / f"frozen-{name}"
        resume, out, err = (
            self.dir / f"resume-{name}",
            self.dir / f"{name}.out",
            self.dir / f"{name}.err",
        )
        env = {**os.environ, "COMB_ENGINE": "local", "COMB_LOCK_WAIT": "60"}
        args = [str(go), pause, str(marker), str(resume), "-r", str(self.repo), *argv]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [PYTHON, "-c", CHILD, *args], stdout=fo, stderr=fe, cwd=ROOT, env=env
            )
        self.children[name] = Child(name, proc, go, marker, resume, out, err)
        return self.children[name]

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                logs = {n: c.stderr()[-2000:] for n, c in self.children.items()}
                raise AssertionError(f"timed out waiting for {what}; stderr: {logs}")
            time.sleep(0.005)

    def frozen(self, *names: str) -> None:
        """Each of ``names`` has reached its moment (and stays there)."""
        for name in names:
            c = self.children[name]
            self.wait(c.frozen_or_ended, f"{name} frozen")
            assert c.marker.exists(), f"{name} ended ({c.proc.returncode}): {c.stderr()}"

    def waiting(self, *names: str) -> None:
        """Each of ``names`` waits for a lock (it said so)."""
        for name in names:
            c = self.children[name]
            self.wait(c.waiting_or_ended, f"{name} waiting")
            assert WAITING in c.stderr(), f"{name} did not wait: {c.proc.returncode} {c.stderr()}"


@pytest.fixture
def run(template: Template, tmp_path: Path) -> Iterator[Run]:
    repo = tmp_path / "repo"
    shutil.copytree(template.dir / "repo", repo)
    r = Run(tmp_path, repo)
    yield r
    for child in r.children.values():  # only after a failure: a child still running
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(timeout=30)


REPACKED = "commit:index/:1:after"  # prune: marked, repacked and indexed the copies; no lock yet
BEFORE_POINT = "commit:points/:1:before"  # backup: everything durable but its point document
# case -> (victim, its moment)
CASES = {
    "backup-A-after-first-pack": ("A", "commit:packs/:1:after"),
    "backup-A-after-index-segment": ("A", "commit:index/:1:after"),
    "backup-B-before-point": ("B", BEFORE_POINT),
    "backup-B-after-point": ("B", "commit:points/:1:after"),
    "prune-after-repack-pack": ("P", "commit:packs/:1:after"),
    "prune-in-exclusive-phase": ("P", "remove::2:before"),
}


def _choreograph(run: Run, case: str, victim: str) -> None:
    """Release the three, kill the victim at its moment, let the other two finish.

    With a backup as the victim, the order that makes prune hard is forced: the prune marks
    and repacks (c1's pack: its live chunks copied, the pack retired) before the surviving
    backup commits its point, which reuses block 5 or 6 that only the retired pack holds; then
    the prune waits for the victim's lock; the victim is killed and the prune's exclusive phase
    must see the survivor's point and keep the retired pack."""
    a, b, p = (run.children[k] for k in "ABP")
    if case == "prune-in-exclusive-phase":
        # The prune has condemned and removed one file: both backups run (without the
        # condemned packs in their dedup index) up to their commit, which waits for the
        # removal to end (a pack they wrote might have the name of one it removes).
        p.release()
        run.frozen("P")
        a.release()
        b.release()
        run.waiting("A", "B")
        p.kill()
    elif victim == "P":
        # All three at once; the prune dies after writing its first copy, backups mid-way.
        for c in (a, b, p):
            c.release()
        run.frozen("P", "A", "B")
        p.kill()
        a.resume()
        b.resume()
    else:
        survivor = b if victim == "A" else a
        dead = run.children[victim]
        if case == "backup-A-after-index-segment":
            # A's index segment is durable, its point not: B starts only now and finds A's
            # chunks (block 40) in it.
            a.release()
            run.frozen("A")
            b.release()
            p.release()
        elif case == "backup-B-after-point":
            p.release()  # marks before B's point exists
            run.frozen("P")
            a.release()
            b.release()
        else:
            for c in (a, b, p):
                c.release()
        run.frozen("P", survivor.name, victim)
        survivor.resume()
        assert survivor.finish() == 0, survivor.stderr()
        p.resume()
        run.waiting("P")  # for the victim's lock
        dead.kill()
    for name, child in run.children.items():
        if name != victim:
            assert child.finish() == 0, f"{name}: {child.stderr()}"
    assert run.children[victim].code == -signal.SIGKILL


def _restore_all(cli: CliRunner, run: Run, expect: dict[str, Path]) -> None:
    for pid, image in expect.items():
        out = run.dir / f"restored-{pid}.img"
        res = cli("-r", run.repo, "restore", pid, out)
        assert res.code == 0, res.err
        cmp_files(image, out)
        out.unlink()


@pytest.mark.parametrize("case", list(CASES))
def test_two_backups_and_a_prune_one_killed(
    cli: CliRunner, template: Template, run: Run, case: str
) -> None:
    victim, moment = CASES[case]
    repo = run.repo
    before = set(template.kept)
    assert set(point_ids(cli, repo)) == before
    images = {who: template.dir / f"{who}.img" for who in NEXT}
    survivor_pause = {"A": BEFORE_POINT, "B": BEFORE_POINT, "P": REPACKED}
    if case == "prune-in-exclusive-phase":
        survivor_pause = {}
    for who, (source, _) in NEXT.items():
        run.spawn(
            who,
            moment if who == victim else survivor_pause.get(who, ""),
            "backup", str(images[who]), "--source-name", source,
            "--engine", "local", "--workers", "1", "--batch-mib", "1", "--json",
        )  # fmt: skip
    run.spawn("P", moment if victim == "P" else survivor_pause.get("P", ""), "prune", "--json")
    _choreograph(run, case, victim)
    dead = run.children[victim]
    frozen_at = dead.marker.read_text()

    # The dead process's locks: a backup always holds one; a prune from its condemnation on
    # holds `condemn`, and `remove` while it removes.
    held = {"A": 1, "B": 1, "P": 2 if case == "prune-in-exclusive-phase" else 0}[victim]
    res = cli("-r", repo, "unlock", "--stale")
    assert res.code == 0, res.err
    assert f"removed {held} stale lock(s); 0 live lock(s) left" in res.out, res.out

    res = cli("-r", repo, "verify", "--read-data", "--json")
    report = json.loads(res.out)
    assert res.code == 0 and report["ok"] and not report["errors"], res.out + res.err

    # Which points exist: every earlier one, each survivor's, the victim's iff committed.
    new = {who: str(run.children[who].json()["id"]) for who in NEXT if who != victim}
    committed = victim != "P" and moment.startswith("commit:points/") and "after" in moment
    ids = set(point_ids(cli, repo))
    assert before | set(new.values()) <= ids, (before, new, ids)
    extra = ids - before - set(new.values())
    assert len(extra) == int(committed), (frozen_at, extra)
    if extra:
        new[victim] = extra.pop()
    expect = {pid: template.dir / img for pid, img in template.kept.items()}
    expect.update({pid: images[who] for who, pid in new.items()})
    _restore_all(cli, run, expect)

    # The prune did its work when it lived; the next prune finishes what a dead one left.
    if victim != "P":
        done = run.children["P"].json()
        assert done["packs_removed"] >= 1 and done["metadata_files_removed"] >= 3, done
        assert done["packs_repacked"] == 1, done  # c1's pack (then kept: see _choreograph)
        if case == "backup-A-after-first-pack":
            assert done["orphan_packs"] >= 1, done  # A's sealed pack, indexed by nobody
    if case == "backup-A-after-index-segment":
        # B found block 40 in the dead A's committed segment: only block 31 was new.
        assert run.children["B"].json()["bytes_new"] == MiB
    if case == "prune-in-exclusive-phase":
        # Started after the condemnation: blocks 6 and 5, only in c1's condemned pack, were
        # stored again (A: 6, 30, 40; B: 5, 31, 40 - block 40 by one or both).
        new_bytes = sum(run.children[w].json()["bytes_new"] for w in "AB")
        assert 6 * MiB <= new_bytes <= 7 * MiB, new_bytes
    res = cli("-r", repo, "prune", "--json")
    assert res.code == 0, res.err
    again = json.loads(res.out)
    if victim == "P":
        assert again["packs_removed"] >= 1 and again["metadata_files_removed"] >= 3, again
        if case == "prune-after-repack-pack":
            assert again["orphan_packs"] >= 1, again  # the dead prune's copy, never indexed
    dry = json.loads(cli("-r", repo, "prune", "--dry-run", "--json").out)
    assert dry["packs_removed"] == 0 and dry["metadata_files_removed"] == 0, dry

    # Nothing lost, nothing broken: every point restores again, a new backup works.
    _restore_all(cli, run, expect)
    img = _write_image(run.dir / "e.img", [40, 30, 6, 5, 3, 99])
    res = cli("-r", repo, "backup", img, "--source-name", "e", "--json")
    assert res.code == 0, res.err
    expect[json.loads(res.out)["id"]] = img
    _restore_all(cli, run, expect)
    assert set(point_ids(cli, repo)) == set(expect)
    res = cli("-r", repo, "verify", "--read-data", "--json")
    report = json.loads(res.out)
    assert res.code == 0 and report["ok"], res.out
    # Left over: at most the dead process's temporary files (a warning; pruned after a day).
    assert all("temporary file" in w for w in report["warnings"]), report["warnings"]
    tmp = [f.name for f in (repo / "tmp").iterdir()] if (repo / "tmp").exists() else []
    assert all(name.startswith(f"{dead.proc.pid}-") for name in tmp), (dead.proc.pid, tmp)
