"""Prune condemns before it removes (FORMAT.md 13): it never waits for a backup to start, no
backup waits for it, and a backup that starts while it runs never depends on what it removes.

The hard order, forced without timing: a session that started before the prune (a live lock of
another process) keeps the prune waiting after it has condemned; meanwhile a backup of the very
content a forgotten point had starts and is held just before its point's commit. It must have
stored that content again (the condemned pack is left out of its dedup index), in a pack of
the same content name as the condemned one (a plain repository: same chunks, same bytes). The
session ends, the prune removes what is condemned, still garbage and older than its record, so
not that pack; the backup commits, and its point restores byte for byte. Run on a local
directory and on S3 (a real server process).
"""

from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, api_backup, point_ids
from s3server import S3Server

from catalog.maint import gc
from catalog.repo import Repository
from catalog.store import condemned, locks
from catalog.store.points import RecoveryPoint, commit_point
from catalog.store.storage import Storage
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


def test_a_backup_during_a_prune_never_depends_on_what_it_removes(
    cli: CliRunner,
    location: str,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
    packs_before = set(repo.storage.list("packs"))

    session = Session(repo)
    waiting, at_commit, go_on = threading.Event(), threading.Event(), threading.Event()
    result: list[object] = []

    def held_commit(storage: Storage, point: RecoveryPoint) -> RecoveryPoint:
        at_commit.set()  # everything of the backup's is durable but its point document
        go_on.wait(60)
        return commit_point(storage, point)

    monkeypatch.setattr(runner, "commit_point", held_commit)

    def run(what: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                result.append(what())
            except BaseException as err:  # (reported by the assertions below)
                result.append(err)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    locks.ensure_locking(repo.storage, repo.config)
    try:
        pruner = run(lambda: gc.prune(repo, wait_s=60, on_wait=lambda _s: waiting.set()))
        assert waiting.wait(60), result  # condemned a's pack, waits for the session
        assert condemned.condemned_packs(repo.storage)
        backup = run(lambda: api_backup(location, old, name="c", workers=1))
        assert at_commit.wait(60), result
        assert set(repo.storage.list("packs")) == packs_before  # same content, same name
        session.end()
        pruner.join(60)  # removes what is condemned and older than its record
    finally:
        go_on.set()
        session.end()
    backup.join(60)
    res_prune, point = result
    assert isinstance(res_prune, gc.PruneResult), res_prune
    assert isinstance(point, RecoveryPoint), point
    assert point.stats.bytes_new == 2 * MiB  # stored again, not deduplicated
    # The condemned pack was written again after the record: it stays, and so do the forgotten
    # point's leaves and roots (the new point names the same content).
    assert res_prune.plan.packs == [] and condemned.names(repo.storage) == []
    third = point_ids(cli, location)[-1]
    out = tmp_path / "third.img"
    assert cli("-r", location, "restore", third, out).code == 0
    assert filecmp.cmp(out, old, shallow=False)
    res = cli("-r", location, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    assert set(point_ids(cli, location)) == {kept, third}


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
