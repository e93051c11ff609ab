"""Property: any sparse image and any sequence of changes -> every point restores identically.

Repositories use 4 KiB chunks (64 KiB leaves) so small images span many leaves; work items are
small so that leaves straddle work items. Incrementals use the exact change list, or none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from combtest import TEST_PASSWORD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.maint.check import check_repository
from catalog.repo import Repository
from pipeline.engines import LocalEngine
from pipeline.jobs.backup import run_backup
from pipeline.jobs.restore import restore_point
from pipeline.jobs.runner import BackupOptions

CHUNK = 4096
MAX_SIZE = 3 * 1024 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    kind: str  # random, zeros, text, byte, punch
    seed: int


@dataclass(frozen=True)
class Step:
    writes: list[Write]
    grow_to: int | None  # a new, larger size
    use_change_list: bool


def _writes(max_offset: int) -> st.SearchStrategy[list[Write]]:
    one = st.builds(
        Write,
        offset=st.one_of(
            st.integers(0, max_offset),
            st.integers(0, max_offset // CHUNK).map(lambda c: c * CHUNK),  # aligned
        ),
        length=st.one_of(st.integers(1, 3 * CHUNK), st.integers(1, 200 * 1024)),
        kind=st.sampled_from(["random", "random", "zeros", "text", "byte", "punch"]),
        seed=st.integers(0, 2**16),
    )
    return st.lists(one, min_size=0, max_size=8)


@dataclass(frozen=True)
class Scenario:
    size: int
    initial: list[Write]
    steps: list[Step]
    batch_chunks: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    size = draw(
        st.one_of(st.integers(1, MAX_SIZE // 2), st.integers(1, 64).map(lambda k: k * CHUNK))
    )
    first_size = size
    initial = draw(_writes(size))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        grow = draw(st.one_of(st.none(), st.integers(size, MAX_SIZE)))
        limit = grow or size
        steps.append(Step(draw(_writes(limit)), grow, draw(st.booleans())))
        size = limit
    batch_chunks = draw(st.sampled_from([1, 3, 16, 40, 256]))
    return Scenario(first_size, initial, steps, batch_chunks)


def _apply(path: str, writes: list[Write]) -> list[dict[str, int]]:
    """Apply writes (clamped to the file), return the change list they make."""
    size = os.path.getsize(path)
    changes = []
    fd = os.open(path, os.O_RDWR)
    try:
        for w in writes:
            length = min(w.length, size - w.offset)
            if length <= 0:
                continue
            if w.kind == "punch":
                if _libc.fallocate(
                    fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, w.offset, length
                ):
                    raise OSError(ctypes.get_errno(), "fallocate")
            else:
                os.pwrite(fd, _data(w.kind, length, w.seed), w.offset)
            changes.append({"offset": w.offset, "length": length})
    finally:
        os.close(fd)
    return changes


def _data(kind: str, length: int, seed: int) -> bytes:
    if kind == "random":
        return random.Random(seed).randbytes(length)
    if kind == "zeros":
        return bytes(length)
    if kind == "text":
        return (b"sector %d " % seed * (length // 8 + 1))[:length]
    return bytes([seed % 255 + 1]) * length


def _backup(repo: Repository, src: str, changes: str | None, batch: int) -> str:
    opts = BackupOptions(source_name="prop", changed_extents=changes, batch_bytes=batch)
    return run_backup(repo, src, LocalEngine(2), opts).id


@settings(
    max_examples=int(os.environ.get("COMB_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenarios())
def test_every_point_restores_identically(scenario: Scenario) -> None:
    size, initial, steps, batch_chunks = (
        scenario.size,
        scenario.initial,
        scenario.steps,
        scenario.batch_chunks,
    )
    with tempfile.TemporaryDirectory(prefix="comb-prop-") as tmp:
        repo = Repository.init(os.path.join(tmp, "repo"), chunk_size=CHUNK, password=TEST_PASSWORD)
        src = os.path.join(tmp, "disk.img")
        with open(src, "wb") as fh:
            fh.truncate(size)
        _apply(src, initial)
        states = [(_backup(repo, src, None, batch_chunks * CHUNK), Path(src).read_bytes())]
        for i, step in enumerate(steps):
            changes = []
            if step.grow_to is not None and step.grow_to > os.path.getsize(src):
                old = os.path.getsize(src)
                os.truncate(src, step.grow_to)
                changes.append({"offset": old, "length": step.grow_to - old})
            changes += _apply(src, step.writes)
            change_file = None
            if step.use_change_list:
                change_file = os.path.join(tmp, f"changes{i}.json")
                Path(change_file).write_text(json.dumps(changes))
            pid = _backup(repo, src, change_file, batch_chunks * CHUNK)
            states.append((pid, Path(src).read_bytes()))
        for k, (pid, expected) in enumerate(states):
            out = os.path.join(tmp, f"out{k}")
            point = repo.resolve(pid)
            restore_point(repo, point, out)
            got = Path(out).read_bytes()
            assert len(got) == len(expected), (k, len(got), len(expected))
            if got != expected:
                first = next(i for i in range(len(got)) if got[i] != expected[i])
                raise AssertionError(f"point {k} ({point.mode}) differs first at byte {first}")
        report = check_repository(repo.storage, read_data=True)
        assert report.ok, report.errors
