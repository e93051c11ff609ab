"""A run's profile (``pipeline.profile``): ``stage_seconds`` in ``backup --json`` and ``job run
--json`` says where the workers' time went; ``--timeline FILE`` writes each stage's span per
batch and worker in chrome://tracing's format (Ray's own events too: tests/pipeline/test_ray.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from combtest import CliRunner, ImageFactory, MiB

from pipeline.profile import STAGE_SECONDS, ray_events_of, stage_seconds

STAGES = ("reader", "chunker", "deduplicator", "compressor", "writer")


def test_a_backup_says_where_its_time_went_and_writes_its_timeline(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    repo = repo_path
    img = make_image(24 * MiB, "a.img")
    img.random(0, 8 * MiB, seed=1)
    img.compressible(8 * MiB, 16 * MiB, seed=2)
    timeline = tmp_path / "t.json"
    began = time.time()
    res = cli("-r", repo, "backup", img.path, "--json", "--timeline", timeline, "--batch-mib", "4")
    ended = time.time()
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    seconds = doc["stage_seconds"]
    assert set(seconds) == set(STAGE_SECONDS)
    # what an encrypted, parity-protected repository's backup does, each part is there
    assert all(seconds[k] > 0 for k in ("read", "hash", "compress", "seal", "parity", "write"))
    events = json.loads(timeline.read_text())
    spans = [e for e in events if e["cat"] == "comb stage"]
    # 6 batches of 4 MiB, each through the five stages (and each worker's flush)
    assert {e["name"] for e in spans} == set(STAGES)
    for name in STAGES:
        assert len([e for e in spans if e["name"] == name]) >= 6
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in spans)
    assert all(began * 1e6 <= e["ts"] <= ended * 1e6 for e in spans)
    assert {e["pid"] for e in spans} <= {f"thread {i}" for i in range(8)}
    # the breakdown adds up to the workers' wall seconds in the stages
    walls = sum(e["dur"] for e in spans) / 1e6
    assert abs(sum(seconds.values()) - walls) < 0.05 * walls + 0.01


def test_the_breakdown_takes_cpu_bound_parts_from_their_cpu_seconds() -> None:
    cpu = {"seal": 1.0, "parity": 2.0, "compress": 3.0}
    wall = {"reader": 5.0, "chunker": 4.0, "deduplicator": 0.5, "compressor": 4.5, "writer": 6.0}
    assert stage_seconds(cpu, wall) == {
        "read": 5.0, "hash": 4.0, "index_wait": 0.5, "compress": 3.5, "seal": 1.0,
        "parity": 2.0, "write": 4.0,
    }  # fmt: skip


def test_a_timeline_into_no_folder_is_refused_before_the_backup(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    repo = repo_path
    img = make_image(MiB, "a.img")
    res = cli("-r", repo, "backup", img.path, "--timeline", tmp_path / "no" / "t.json")
    assert (res.code, res.out) == (2, "")
    assert (
        res.err
        == f"comb: error: --timeline {tmp_path / 'no' / 't.json'}: no folder {tmp_path / 'no'}\n"
    )
    assert json.loads(cli("-r", repo, "points", "--json").out)["points"] == []


def test_a_job_round_says_where_its_time_went(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    repo = repo_path
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    make_image(2 * MiB, "b.img").random(0, 2 * MiB, seed=2)
    job = tmp_path / "jobs.toml"
    job.write_text('[[source]]\npath = "a.img"\n[[source]]\npath = "b.img"\n')
    timeline = tmp_path / "t.json"
    res = cli("-r", repo, "job", "run", job, "--json", "--timeline", timeline)
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert set(doc["stage_seconds"]) == set(STAGE_SECONDS) and doc["stage_seconds"]["read"] > 0
    readers = [e for e in json.loads(timeline.read_text()) if e["name"] == "reader"]
    assert len(readers) >= 2  # both sources' batches


def test_a_timeline_into_a_folder_is_refused(
    cli: CliRunner, repo_path: Path, tmp_path: Path
) -> None:
    res = cli("-r", repo_path, "backup", tmp_path / "x.img", "--timeline", tmp_path)
    assert (res.code, res.err) == (
        2, f"comb: error: --timeline {tmp_path} is a folder (give a file's name)\n"
    )  # fmt: skip


def test_a_round_where_no_source_reached_the_engine_has_no_stage_seconds(
    cli: CliRunner, repo_path: Path, tmp_path: Path
) -> None:
    job = tmp_path / "jobs.toml"
    job.write_text('[[source]]\npath = "missing.img"\n')
    timeline = tmp_path / "t.json"
    res = cli("-r", repo_path, "job", "run", job, "--json", "--timeline", timeline)
    assert res.code == 5
    assert json.loads(res.out)["stage_seconds"] is None and not timeline.exists()


def test_only_this_runs_ray_events_are_kept() -> None:
    job = "02000000"
    events = [
        {"ts": 5e6, "tid": "driver:02000000ffff", "args": {}},  # this run's driver
        {"ts": 5e6, "tid": "driver:01000000ffff", "args": {}},  # another driver
        {"ts": 5e6, "tid": "worker:aa", "args": {"task_id": "ffee02000000"}},
        {"ts": 5e6, "tid": "worker:bb", "args": {"task_id": "ffee01000000"}},
        {"ts": 1e6, "tid": "worker:aa", "args": {"task_id": "ffee02000000"}},  # before the run
    ]
    assert ray_events_of(events, job, 2.0) == [events[0], events[2]]
