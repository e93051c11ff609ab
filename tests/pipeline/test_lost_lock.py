"""A backup or prune that lost its lock stops before changing anything (``Lock.held``).

Others take a lock whose heartbeat is ten minutes old for stale: a holder cut off from its
storage (a network outage to a bucket, a machine suspended mid-backup) keeps running while a
prune elsewhere may remove what it references. Simulated here by moving the lock's clock on
(as a suspend does) or removing its file (as `comb unlock --stale` on another host does)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from combtest import CliRunner, ImageFactory, MiB, point_ids

from catalog.errors import LockedError
from catalog.maint import gc
from catalog.store import locks
from catalog.store.local import LocalStorage
from pipeline.jobs import run_loop


def _after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, then: Any) -> None:
    """Run ``then()`` right after ``module.name`` returns."""
    original = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        then()
        return out

    monkeypatch.setattr(module, name, wrapped)


def _suspend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A clock for the locks that jumps 15 minutes when the returned function is called."""
    shift = [0.0]
    monkeypatch.setattr(locks, "_clock", lambda: time.monotonic() + shift[0])
    return lambda: shift.__setitem__(0, 900.0)


def _packs(repo: Path) -> set[Path]:
    return set((repo / "packs").rglob("*.pack"))


@pytest.mark.parametrize("how", ["suspended", "lock file removed"])
def test_a_backup_that_lost_its_lock_commits_nothing(
    cli: CliRunner,
    repo_path: Path,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    img = make_image(4 * MiB)
    img.random(0, MiB, seed=1)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    img.random(2 * MiB, MiB, seed=2)
    if how == "suspended":
        then = _suspend(monkeypatch)
    else:

        def then() -> None:
            for f in (repo_path / "locks").glob("*.json"):
                f.unlink()

    _after(monkeypatch, run_loop, "drive", then)  # (every chunk read and stored by then)
    res = cli("-r", repo_path, "backup", img.path)
    assert res.code == 11 and "lost the repository's backup lock" in res.err, res.err
    assert res.err.count("\n") == 1
    assert len(point_ids(cli, repo_path)) == 1
    monkeypatch.undo()
    res = cli("-r", repo_path, "verify")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_a_prune_that_lost_its_lock_removes_nothing(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = make_image(2 * MiB)
    for seed in (1, 2):  # all new data: the first point's pack is garbage once forgotten
        img.random(0, MiB, seed=seed)
        assert cli("-r", repo_path, "backup", img.path).code == 0
    first, _ = point_ids(cli, repo_path)
    assert cli("-r", repo_path, "forget", first).code == 0
    packs = _packs(repo_path)
    _after(monkeypatch, gc, "plan", _suspend(monkeypatch))
    res = cli("-r", repo_path, "prune")
    assert res.code == 11 and "lost the repository's prune lock" in res.err, res.err
    assert _packs(repo_path) == packs
    monkeypatch.undo()
    res = cli("-r", repo_path, "prune", "--json")
    assert res.code == 0 and _packs(repo_path) < packs, res.err


def test_a_heartbeat_after_the_gap_does_not_win_the_lock_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back from a suspend or an outage, the next heartbeat gets written (a reader's lock goes
    on), but a writer's lock stays lost: a prune may have run in the gap."""
    storage = LocalStorage(str(tmp_path))
    jump = _suspend(monkeypatch)
    lock = locks.acquire(storage, "backup")
    try:
        lock.held()
        jump()
        lock._check()  # what a heartbeat does before it writes
        lock._write()
        assert (tmp_path / lock.info.name).exists()
        with pytest.raises(LockedError, match="could not be refreshed for 900 s"):
            lock.held()
    finally:
        lock.release()
    lock = locks.acquire(storage, "backup")
    try:
        (tmp_path / lock.info.name).unlink()  # `comb unlock --stale` on another host
        lock._check()
        lock._write()  # (written again by the next heartbeat)
        with pytest.raises(LockedError, match="was removed"):
            lock.held()
    finally:
        lock.release()
