"""``comb restore POINT -``: the raw image on standard output (zero regions as zeros), messages
on stderr only; refused when standard output is a terminal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, Image, ImageFactory, MiB, api_backup

import pipeline.jobs.restore as restore_job
from catalog.repo import Repository

COMB = [sys.executable, "-m", "pipeline.cli"]


def _image(make_image: ImageFactory) -> Image:
    img = make_image(5 * MiB + 12345)  # a partial last chunk
    img.random(0, 300_000, seed=1)
    img.zeros(MiB, 200_000)  # written zeros
    img.compressible(3 * MiB + 7, 500_000, seed=2)  # then a hole up to the end, but for:
    img.random(5 * MiB, 12345, seed=3)
    return img


def _env() -> dict[str, str]:
    return {**os.environ, "COMB_ENGINE": "local", "COMB_PASSWORD": TEST_PASSWORD}


def _restore_piped(repo: Path, shell_tail: str) -> subprocess.CompletedProcess[str]:
    """``comb restore vm@latest -`` followed by a bash pipeline."""
    cmd = shlex.join([*COMB, "-r", str(repo), "restore", "vm@latest", "-"])
    return subprocess.run(
        f"{cmd} {shell_tail}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )


def test_restore_to_stdout_is_the_image(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    want = hashlib.sha256(img.path.read_bytes()).hexdigest()
    res = _restore_piped(repo_path, "| sha256sum; exit ${PIPESTATUS[0]}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == want
    assert res.stderr.startswith("restored ") and "to standard output" in res.stderr

    # --json: the object goes to stderr, standard output holds only the image.
    res2 = subprocess.run(
        [*COMB, "-r", str(repo_path), "restore", "vm@latest", "-", "--json"],
        capture_output=True,
        env=_env(),
        timeout=120,
    )
    assert res2.returncode == 0, res2.stderr
    assert res2.stdout == img.path.read_bytes()
    lines = [ln for ln in res2.stderr.decode().splitlines() if '"point"' in ln]
    doc = json.loads(lines[-1])
    assert doc["output"] == "-" and doc["size"] == img.size and doc["bytes_written"] > 0


def test_restore_to_a_terminal_is_refused(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = _image(make_image)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    master, slave = pty.openpty()
    try:
        res = subprocess.run(
            [*COMB, "-r", str(repo_path), "restore", "vm@latest", "-"],
            stdout=slave,
            stderr=subprocess.PIPE,
            env=_env(),
            timeout=120,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 2
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "standard output is a terminal" in err
    res3 = cli("-r", repo_path, "restore", "vm@latest", "-", "--force")
    assert res3.code == 2 and "--force does not apply" in res3.err


def test_stream_window_by_window(
    repo_path: Path, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of one leaf: whole zero leaves between windows and in-order writes."""
    img = _image(make_image)
    api_backup(repo_path, img.path)
    monkeypatch.setattr(restore_job, "STREAM_WINDOW_LEAVES", 1)
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    (point,) = r.points()
    out = io.BytesIO()
    seen: list[tuple[int, int]] = []
    written = restore_job.restore_to_stream(r, point, out, lambda d, t: seen.append((d, t)))
    assert out.getvalue() == img.path.read_bytes()
    assert written == point.stats.bytes_data  # the data chunks; zeros are not counted
    assert len(seen) > 1 and seen[-1] == (point.size, point.size)


def test_a_reader_that_stops_early_is_an_error(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    """A closed pipe means the reader did not get the whole image: exit 10, one line."""
    img = make_image(64 * MiB)
    img.random(0, 4 * MiB, seed=1)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "vm").code == 0
    res = _restore_piped(repo_path, "| head -c 10 > /dev/null; exit ${PIPESTATUS[0]}")
    assert res.returncode == 10
    assert res.stderr == (
        "comb: error: standard output was closed before the whole image was written\n"
    )
