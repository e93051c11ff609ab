"""A state machine over backup / forget / prune / scrub / restore with faults / reopen: after
every step, every recovery point that should exist restores exactly the image it was taken
from, and ``verify`` is clean. The repository is encrypted and has parity (the defaults).

Faults are injected by a wrapper around the storage interface (``Faults``):

- crash: the N-th commit (rename into place) or removal of the step raises ``Crash`` before it
  happens, and the step is abandoned there, as if the process had been killed (its lock is what
  a killed process leaves behind: stale);
- torn write: the N-th write puts only half its bytes in the file, then the process "dies";
- ENOSPC: the N-th write fails with "No space left on device" (the step must fail cleanly);
- bit flip on read: the N-th read returns one flipped bit (a restore must then be exact or
  fail with a one-line error, never give wrong bytes).

The repository is then reopened from disk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from combtest import TEST_PASSWORD, MiB, api_backup, api_restore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from catalog.errors import CombError
from catalog.maint import prune as pruning
from catalog.maint.check import check_repository
from catalog.maint.retention import KeepPolicy, kept_by_policy
from catalog.maint.scrub import scrub
from catalog.repo import Repository
from catalog.store import local as storage
from catalog.store.points import point_name

# Two leaves (16 chunks each): a backup's leaves file holds only the leaves it changed, so a
# leaf's ordinal in its file and its place on the disk can differ (prune must mark by the first).
SIZE = 2 * MiB


class Crash(BaseException):
    """Not an Exception: nothing in comb may catch it (the process is gone)."""


class Faults:
    """Arms one fault: a crash at the N-th commit or removal of repository files (locks
    excepted), a torn or ENOSPC N-th write, or a bit flipped in the N-th read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.left: int | None = None
        self.kind = "crash"
        real_commit = storage._LocalNewFile.commit
        real_remove = storage.LocalStorage.remove
        # Write faults happen where the OS would raise them: the storage module's own calls
        # (file writes, writev, pwrite), below its error handling, which must translate them.
        monkeypatch.setattr(storage, "os", _FaultyOs(os, self))
        monkeypatch.setattr(storage, "open", self._open, raising=False)
        monkeypatch.setattr(storage.LocalStorage, "read", self._read(storage.LocalStorage.read))
        monkeypatch.setattr(
            storage.LocalStorage, "read_into", self._read_into(storage.LocalStorage.read_into)
        )

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
        if self.kind == "crash" and self._due():
            raise Crash

    def _due(self) -> bool:
        if self.left is None:
            return False
        if self.left == 0:
            self.left = None
            return True
        self.left -= 1
        return False

    def write_fault(self, write_part: Any, data: bytes | memoryview) -> None:
        """Raises when the armed write fault is due (a torn write first writes half)."""
        if self.kind in ("torn", "enospc") and len(data) and self._due():
            if self.kind == "torn":
                view = memoryview(data).cast("B")
                try:
                    write_part(bytes(view[: len(view) // 2]))
                except OSError:
                    pass  # O_DIRECT may refuse an odd length: then nothing reached the disk
                raise Crash
            raise OSError(errno.ENOSPC, "No space left on device")

    def _open(self, path: str, mode: str = "r", buffering: int = -1) -> Any:
        return _FaultyFile(open(path, mode, buffering=buffering), self)  # noqa: SIM115

    def _flip(self, name: str) -> bool:
        return self.kind == "flip" and not name.startswith("locks/") and self._due()

    def _read(self, real: Any) -> Any:
        def read(s: Any, name: str, offset: int = 0, length: int = -1) -> bytes:
            data = real(s, name, offset, length)
            if data and self._flip(name):
                pos = len(data) // 2
                data = data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :]
            return bytes(data)

        return read

    def _read_into(self, real: Any) -> Any:
        def read_into(s: Any, name: str, offset: int, buf: memoryview) -> int:
            got = int(real(s, name, offset, buf))
            if got and self._flip(name):
                buf[got // 2] ^= 0x10
            return got

        return read_into

    def arm(self, n: int | None, kind: str = "crash") -> None:
        self.left, self.kind = n, kind


class _FaultyOs:
    """The ``os`` module as catalog.store.storage sees it, with write faults."""

    def __init__(self, real: Any, faults: Faults) -> None:
        self._real, self._faults = real, faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def writev(self, fd: int, bufs: list[Any]) -> int:
        data = b"".join(bytes(b) for b in bufs)
        self._faults.write_fault(lambda part: self._real.write(fd, part), data)
        return int(self._real.writev(fd, bufs))

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self._faults.write_fault(lambda part: self._real.pwrite(fd, part, offset), data)
        return int(self._real.pwrite(fd, data, offset))


class _FaultyFile:
    """A file opened by catalog.store.storage, with write faults."""

    def __init__(self, fh: Any, faults: Faults) -> None:
        self._fh, self._faults = fh, faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def write(self, data: Any) -> int:
        self._faults.write_fault(self._fh.write, data)
        return int(self._fh.write(data))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Lifecycle(RuleBasedStateMachine):
    faults: Faults

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="comb-sm-"))
        self.repo_path = self.dir / "repo"
        Repository.init(str(self.repo_path), password=TEST_PASSWORD)
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as fh:
            fh.truncate(SIZE)
        self.expected: dict[str, str] = {}  # point id -> sha256 of its image
        self.maybe: dict[str, str] = {}  # a crashed step may or may not have done these

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, crash_at: int | None, step: Any, kind: str = "crash") -> bool:
        """Run a step with a fault armed; True when it completed. A write that fails with
        ENOSPC must fail the step with a comb error (one line), never anything else."""
        self.faults.arm(crash_at, kind)
        try:
            step()
            return True
        except Crash:
            return False
        except CombError:
            assert kind == "enospc"
            return False
        finally:
            self.faults.arm(None)

    @rule(
        seed=st.integers(0, 2**16),
        chunks=st.integers(0, 6),
        crash_at=st.none() | st.integers(0, 6),
        kind=st.sampled_from(["crash", "torn", "enospc"]),
    )
    def backup(self, seed: int, chunks: int, crash_at: int | None, kind: str) -> None:
        data = bytearray(self.image.read_bytes())
        rnd = __import__("random").Random(seed)
        for _ in range(chunks):
            at = rnd.randrange(0, SIZE - 4096)
            data[at : at + 4096] = rnd.randbytes(4096)
        self.image.write_bytes(bytes(data))
        digest = _digest(self.image)
        before = {
            p.id for p in Repository.open(str(self.repo_path), password=TEST_PASSWORD).points()
        }
        done = self._run(
            crash_at, lambda: api_backup(self.repo_path, self.image, name="d", workers=1), kind
        )
        after = {
            p.id for p in Repository.open(str(self.repo_path), password=TEST_PASSWORD).points()
        }
        new = after - before
        assert len(new) <= 1 and (new or not done)
        for pid in new:
            self.expected[pid] = digest

    @precondition(lambda self: len(self.expected) > 1)
    @rule(keep=st.integers(1, 3), crash_at=st.none() | st.integers(0, 3))
    def forget(self, keep: int, crash_at: int | None) -> None:
        repo = Repository.open(str(self.repo_path), password=TEST_PASSWORD)
        kept = kept_by_policy(repo.points(), KeepPolicy(last=keep))

        def step() -> None:
            for p in repo.points():
                if p.id not in kept:
                    repo.storage.remove(point_name(p.id))

        self._run(crash_at, step)
        left = {p.id for p in Repository.open(str(self.repo_path), password=TEST_PASSWORD).points()}
        for pid in list(self.expected):
            if pid not in left:
                del self.expected[pid]

    @rule(crash_at=st.none() | st.integers(0, 12), kind=st.sampled_from(["crash", "enospc"]))
    def prune(self, crash_at: int | None, kind: str) -> None:
        self._run(
            crash_at,
            lambda: pruning.prune(
                Repository.open(str(self.repo_path), password=TEST_PASSWORD), wait_s=5
            ),
            kind,
        )

    @rule(crash_at=st.none() | st.integers(0, 4))
    def scrub_repair(self, crash_at: int | None) -> None:
        """Nothing stored is damaged here: scrub --repair finds nothing, even when killed."""
        repo = Repository.open(str(self.repo_path), password=TEST_PASSWORD)
        result: list[Any] = []
        if self._run(crash_at, lambda: result.append(scrub(repo, repair=True))):
            assert not result[0].damaged, result[0].damaged

    @precondition(lambda self: bool(self.expected))
    @rule(flip_at=st.integers(0, 40), which=st.integers(0, 100))
    def restore_with_a_flipped_read(self, flip_at: int, which: int) -> None:
        """A bit flipped on its way from the disk: exact bytes or a clean error."""
        pid = sorted(self.expected)[which % len(self.expected)]
        out = self.dir / "flip.img"
        self.faults.arm(flip_at, "flip")
        try:
            api_restore(self.repo_path, pid, out)
            ok = True
        except CombError as err:
            assert "Traceback" not in err.message
            ok = False
        finally:
            self.faults.arm(None)
        if ok:
            assert _digest(out) == self.expected[pid], (pid, flip_at)
        out.unlink(missing_ok=True)

    @invariant()
    def every_point_restores_and_verify_is_clean(self) -> None:
        repo = Repository.open(str(self.repo_path), password=TEST_PASSWORD)
        assert {p.id for p in repo.points()} == set(self.expected)
        for pid, digest in self.expected.items():
            out = self.dir / "out.img"
            api_restore(self.repo_path, pid, out)
            assert _digest(out) == digest, pid
            out.unlink()
        report = check_repository(repo.storage, read_data=True)  # every chunk's bytes too
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
