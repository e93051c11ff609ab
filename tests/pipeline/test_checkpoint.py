"""Checkpoints (``pipeline.jobs.checkpoint``): a copy to S3 killed (SIGKILL, its own process)
half-way through a point resumes, sending only what its checkpoints hold not; the point restores
identical and verifies; a run that ends well leaves no checkpoint; a checkpoint naming a pack
that is gone is adopted without it; a live run's checkpoints are not adopted; a bad
``COMB_CHECKPOINT_SECONDS`` is a one-line error."""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
from pathlib import Path

import pytest
from combtest import PYTHON, TEST_PASSWORD, CliRunner, ImageFactory, MiB, assert_one_line_error
from s3server import S3Server

from catalog.errors import LockedError, RepositoryError
from catalog.repo import Repository
from catalog.store.index import segment_names
from catalog.store.locks import acquire
from catalog.store.packs import pack_name
from catalog.store.parquet_io import read_parquet
from pipeline.jobs import checkpoint
from pipeline.jobs.checkpoint import RESUME_PREFIX, adopt

ROOT = Path(__file__).resolve().parents[2]

# The copy as its own process: work items and packs of 1 MiB, killed once two checkpoints are
# committed.
KILLED = r"""
import dataclasses, os, signal, sys
from pipeline.jobs import checkpoint, runner
from pipeline.cli import main

real_target, real_items = runner.PackTarget, runner.work_items
runner.PackTarget = lambda *a, **k: dataclasses.replace(
    real_target(*a, **k), pack_target_bytes=1 << 20
)
runner.work_items = lambda ranges, _batch, chunk: real_items(ranges, 1 << 20, chunk)
real_add = checkpoint.Checkpoints.add

def add(self, rows):
    real_add(self, rows)
    if len(self.committed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.Checkpoints.add = add
sys.exit(main(sys.argv[1:]))
"""


def _segments(location: str) -> set[str]:
    return set(segment_names(Repository.open(location, password=TEST_PASSWORD).storage))


def _killed_copy(
    cli: CliRunner, make_image: ImageFactory, tmp: Path, target: str
) -> tuple[list[str], Path]:
    """A local point of 8 MiB of random data, and a copy of it to ``target`` killed after two
    checkpoints; the copy's arguments and the image."""
    local = tmp / "local"
    assert cli("-r", local, "init", "--parity-overhead", "0").code == 0
    img = make_image(8 * MiB)
    img.random(0, 8 * MiB, seed=5)
    assert cli("-r", local, "backup", img.path, "--engine", "local").code == 0
    assert cli("-r", target, "init").code == 0
    args = ["copy", "--from", str(local), "--to", target, "--engine", "local"]
    killed = subprocess.run([PYTHON, "-c", KILLED, *args], cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return args, img.path


def test_a_copy_killed_inside_a_point_resumes_from_its_checkpoints(
    cli: CliRunner,
    make_image: ImageFactory,
    tmp_path: Path,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMB_CHECKPOINT_SECONDS", "0")  # whenever packs were sealed
    target = f"s3://{s3_env.bucket()}/resumed"
    args, image = _killed_copy(cli, make_image, tmp_path, target)
    storage = Repository.open(target, password=TEST_PASSWORD).storage
    assert Repository.open(target, password=TEST_PASSWORD).points() == []
    assert _segments(target) == set()  # checkpoints are no index segments
    left = storage.list(RESUME_PREFIX)
    assert len(left) == 2
    res = cli(*args, "--json")
    assert res.code == 0, res.err
    (copied,) = json.loads(res.out)["copied"]
    assert copied["bytes_read"] == 8 * MiB
    assert copied["bytes_new"] <= 6 * MiB  # what the checkpoints hold is not sent again
    assert storage.list(RESUME_PREFIX) == []  # adopted, and the run's own removed
    out = tmp_path / "out.img"
    assert cli("-r", target, "restore", copied["copy"], out).code == 0
    assert filecmp.cmp(out, image, shallow=False)
    res = cli("-r", target, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    point = Repository.open(target, password=TEST_PASSWORD).points()[0]
    assert len(_segments(target) - {f"index/{point.index_segment}.parquet"}) == 1  # adopted
    assert cli("-r", target, "prune").code == 0
    res = cli("-r", target, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_adoption_leaves_out_gone_packs_and_live_runs(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMB_CHECKPOINT_SECONDS", "0")
    target = str(tmp_path / "target")
    _killed_copy(cli, make_image, tmp_path, target)
    repo = Repository.open(target, password=TEST_PASSWORD)
    storage = repo.storage
    first, second = storage.list(RESUME_PREFIX)
    gone = read_parquet(storage, first, ["pack"]).column("pack")[0].as_py()
    storage.remove(pack_name(gone))  # (as a prune of the dead run's orphans would)
    # A live run (this process's lock) keeps its checkpoints.
    with_lock = acquire(storage, "backup", wait_s=0)
    try:
        live = f"{RESUME_PREFIX}/{with_lock.info.id}/{second.rsplit('/', 1)[1]}"
        storage.write_atomic(live, storage.read(second))
        adopted = adopt(storage, with_lock.held)
    finally:
        with_lock.release()
    assert storage.list(RESUME_PREFIX) == [live]
    (segment,) = segment_names(storage)
    packs = set(read_parquet(storage, segment, ["pack"]).column("pack").to_pylist())
    assert gone not in packs and len(packs) >= 1 and adopted > 0
    # A session lost meanwhile commits nothing and removes nothing.
    with pytest.raises(LockedError):
        adopt(storage, _lost)
    assert storage.list(RESUME_PREFIX) == [live] and len(segment_names(storage)) == 1
    # A backup whose adoption fails on the storage goes on without it, with a warning.
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "condemned_packs", _unreadable)
        img = tmp_path / "other.img"
        img.write_bytes(b"x" * 65536)
        res = cli("-r", target, "backup", img, "--engine", "local")
    assert res.code == 0 and "checkpoints of killed runs were not reused" in res.err, res.err
    assert adopt(storage, lambda: None) > 0  # (its lock is gone now)
    assert storage.list(RESUME_PREFIX) == []


def _lost() -> None:
    raise LockedError("lost the repository's backup lock")


def _unreadable(_storage: object) -> set[str]:
    raise RepositoryError("gc/: the connection dropped")


def test_a_bad_checkpoint_interval_is_a_one_line_error(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    img = make_image(MiB)
    img.random(0, MiB, seed=1)
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv("COMB_CHECKPOINT_SECONDS", bad)
        res = cli("-r", repo, "backup", img.path, "--engine", "local")
        assert_one_line_error(res, "COMB_CHECKPOINT_SECONDS", code=2)
    monkeypatch.setenv("COMB_CHECKPOINT_SECONDS", "off")
    assert cli("-r", repo, "backup", img.path, "--engine", "local").code == 0
