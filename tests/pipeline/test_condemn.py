"""Prune condemns before it removes (FORMAT.md 13): it never waits for a backup to start, no
backup waits for it (but at its commit, for a removal in progress), and a backup that starts
while it runs never depends on what it removes.

The hard orders, forced without timing. A session that started before the prune (a live lock
of another process) keeps the prune waiting after it has condemned; meanwhile a backup of the
very content a forgotten point had starts. It must store that content again (the condemned
pack is left out of its dedup index), in a pack of the same content name as the condemned one
(a plain repository: same chunks, same bytes). Then either
- the backup has written that pack, not yet committed, when the prune plans its removal: the
  pack is newer than the record, so it stays, and the backup commits; or
- the prune has decided to remove the pack (it was older then) and the backup writes it
  again before the removal: the backup's commit waits for the removal, finds its pack gone
  and stops with one line, committing nothing; the next backup works.
Run on a local directory and on S3 (a real server process).
"""

from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from combtest import PYTHON, TEST_PASSWORD, CliRunner, ImageFactory, MiB, api_backup, point_ids
from s3server import S3Server

from catalog.errors import LockedError
from catalog.maint import prune as pruning
from catalog.repo import Repository
from catalog.store import condemned, locks
from catalog.store.points import RecoveryPoint
from pipeline.jobs import runner


class Session:
    """A live shared lock of another process (a sleeping child: this host, a live pid)."""

    def __init__(self, repo: Repository) -> None:
        self.proc = subprocess.Popen(["sleep", "120"])
        now = locks._now()
        info = locks.LockInfo(os.urandom(8).hex(), "backup", False, socket.gethostname(),
                              self.proc.pid, now, now)  # fmt: skip
        self.repo, self.info = repo, info
        repo.storage.write_atomic(info.name, json.dumps(info.__dict__).encode())

    def end(self) -> None:
        if self.proc.poll() is None:
            self.repo.storage.remove(self.info.name)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "repo")
    server: S3Server = request.getfixturevalue("s3_env")
    return f"s3://{server.bucket()}/condemn"


@dataclass
class Race:
    """A repository whose forgotten point's pack is garbage, an image of that point's content,
    a foreign session, and threads whose results (or errors) are kept by name."""

    location: str
    repo: Repository
    old: Path
    kept: str
    packs: set[str]
    session: Session
    results: dict[str, object] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, name: str, what: Callable[[], object]) -> None:
        def target() -> None:
            try:
                self.results[name] = what()
            except BaseException as err:  # (the assertions look at it)
                self.results[name] = err

        thread = threading.Thread(target=target, name=name)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), thread.name


@pytest.fixture
def race(cli: CliRunner, location: str, make_image: ImageFactory, tmp_path: Path) -> Iterator[Race]:
    assert cli("-r", location, "init", "--encryption", "none", "--parity-overhead", "0").code == 0
    img = make_image(4 * MiB)
    img.random(0, 2 * MiB, seed=1)
    old = img.snapshot(tmp_path / "old.img")
    assert cli("-r", location, "backup", old, "--source-name", "a", "--workers", "1").code == 0
    img.random(0, 2 * MiB, seed=2)  # b shares nothing with a
    assert cli("-r", location, "backup", img.path, "--source-name", "b").code == 0
    first, kept = point_ids(cli, location)
    assert cli("-r", location, "forget", first).code == 0
    repo = Repository.open(location, password=TEST_PASSWORD)
    locks.ensure_locking(repo.storage, repo.config)
    r = Race(location, repo, old, kept, set(repo.storage.list("packs")), Session(repo))
    try:
        yield r
    finally:
        r.session.end()
        r.join()


def _pruning(race: Race) -> None:
    """Start the prune; return once it has condemned a's pack and waits for the session."""
    waiting = threading.Event()
    race.run("prune", lambda: pruning.prune(race.repo, wait_s=60, on_wait=lambda _s: waiting.set()))
    assert waiting.wait(60), race.results
    assert condemned.condemned_packs(race.repo.storage)


def _backing_up(race: Race) -> None:
    race.run("backup", lambda: api_backup(race.location, race.old, name="c", workers=1))


def _restores(cli: CliRunner, race: Race, tmp_path: Path) -> None:
    """Every point restores; the repository verifies clean; c's content is there."""
    point = point_ids(cli, race.location)[-1]
    out = tmp_path / "c.img"
    assert cli("-r", race.location, "restore", point, out).code == 0
    assert filecmp.cmp(out, race.old, shallow=False)
    res = cli("-r", race.location, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_a_pack_written_again_before_the_prune_plans_stays(
    cli: CliRunner, race: Race, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_commit, go_on = threading.Event(), threading.Event()
    real_held = locks.Lock.held

    def held(
        self: locks.Lock, look: bool = True
    ) -> None:  # the backup's last look before its commit
        if threading.current_thread().name == "backup":
            at_commit.set()
            go_on.wait(60)
        real_held(self, look)

    monkeypatch.setattr(locks.Lock, "held", held)
    _pruning(race)
    _backing_up(race)
    try:
        assert at_commit.wait(60), race.results
        assert set(race.repo.storage.list("packs")) == race.packs  # same content, same name
        race.session.end()  # the prune plans again (c not committed) and removes
        race.threads[0].join(60)
    finally:
        go_on.set()
    race.join()
    pruned, point = race.results["prune"], race.results["backup"]
    assert isinstance(pruned, pruning.PruneResult), pruned
    assert isinstance(point, RecoveryPoint), point
    assert point.stats.bytes_new == 2 * MiB  # stored again, not deduplicated
    # Written again after the record: the pack stays, and so do the leaves and roots of the
    # forgotten point, which the new point names too.
    assert pruned.plan.packs == [] and condemned.names(race.repo.storage) == []
    _restores(cli, race, tmp_path)
    assert set(point_ids(cli, race.location)) == {race.kept, point.id}


def test_a_point_forgotten_while_the_prune_waits_keeps_what_a_later_backup_builds_on(
    cli: CliRunner,
    race: Race,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Point q's backup has sealed its packs, not committed, when the prune plans: they are
    orphans and condemned. q commits; a backup of q's next state starts after the record, with
    q as parent and a change list (so it stores only the changed chunk, and the others stay in
    q's packs); then q is forgotten. The prune must mark q (forgotten since its plan), or it
    removes the packs the new point needs."""
    paused = {"q": threading.Event(), "next": threading.Event()}
    go_on = {"q": threading.Event(), "next": threading.Event()}
    real_held = locks.Lock.held

    def held(self: locks.Lock, look: bool = True) -> None:
        name = threading.current_thread().name
        if name in paused:
            paused[name].set()
            go_on[name].wait(60)
        real_held(self, look)

    monkeypatch.setattr(locks.Lock, "held", held)
    img = make_image(4 * MiB, "q.img")
    img.random(0, 4 * MiB, seed=7)
    img.take_changes()
    try:
        race.run("q", lambda: api_backup(race.location, img.path, name="q", workers=1))
        assert paused["q"].wait(60), race.results  # q's packs sealed, nothing committed
        _pruning(race)
        go_on["q"].set()
        race.threads[0].join(60)
        q = race.results["q"]
        assert isinstance(q, RecoveryPoint), q
        img.random(0, 64 * 1024, seed=8)
        changes = img.changes_file(tmp_path / "changes.json")
        race.run("next", lambda: api_backup(race.location, img.path, changes, name="q"))
        assert paused["next"].wait(60), race.results
        assert cli("-r", race.location, "forget", q.id).code == 0
        race.session.end()
        race.threads[1].join(60)  # the prune
    finally:
        for event in go_on.values():
            event.set()
    race.join()
    assert isinstance(race.results["prune"], pruning.PruneResult), race.results["prune"]
    point = race.results["next"]
    assert isinstance(point, RecoveryPoint) and point.parent == q.id, point
    assert point.stats.bytes_new == 64 * 1024
    out = tmp_path / "next.img"
    assert cli("-r", race.location, "restore", point.id, out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    res = cli("-r", race.location, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


ROOT = Path(__file__).resolve().parents[2]
# The prune as its own process (locks of one process never exclude each other): the real CLI,
# paused once it has planned its removal, until the resume file appears.
PRUNE = r"""
import os, sys, time
from catalog.maint import gc
from catalog.maint import prune as pruning
from pipeline.cli import main

marker, resume = sys.argv[1:3]
real = gc.execute

def execute(*args, **kwargs):
    open(marker, "w").close()
    while not os.path.exists(resume):
        time.sleep(0.01)
    real(*args, **kwargs)

gc.execute = execute
sys.exit(main(sys.argv[3:]))
"""


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_pack_written_again_while_the_prune_removes_it_stops_the_backup(
    cli: CliRunner, race: Race, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard_waits = threading.Event()
    monkeypatch.setattr(runner, "waiting", lambda _blocker: guard_waits.set())
    marker, resume, err = tmp_path / "planned", tmp_path / "resume", tmp_path / "prune.err"
    argv = [str(marker), str(resume), "-r", race.location, "prune", "--json"]
    with open(err, "wb") as fe:
        prune = subprocess.Popen(
            [PYTHON, "-c", PRUNE, *argv], stdout=subprocess.PIPE, stderr=fe, cwd=ROOT
        )
    try:
        _wait_for(lambda: "waiting for the lock of backup" in err.read_text(), "prune waits")
        race.session.end()
        _wait_for(marker.exists, "prune planned")  # it will remove a's pack
        _backing_up(race)
        assert guard_waits.wait(60), race.results  # the backup's commit waits for it
        assert set(race.repo.storage.list("packs")) == race.packs  # written again
    finally:
        resume.touch()
        out, _ = prune.communicate(timeout=60)
    race.join()
    assert prune.returncode == 0, err.read_text()
    assert json.loads(out)["packs_removed"] == 1
    stopped = race.results["backup"]
    assert isinstance(stopped, LockedError), stopped
    assert "a prune removed packs/" in stopped.message and "backup again" in stopped.message
    assert point_ids(cli, race.location) == [race.kept]  # nothing committed
    res = cli("-r", race.location, "verify")
    assert res.code == 0, res.out + res.err
    point = api_backup(race.location, race.old, name="c", workers=1)
    assert point.stats.bytes_new == 2 * MiB
    _restores(cli, race, tmp_path)


def test_a_killed_prunes_record_is_removed_by_the_next(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    """A record left by a killed prune only makes backups store its packs' chunks again, until
    the next prune removes it (and the data no point needs)."""
    img = make_image(2 * MiB)
    img.random(0, MiB, seed=1)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    pack = repo.storage.list("packs")[0].rsplit("/", 1)[-1][: -len(".pack")]
    condemned.write(repo.storage, "0123456789abcdef", [pack], [])
    res = cli("-r", repo_path, "backup", img.path, "--json")
    assert res.code == 0 and json.loads(res.out)["bytes_new"] == MiB, res.out + res.err
    res = cli("-r", repo_path, "prune", "--json")
    assert res.code == 0, res.err
    assert condemned.names(repo.storage) == []
    res = cli("-r", repo_path, "backup", img.path, "--json")
    assert res.code == 0 and json.loads(res.out)["bytes_new"] == 0, res.out + res.err
    res = cli("-r", repo_path, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
