"""SIGINT and SIGTERM during a backup: before the commit they stop it (nothing committed, one
line, exit 130 or 143); once the commit has begun it finishes and the point is reported (a
signal during the engine's shutdown used to print "interrupted" for a committed point)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, session_processes

from catalog.repo import Repository
from pipeline import engines
from pipeline.jobs import run_loop

ROOT = Path(__file__).resolve().parents[2]


def _points(repo: Path) -> list[str]:
    return [p.id for p in Repository.open(str(repo), password=TEST_PASSWORD).points()]


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # delivered at the next bytecode boundary: here, or never if deferred


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_shutdown_reports_the_committed_point(
    cli: CliRunner,
    repo_path: Path,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
) -> None:
    img = make_image(2 * MiB, "d.img")
    real_close = engines.LocalEngine.close

    def close(self: engines.LocalEngine, failed: bool) -> None:
        _signal_self(signum)  # the point is committed; the engine shuts down
        real_close(self, failed)

    monkeypatch.setattr(engines.LocalEngine, "close", close)
    res = cli("-r", repo_path, "backup", img.path, "--engine", "local")
    (point,) = _points(repo_path)
    assert res.code == 0, res.err
    assert f"recovery point {point}" in res.out
    name = signal.Signals(signum).name
    assert (
        res.err == f"comb: warning: {name} arrived after the work was committed; it is complete\n"
    )


@pytest.mark.parametrize(
    "signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_before_the_commit_stops_the_backup(
    cli: CliRunner,
    repo_path: Path,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    code: int,
    word: str,
) -> None:
    img = make_image(2 * MiB, "d.img")
    real_drive = run_loop.drive

    def drive(*args: Any) -> None:
        real_drive(*args)
        _signal_self(signum)  # every chunk is stored; nothing is committed yet

    monkeypatch.setattr(run_loop, "drive", drive)
    res = cli("-r", repo_path, "backup", img.path, "--engine", "local")
    assert (res.code, res.out, res.err) == (code, "", f"comb: error: {word}\n")
    assert _points(repo_path) == []
    assert not os.listdir(repo_path / "tmp")
    assert cli("-r", repo_path, "verify").code == 0
    # The handlers are the test process's own again.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_of_a_ray_backup_is_one_line_and_leaves_no_process(
    repo_path: Path, make_image: ImageFactory, signum: int, code: int, word: str
) -> None:
    """The terminal's Ctrl-C reaches the whole process group (comb and Ray's processes), a
    service manager's SIGTERM comb alone (Ray's own handler dumped a crash report and killed
    comb, exit -15): one line, exit 130 or 143, no traceback or crash, nothing committed, no Ray
    process left."""
    img = make_image(64 * MiB, "d.img")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMB_PASSWORD": TEST_PASSWORD}
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", str(repo_path), "backup", str(img.path)]
    proc = subprocess.Popen(
        [*cmd, "--engine", "ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    # Until Ray's processes run (the raylet), then Ctrl-C to the group.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if any("raylet" in " ".join(k.cmdline()) for k in kids if k.is_running()):
            break
        time.sleep(0.2)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        time.sleep(1)  # (Ray's handler is put in once the driver connects)
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    committed = _points(repo_path)
    if committed:  # it finished first: then it says so
        assert proc.returncode == 0 and f"recovery point {committed[0]}" in out, err
    else:
        assert (proc.returncode, err) == (code, f"comb: error: {word}\n"), (out, err)
    leftover = session_processes(proc.pid)
    assert not leftover, leftover
