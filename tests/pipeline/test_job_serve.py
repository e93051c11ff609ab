"""``comb job serve FILE`` (``pipeline.cli.job_serve``): rounds on the job file's schedule on one
warm engine; a failed source is retried after a while and fails alone; the job lock keeps
``job run`` away; SIGHUP reloads the file (a bad one is kept out); SIGTERM stops it with exit 0,
a backup before its commit leaving nothing, one committing finishing; the state file tells
``job status`` what each source last did and whether the server runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil
import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, api_restore, session_processes

from catalog.repo import Repository
from pipeline import engines
from pipeline.engines import LocalEngine
from pipeline.jobs import run_loop
from pipeline.jobs.backup import run_backup

ROOT = Path(__file__).resolve().parents[2]

JOB = """\
[defaults]
every = "2s"
keep = { last = 2 }

[[source]]
path = "a.img"

[[source]]
name = "b"
path = "b.img"

[[source]]
path = "missing.img"
"""


def _points(repo: Path) -> list[Any]:
    return Repository.open(str(repo), password=TEST_PASSWORD).points()


def _state(state_dir: Path) -> dict[str, Any]:
    (path,) = (state_dir / "jobs").glob("*.json")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _until(what: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if what():
                return
        except (ValueError, OSError):  # (no state file yet)
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def _serve(repo: Path, job: Path, state: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMB_STATE_DIR": str(state)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "-r", str(repo), "job", "serve", str(job),
         "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def test_one_local_engine_runs_two_backups(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    """An engine used again after close (a server's rounds) starts fresh workers (its torn-down
    workers were handed out again: the second backup failed)."""
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    img = make_image(2 * MiB, "a.img")
    img.random(0, 2 * MiB, seed=1)
    engine = LocalEngine(workers=2)
    first = run_backup(repo, str(img.path), engine)
    img.random(0, MiB, seed=2)
    second = run_backup(repo, str(img.path), engine)
    assert second.parent == first.id
    api_restore(repo_path, second.id, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == img.path.read_bytes()


def test_serve_keeps_the_schedule_reloads_and_stops(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    monkeypatch.setenv("COMB_STATE_DIR", str(state))
    assert cli("-r", repo, "init").code == 0
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    make_image(MiB, "b.img").random(0, MiB, seed=2)
    make_image(MiB, "c.img").random(0, MiB, seed=3)
    job = tmp_path / "jobs.toml"
    job.write_text(JOB)
    proc = _serve(repo, job, state, "--engine", "local")
    try:
        # Rounds go on: a and b back up every 2 s and keep their last 2 points.
        _until(lambda: _state(state)["server"]["round"] >= 4)
        doc = _state(state)
        assert doc["server"]["pid"] == proc.pid and doc["server"]["engine"] == "local"
        assert doc["sources"]["b"]["status"] == "backed up"
        assert doc["sources"][str(tmp_path / "missing.img")]["status"] == "failed"
        # The job lock: no `job run` of the same file meanwhile, by any name or --state.
        (tmp_path / "link.toml").symlink_to(job)
        for name, extra in ((job, ()), (tmp_path / "link.toml", ("--state", tmp_path / "x"))):
            res = cli("-r", repo, "job", "run", name, *extra)
            assert res.code == 11 and f"is being run by pid {proc.pid} (comb job serve)" in res.err
        st = json.loads(
            cli("-r", repo, "job", "status", job, "--json", "--state", _state_file(state)).out
        )
        assert st["serve"]["alive"] is True and st["serve"]["pid"] == proc.pid
        rows = {r["source"]: r for r in st["sources"]}
        assert rows["b"]["rpo"] == "kept" and rows["b"]["last_run_status"] == "backed up"
        assert "cannot open source" in rows[str(tmp_path / "missing.img")]["last_error"]
        # SIGHUP storms do not hang it (a handler once waited for a lock its code held).
        for _ in range(300):
            os.kill(proc.pid, signal.SIGHUP)
        rounds = _state(state)["server"]["round"]
        _until(lambda: _state(state)["server"]["round"] >= rounds + 2)
        # A bad file on SIGHUP is reported and the old one kept; a good one is taken.
        job.write_text(JOB + "[[source]]\npath = 42\n")
        os.kill(proc.pid, signal.SIGHUP)
        _until(lambda: "path` must be" in (_state(state)["server"].get("reload_error") or ""))
        job.write_text(JOB.replace('path = "missing.img"', 'path = "c.img"'))
        os.kill(proc.pid, signal.SIGHUP)
        _until(lambda: any(p.source == str(tmp_path / "c.img") for p in _points(repo)))
        # The repository out of reach for a while: the server waits, then goes on.
        (tmp_path / "repo").rename(tmp_path / "away")
        time.sleep(3)
        assert proc.poll() is None
        (tmp_path / "away").rename(tmp_path / "repo")
        rounds = _state(state)["server"]["round"]
        _until(lambda: _state(state)["server"]["round"] >= rounds + 1 and _idle(state))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "job file not reloaded (the old one stays): job file" in err
    assert "`source.path` must be a non-empty string" in err
    assert "comb: note: stopped by SIGTERM" in err and "Traceback" not in err
    rounds = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # The missing source is tried again, but not at every round: it waits its `every`.
    tries = [r["began"] for r in rounds for s in r["sources"] if s["path"].endswith("missing.img")]
    assert len(tries) >= 2 and len(tries) < len(rounds)
    assert all(s["status"] != "not due" for r in rounds for s in r["sources"])
    # Each source every 2 s exactly, not earlier (no timer's slack in a server).
    b_runs = [datetime.fromisoformat(r["began"]) for r in rounds for s in r["sources"]
              if s["source"] == "b" and s["status"] == "backed up"]  # fmt: skip
    assert min((y - x).total_seconds() for x, y in pairwise(b_runs)) >= 1.99
    assert _state(state)["server"]["state"] == "stopped"
    points = _points(repo)
    for source in ("b", str(tmp_path / "a.img")):
        assert len([p for p in points if p.source == source]) == 2  # keep = { last = 2 }
    assert cli("-r", repo, "verify").code == 0
    assert not os.listdir(repo / "tmp")
    st = cli("-r", repo, "job", "status", job)
    assert st.code == 0 and "not served (the last server: pid" in st.out


def _idle(state: Path) -> bool:
    return _state(state)["server"]["state"] == "idle"


def _state_file(state: Path) -> str:
    (path,) = (state / "jobs").glob("*.json")
    return str(path)


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


@pytest.mark.parametrize("at", ["before the commit", "during the commit"])
def test_sigterm_mid_backup_commits_all_or_nothing(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    at: str,
) -> None:  # fmt: skip
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    job = tmp_path / "jobs.toml"
    job.write_text('[defaults]\nevery = "1h"\n[[source]]\npath = "a.img"\n')
    hangup = signal.getsignal(signal.SIGHUP)  # (SIG_IGN under nohup)
    if at == "before the commit":
        real_drive = run_loop.drive

        def drive(*args: Any) -> None:
            real_drive(*args)
            _signal_self(signal.SIGTERM)  # every chunk stored, nothing committed

        monkeypatch.setattr(run_loop, "drive", drive)
    else:
        real_close = engines.LocalEngine.close

        def close(self: LocalEngine, failed: bool) -> None:
            _signal_self(signal.SIGTERM)  # the point is committed; the engine closes
            real_close(self, failed)

        monkeypatch.setattr(engines.LocalEngine, "close", close)
    res = cli("-r", repo, "job", "serve", job, "--engine", "local")
    assert res.code == 0, res.err
    assert res.err.endswith("comb: note: stopped by SIGTERM\n"), res.err
    points = _points(repo)
    if at == "before the commit":
        assert points == [] and "round 1" not in res.out
    else:
        (point,) = points
        assert f"backed up {point.id}" in res.out  # reported, then stopped
    assert not os.listdir(repo / "tmp")
    assert cli("-r", repo, "verify").code == 0
    assert signal.getsignal(signal.SIGHUP) == hangup


def test_serve_needs_every_for_every_source(cli: CliRunner, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    job = tmp_path / "jobs.toml"
    job.write_text('[[source]]\npath = "a.img"\n')
    res = cli("-r", repo, "job", "serve", job)
    assert res.code == 2 and "has no `every` (job serve needs one" in res.err


@pytest.mark.ray
def test_serve_keeps_ray_warm_between_rounds(make_image: ImageFactory, tmp_path: Path) -> None:
    """Ray starts once: the same raylet runs every round; SIGTERM leaves no Ray process."""
    repo, state = tmp_path / "repo", tmp_path / "state"
    Repository.init(str(repo), password=TEST_PASSWORD)
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    job = tmp_path / "jobs.toml"
    job.write_text('[defaults]\nevery = "2s"\n[[source]]\npath = "a.img"\n')
    proc = _serve(repo, job, state, "--engine", "ray", "--workers", "1")

    def raylets() -> set[int]:
        kids = psutil.Process(proc.pid).children(recursive=True)
        return {k.pid for k in kids if k.name() == "raylet"}

    try:
        _until(lambda: _state(state)["server"]["round"] >= 1 and bool(raylets()), 180)
        first = raylets()
        _until(lambda: _state(state)["server"]["round"] >= 3 and _idle(state), 180)
        assert raylets() == first
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rounds = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert all(s["status"] == "backed up" for r in rounds for s in r["sources"])
    assert len(rounds) >= 3 and len({p.id for p in _points(repo)}) == len(rounds)
    left = session_processes(proc.pid)
    assert not left, left
