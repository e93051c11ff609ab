"""``comb job run FILE`` and ``comb job status FILE`` (``pipeline.jobs.jobfile``): the due
sources of a job file in one engine run, a point each under its name; a broken source fails
alone (exit 5); a source not due is left; keep rules forget per source after the round; status
tells each source's RPO; a bad job file is a one-line usage error naming the key and line."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB, assert_one_line_error, need_tool

from catalog.store.points import PointStats, RecoveryPoint
from pipeline.jobs.jobfile import JobSource

JOB = """\
[defaults]
every = "30m"

[[source]]
path = "a.img"

[[source]]
name = "db"
path = "b.img"
every = "1s"
keep = { last = 1 }

[[source]]
path = "missing.img"
"""


def _run(cli: CliRunner, repo: Path, job: Path) -> tuple[int, dict[str, object]]:
    res = cli("-r", repo, "job", "run", job, "--engine", "local", "--json")
    return res.code, json.loads(res.out)


def test_a_job_backs_up_what_is_due_and_keeps_what_it_says(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    make_image(MiB, "b.img").random(0, MiB, seed=2)
    job = tmp_path / "jobs.toml"
    job.write_text(JOB)
    code, doc = _run(cli, repo, job)
    assert code == 5
    status = {s["source"]: s for s in doc["sources"]}  # type: ignore[attr-defined]
    a, missing = str(tmp_path / "a.img"), str(tmp_path / "missing.img")
    assert [status[n]["status"] for n in (a, "db", missing)] == ["backed up", "backed up", "failed"]
    assert "cannot open source" in status[missing]["error"]
    first_db = status["db"]["point"]
    # Again at once: a is not due (30 min), db is (every second) and keeps its last point only.
    code, doc = _run(cli, repo, job)
    status = {s["source"]: s for s in doc["sources"]}  # type: ignore[attr-defined]
    assert status[a]["status"] == "not due" and status["db"]["status"] == "backed up"
    assert status["db"]["forgotten"] == [first_db] and doc["forgotten"] == [first_db]
    points = json.loads(cli("-r", repo, "points", "--json").out)["points"]
    assert sorted(p["source"] for p in points) == sorted([a, "db"])
    res = cli("-r", repo, "job", "status", job, "--json")
    assert res.code == 0, res.err
    rows = {s["source"]: s for s in json.loads(res.out)["sources"]}
    assert rows[a]["rpo"] == "kept" and rows[a]["every_seconds"] == 1800
    assert rows[missing]["rpo"] == "missed" and rows[missing]["last_point"] is None
    assert rows["db"]["last_point"] == status["db"]["point"]
    # The report and the dashboard judge each source against its `every` too.
    res = cli("-r", repo, "report", "rpo", "--job", job, "--json")
    assert res.code == 0, res.err
    report = {r["source"]: r for r in json.loads(res.out)["rows"]}
    assert report[a]["rpo"] == "kept" and report[a]["every_hours"] == 0.5
    assert report[missing]["rpo"] == "missed" and report[missing]["points"] == 0
    assert "rpo" not in json.loads(cli("-r", repo, "report", "rpo", "--json").out)["rows"][0]
    page = tmp_path / "dash.html"
    assert cli("-r", repo, "dashboard", page, "--job", job).code == 0
    html = page.read_text()
    assert "RPO kept" in html and " of 3 sources" in html  # (db's 1 s may have passed)
    assert "missed: " in html and missing in html


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[source]]\npath = "a"\nevery = "soon"\n', "line 3: `source.every` must be a duration"),
        ('[[source]]\npath = "a"\n\n[[source]]\npth = "b"\n', "line 5: `source.pth` is not"),
        ('[defaults]\nkeep = { lots = 3 }\n[[source]]\npath = "a"\n', "line 2: `defaults.keep"),
        ('[[source]]\nname = "x"\n', "`source.path` must be a non-empty string"),
        ('[[source]]\npath = "a"\n[[source]]\npath = "./a"\n', "./a is a second source's path"),
        (
            '[[source]]\npath = "a"\nname = "x"\n[[source]]\npath = "b"\nname = "x"\n',
            "line 6: `source.name` 'x' names a second source",
        ),
        ('[[source]]\npath = "a"\nkeep = { path = 1 }\n', "line 3: `source.keep.path` is not"),
        ('[[ source ]]\npath = "a"\n[defaults]\nevery = "0m"\n', "line 4: `defaults.every`"),
        ('[[source]]\npath = "a"\nevery = "99999999999w"\n', "at most ten years"),
        ("source = [1, 2]\n", "`source` must be one or more [[source]] tables"),
        ("[defaults]\nevery = \n", "not valid TOML"),
        ("[defaults]\n", "`source` must be one or more"),
    ],
)
def test_a_bad_job_file_is_a_one_line_error(
    cli: CliRunner, tmp_path: Path, text: str, needle: str
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    job = tmp_path / "jobs.toml"
    job.write_text(text)
    for action in ("run", "status"):
        assert_one_line_error(cli("-r", repo, "job", action, job), needle, code=2)
    assert_one_line_error(cli("-r", repo, "job"), "give an action", code=2)


def _point(time: datetime, seconds: float) -> RecoveryPoint:
    fields: dict[str, object] = dict.fromkeys(RecoveryPoint.__dataclass_fields__)
    fields.update(time=time.isoformat(), stats=PointStats(seconds=seconds))
    return RecoveryPoint(**fields)  # type: ignore[arg-type]


def test_a_source_is_due_every_period_from_when_its_backup_began() -> None:
    """A timer every 30 min: a backup that began at :00 and took 5 min is due again at :30
    (and a little before), not at :35; a point dated in the future is due at once."""
    src = JobSource("/x", "x", 1800.0)
    began = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    last = _point(began + timedelta(minutes=5), 300.0)
    assert src.due(last, began + timedelta(minutes=30))
    assert src.due(last, began + timedelta(minutes=29, seconds=30))  # (a timer's slack)
    assert not src.due(last, began + timedelta(minutes=25))
    assert src.due(last, began - timedelta(minutes=1))  # (begun after now: a clock set back)
    assert src.due(None, began) and replace(src, every_s=None).due(last, began)


@pytest.fixture
def unreadable(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB source whose every read fails with EIO: nbdkit's error filter over its memory
    plugin, seen as a file through nbdfuse (FUSE)."""
    nbdfuse, nbdkit = need_tool("nbdfuse"), need_tool("nbdkit")
    mount = tmp_path / "nbd"
    mount.mkdir()
    proc = subprocess.Popen(
        [nbdfuse, str(mount / "bad.img"), "--command", nbdkit, "-s", "memory", "4M",
         "--filter=error", "error-rate=100%", "error=EIO"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (mount / "bad.img").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (mount / "bad.img").exists(), "nbdfuse did not come up"
        yield mount / "bad.img"
    finally:
        subprocess.run(["fusermount3", "-u", str(mount)], capture_output=True)
        proc.wait(timeout=30)


def test_a_job_of_twelve_sources_two_broken_commits_ten(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path,
    unreadable: Path,
) -> None:  # fmt: skip
    for i in range(10):
        make_image(MiB, f"s{i}.img").random(0, MiB, seed=i)
    paths = [f"s{i}.img" for i in range(10)] + ["missing.img", str(unreadable)]
    job = tmp_path / "jobs.toml"
    job.write_text("".join(f'[[source]]\npath = "{p}"\n' for p in paths))
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 5
    assert res.err.endswith("comb: error: 2 of 12 due sources failed (named above)\n")
    doc = json.loads(res.out)
    failed = {Path(d["path"]).name: d["error"] for d in doc["sources"] if d["status"] == "failed"}
    assert set(failed) == {"missing.img", "bad.img"}
    assert "cannot open source" in failed["missing.img"]
    assert "Input/output error" in failed["bad.img"]
    assert f"source {unreadable} failed:" in res.err
    points = json.loads(cli("-r", repo_path, "points", "--json").out)["points"]
    assert sorted(Path(p["source"]).name for p in points) == sorted(paths[:10])
    assert cli("-r", repo_path, "verify", "--read-data").code == 0


def test_a_glob_makes_a_source_of_each_file_it_matches(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    (tmp_path / "vms").mkdir()
    for i in range(3):
        make_image(MiB, f"vms/vm{i}.img").random(0, MiB, seed=i)
    make_image(MiB, "db.img").random(0, MiB, seed=9)
    job = tmp_path / "jobs.toml"
    job.write_text(
        '[[source]]\npath = "vms/vm0.img"\nname = "first"\n'  # (named: the glob skips it)
        '[[source]]\npath = "vms/*.img"\n'
        '[[source]]\npath = "none/*.img"\n'
    )
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 5
    rows = {d["source"]: d for d in json.loads(res.out)["sources"]}
    vms = [str(tmp_path / "vms" / f"vm{i}.img") for i in (1, 2)]
    assert [rows[n]["status"] for n in ("first", *vms)] == ["backed up"] * 3
    pattern = str(tmp_path / "none" / "*.img")
    assert rows[pattern]["status"] == "failed"
    assert rows[pattern]["error"] == f"no file matches {pattern}"
    assert res.err.endswith("comb: error: 1 of 4 due sources failed (named above)\n")
    # A file that appears is a source at the next run.
    make_image(MiB, "vms/vm3.img").random(0, MiB, seed=3)
    rows = {d["source"]: d for d in json.loads(cli("-r", repo_path, "job", "run", job,
                                                     "--json").out)["sources"]}  # fmt: skip
    assert rows[str(tmp_path / "vms" / "vm3.img")]["status"] == "backed up"
    job.write_text('[[source]]\npath = "vms/*.img"\nname = "x"\n')
    res = cli("-r", repo_path, "job", "status", job)
    assert res.code == 2 and "line 3: `source.name` cannot name a glob's sources" in res.err


def test_a_glob_takes_files_once_by_any_name_and_no_folders(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    (tmp_path / "img").mkdir()
    make_image(MiB, "img/a1.img").random(0, MiB, seed=1)
    (tmp_path / "img" / "a2.img").symlink_to(tmp_path / "img" / "a1.img")  # a second name
    (tmp_path / "img" / "a3.img").mkdir()  # a folder the glob matches
    job = tmp_path / "jobs.toml"
    job.write_text('[defaults]\nevery = "1d"\n[[source]]\npath = "img/a*"\n')
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 0, res.err
    (row,) = json.loads(res.out)["sources"]
    assert row["source"] == str(tmp_path / "img" / "a1.img") and row["status"] == "backed up"
    # report rpo --job: the files the glob matched, each against the glob's `every`
    res = cli("-r", repo_path, "report", "rpo", "--job", job, "--json")
    (rep,) = json.loads(res.out)["rows"]
    assert (rep["source"], rep["rpo"], rep["every_hours"]) == (row["source"], "kept", 24)
