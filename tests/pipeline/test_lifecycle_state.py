"""A state machine over backup / forget / prune / a crash at any file operation / reopen:
after every step, every recovery point that should exist restores exactly the image it was
taken from, and ``verify`` is clean.

Crashes are injected by a storage wrapper: the N-th commit (rename into place) or removal of
the step raises ``Crash`` before it happens, and the step is abandoned there, as if the process
had been killed (its lock is what a killed process leaves behind: stale). The repository is
then reopened from disk.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from combtest import MiB, api_backup, api_restore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from catalog import gc, storage
from catalog.check import check_repository
from catalog.points import point_name
from catalog.repo import Repository
from catalog.retention import KeepPolicy, kept_by_policy

SIZE = MiB


class Crash(BaseException):
    """Not an Exception: nothing in comb may catch it (the process is gone)."""


class Faults:
    """Arms a crash at the N-th commit or removal of repository files (locks excepted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.left: int | None = None
        real_commit = storage._LocalNewFile.commit
        real_remove = storage.LocalStorage.remove

        def commit(f: Any, name: str, durable: bool = True) -> None:
            if not name.startswith("locks/"):
                self._tick()
            real_commit(f, name, durable)

        def remove(s: Any, name: str) -> None:
            if not name.startswith("locks/"):
                self._tick()
            real_remove(s, name)

        monkeypatch.setattr(storage._LocalNewFile, "commit", commit)
        monkeypatch.setattr(storage.LocalStorage, "remove", remove)

    def _tick(self) -> None:
        if self.left is None:
            return
        if self.left == 0:
            self.left = None
            raise Crash
        self.left -= 1

    def arm(self, n: int | None) -> None:
        self.left = n


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Lifecycle(RuleBasedStateMachine):
    faults: Faults

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="comb-sm-"))
        self.repo_path = self.dir / "repo"
        Repository.init(str(self.repo_path))
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as fh:
            fh.truncate(SIZE)
        self.expected: dict[str, str] = {}  # point id -> sha256 of its image
        self.maybe: dict[str, str] = {}  # a crashed step may or may not have done these

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, crash_at: int | None, step: Any) -> bool:
        """Run a step with a crash armed; True when it completed."""
        self.faults.arm(crash_at)
        try:
            step()
            return True
        except Crash:
            return False
        finally:
            self.faults.arm(None)

    @rule(
        seed=st.integers(0, 2**16),
        chunks=st.integers(0, 6),
        crash_at=st.none() | st.integers(0, 6),
    )
    def backup(self, seed: int, chunks: int, crash_at: int | None) -> None:
        data = bytearray(self.image.read_bytes())
        rnd = __import__("random").Random(seed)
        for _ in range(chunks):
            at = rnd.randrange(0, SIZE - 4096)
            data[at : at + 4096] = rnd.randbytes(4096)
        self.image.write_bytes(bytes(data))
        digest = _digest(self.image)
        before = {p.id for p in Repository.open(str(self.repo_path)).points()}
        done = self._run(crash_at, lambda: api_backup(self.repo_path, self.image, name="d"))
        after = {p.id for p in Repository.open(str(self.repo_path)).points()}
        new = after - before
        assert len(new) <= 1 and (new or not done)
        for pid in new:
            self.expected[pid] = digest

    @precondition(lambda self: len(self.expected) > 1)
    @rule(keep=st.integers(1, 3), crash_at=st.none() | st.integers(0, 3))
    def forget(self, keep: int, crash_at: int | None) -> None:
        repo = Repository.open(str(self.repo_path))
        kept = kept_by_policy(repo.points(), KeepPolicy(last=keep))

        def step() -> None:
            for p in repo.points():
                if p.id not in kept:
                    repo.storage.remove(point_name(p.id))

        self._run(crash_at, step)
        left = {p.id for p in Repository.open(str(self.repo_path)).points()}
        for pid in list(self.expected):
            if pid not in left:
                del self.expected[pid]

    @rule(crash_at=st.none() | st.integers(0, 12))
    def prune(self, crash_at: int | None) -> None:
        self._run(crash_at, lambda: gc.prune(Repository.open(str(self.repo_path)), wait_s=5))

    @invariant()
    def every_point_restores_and_verify_is_clean(self) -> None:
        repo = Repository.open(str(self.repo_path))
        assert {p.id for p in repo.points()} == set(self.expected)
        for pid, digest in self.expected.items():
            out = self.dir / "out.img"
            api_restore(self.repo_path, pid, out)
            assert _digest(out) == digest, pid
            out.unlink()
        report = check_repository(repo.storage)
        assert report.ok, report.errors


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_lifecycle_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    Lifecycle.faults = Faults(monkeypatch)
    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=25,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
