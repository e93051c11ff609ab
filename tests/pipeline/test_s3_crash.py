"""Nothing lost on S3: a backup killed (SIGKILL) while it uploads, and a prune killed while
it deletes, leave every committed point readable; the next backup and prune finish the work.
comb runs as its own process against a real S3 server process (moto)."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, point_ids
from s3server import S3Server

from catalog.repo import Repository

ROOT = Path(__file__).resolve().parents[2]


def _start(*args: object) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_when(proc: subprocess.Popen[bytes], ready: object, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` says so (it must not finish first)."""
    deadline = time.monotonic() + 120
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, f"it finished before {what}: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {what} within two minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_backup_and_prune_on_s3_lose_nothing(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    bucket = s3_env.bucket()
    repo = f"s3://{bucket}/r"
    s3 = s3_env.client()

    def packs() -> int:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="r/packs/")
        return sum(len(p.get("Contents", ())) for p in pages)

    assert cli("-r", repo, "init").code == 0
    small = make_image(4 * MiB)
    small.random(0, 3 * MiB, seed=1)
    kept = small.snapshot(tmp_path / "kept.img")
    assert cli("-r", repo, "backup", small.path, "--source-name", "kept").code == 0
    (first,) = point_ids(cli, repo)
    big = make_image(200 * MiB)
    big.random(0, 200 * MiB, seed=2)  # incompressible: three 64 MiB packs and more

    # A backup killed once its first pack is up: no point, its packs are orphans.
    before = packs()
    proc = _start("-r", repo, "backup", big.path, "--source-name", "big", "--engine", "local")
    _kill_when(proc, lambda: packs() > before, "a pack was uploaded")
    assert point_ids(cli, repo) == [first]
    res = cli("-r", repo, "verify")
    assert res.code == 0, res.out + res.err
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", first, out).code == 0
    assert filecmp.cmp(out, kept, shallow=False)

    # The next backup of the same disk finishes; the killed one's orphans are prune's.
    assert cli("-r", repo, "backup", big.path, "--source-name", "big").code == 0
    _, second = point_ids(cli, repo)
    res = cli("-r", repo, "forget", second)
    assert res.code == 0, res.err

    # A prune killed once it has removed a pack: the kept point still restores whole.
    full = packs()
    proc = _start("-r", repo, "prune")
    _kill_when(proc, lambda: packs() < full, "a pack was removed")
    assert packs() > before  # (killed while it deleted: 5-6 of 8 packs left here)
    res = cli("-r", repo, "verify")
    assert res.code == 0, res.out + res.err
    out.unlink()
    assert cli("-r", repo, "restore", first, out).code == 0
    assert filecmp.cmp(out, kept, shallow=False)
    res = cli("-r", repo, "prune")
    assert res.code == 0, res.err
    assert packs() == before
    assert cli("-r", repo, "verify").code == 0


def test_two_backups_and_a_prune_at_once_on_s3(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    """Two `comb backup` processes (different sources) and a `comb prune` started together
    against one bucket, twice: the backups store blocks that only a forgotten point had (the
    prune's garbage) while it condemns and removes them. Every process ends well, every
    committed point restores byte for byte, and the repository verifies clean.
    (tests/pipeline/test_condemn.py forces the hard orders one by one.)"""
    repo = f"s3://{s3_env.bucket()}/race"
    assert cli("-r", repo, "init").code == 0
    expect: dict[str, Path] = {}  # point id -> its image

    def restores() -> None:
        for point, image in expect.items():
            out = tmp_path / "out.img"
            assert cli("-r", repo, "restore", point, out).code == 0
            assert filecmp.cmp(out, image, shallow=False), point
            out.unlink()

    for round_ in range(2):
        old = make_image(8 * MiB, f"old{round_}.img")
        for i in range(4):
            old.random(i * 2 * MiB, MiB, seed=100 * round_ + i)
        assert cli("-r", repo, "backup", old.path, "--source-name", f"old{round_}").code == 0
        assert cli("-r", repo, "forget", f"old{round_}@latest").code == 0
        images = {}
        for who in "ab":
            img = make_image(8 * MiB, f"{who}{round_}.img")
            for i in range(4):  # two of the forgotten point's blocks, two new ones
                forgotten = (i + (who == "b")) % 2 == 1
                img.random(i * 2 * MiB, MiB, seed=100 * round_ + i if forgotten else 7000 + i)
            images[who] = img.path
        procs = {
            who: _start("-r", repo, "backup", images[who], "--source-name", who,
                        "--engine", "local", "--no-files")
            for who in "ab"
        }  # fmt: skip
        procs["prune"] = _start("-r", repo, "prune")
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {err.decode(errors='replace')}"
        r = Repository.open(repo, password=TEST_PASSWORD)
        for who in "ab":
            expect[r.resolve(f"{who}@latest").id] = images[who].rename(
                tmp_path / f"{who}{round_}-kept.img"
            )
        restores()
    res = cli("-r", repo, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    assert cli("-r", repo, "prune").code == 0
    restores()
