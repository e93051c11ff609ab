"""``comb backup SRC [SRC ...]``: several image files in one engine run (one dedup index: the
same data in two sources is stored once), a point each, restored identical; sources that cannot
be read fail alone (the others commit; exit 5, each named, and in ``--json``); wrong mixes are
one-line usage errors."""

from __future__ import annotations

import filecmp
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB, assert_one_line_error

from pipeline.jobs import backup as backup_job
from pipeline.jobs import runner
from stages.backup import PackTarget


def test_several_sources_share_one_run_and_fail_alone(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    a = make_image(4 * MiB, "a.img")
    a.random(0, 4 * MiB, seed=1)
    twin = a.clone(tmp_path / "twin.img")  # the same data: stored once
    b = make_image(2 * MiB + 100, "b.img")
    b.random(0, 2 * MiB + 100, seed=2)
    (tmp_path / "folder").mkdir()
    sources = [a.path, tmp_path / "missing.img", twin.path, tmp_path / "folder", b.path]
    res = cli("-r", repo, "backup", *sources, "--engine", "local", "--json")
    assert res.code == 5, res.err
    assert "2 of 5 sources failed (named above); 3 recovery point(s) committed" in res.err
    assert "missing.img failed: cannot open source" in res.err
    assert "folder failed: source" in res.err and "is a directory" in res.err
    lines = [json.loads(line) for line in res.out.splitlines()]
    points = [d for d in lines if "id" in d]
    failed = [d for d in lines if "failed" in d]
    assert [p["source"] for p in points] == [str(a.path), str(twin.path), str(b.path)]
    assert [f["source"] for f in failed] == [str(sources[1]), str(sources[3])]
    assert {f["exit_code"] for f in failed} == {5}
    assert sum(p["bytes_new"] for p in points) == 6 * MiB + 100  # the twin added nothing
    for point, image in zip(points, (a.path, twin.path, b.path), strict=True):
        out = tmp_path / f"{point['id']}.img"
        assert cli("-r", repo, "restore", point["id"], out).code == 0
        assert filecmp.cmp(out, image, shallow=False)
    # Each source's next backup finds its own parent.
    res = cli("-r", repo, "backup", a.path, b.path, "--engine", "local", "--json")
    assert res.code == 0, res.err
    again = [json.loads(line) for line in res.out.splitlines()]
    assert [d["parent"] for d in again] == [points[0]["id"], points[2]["id"]]
    assert all(d["bytes_new"] == 0 for d in again)
    res = cli("-r", repo, "verify")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_what_several_sources_cannot_be_is_a_usage_error(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    a = make_image(MiB, "a.img")
    b = make_image(MiB, "b.img")
    cases = [
        (("--source-name", "x"), "--source-name applies to a single source"),
        (("--changed-extents", str(tmp_path / "c.json")), "--changed-extents applies to a"),
    ]
    for extra, needle in cases:
        res = cli("-r", repo, "backup", a.path, b.path, *extra, "--engine", "local")
        assert_one_line_error(res, needle, code=2)
    for other in ("overlay:try", "vsphere://u@vc/DC/vm/x"):
        res = cli("-r", repo, "backup", a.path, other, "--engine", "local")
        assert_one_line_error(res, "is backed up on its own", code=2)
    res = cli("-r", repo, "backup", a.path, str(a.path), "--engine", "local")
    assert_one_line_error(res, "a source is named twice", code=2)
    (tmp_path / "link.img").symlink_to(a.path)
    res = cli("-r", repo, "backup", a.path, tmp_path / "link.img", "--engine", "local")
    assert_one_line_error(res, "are one source", code=2)
    assert json.loads(cli("-r", repo, "points", "--json").out) == {"points": []}


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_source_that_fails_during_the_run_fails_alone(
    cli: CliRunner,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
) -> None:
    """A source cut short after it was planned: its reads fail in the workers (threads, or Ray
    actors that stay up), it gets no point, the others commit."""
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    a = make_image(3 * MiB, "a.img")
    a.random(0, 3 * MiB, seed=1)
    b = make_image(40 * MiB, "b.img")
    b.random(0, 40 * MiB, seed=2)
    b.write(0, a.path.read_bytes())  # (a's chunks may be stored by b's first item)
    # Packs of 1 MiB: sealed, and indexed, item by item.
    monkeypatch.setattr(
        runner, "PackTarget", lambda *x, **k: replace(PackTarget(*x, **k), pack_target_bytes=MiB)
    )
    real = backup_job.plan_backup

    def plan_then_cut(repo_, path, opts):  # type: ignore[no-untyped-def]
        plan = real(repo_, path, opts)
        if path == str(b.path):
            os.truncate(path, 20 * MiB)  # (read in 16 MiB items: the second one fails)
        if path == str(cut):
            os.unlink(path)  # (gone before the workers open it: its first read fails)
        return plan

    monkeypatch.setattr(backup_job, "plan_backup", plan_then_cut)
    cut = make_image(MiB, "gone.img").path
    cut.write_bytes(os.urandom(MiB))
    res = cli("-r", repo, "backup", b.path, cut, a.path, "--engine", engine, "--json")
    assert res.code == 5, res.err
    assert "2 of 3 sources failed (named above); 1 recovery point(s) committed" in res.err
    assert f"source {b.path} failed: stage reader failed" in res.err and "ended at" in res.err
    lines = [json.loads(line) for line in res.out.splitlines()]
    (point,) = [d for d in lines if "id" in d]
    failures = [(d["source"], d["exit_code"]) for d in lines if "failed" in d]
    assert failures == [(str(b.path), 8), (str(cut), 8)]  # (in the order given; in the run)
    assert point["source"] == str(a.path)
    out = tmp_path / "a.out"
    assert cli("-r", repo, "restore", point["id"], out).code == 0
    assert filecmp.cmp(out, a.path, shallow=False)
    res = cli("-r", repo, "verify")
    assert res.code == 0, res.out + res.err
    # b's first item was stored and indexed before its second failed: not stored again.
    res = cli("-r", repo, "backup", b.path, "--engine", "local", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["bytes_new"] <= 4 * MiB  # (20 MiB now; 16 MiB were stored)


def test_the_progress_ends_at_its_total_when_a_source_fails(
    make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that fails during the run leaves its unread bytes out of the total, so the
    bar ends full (it stalled below 100 % before)."""
    from catalog.repo import Repository
    from pipeline.engine_local import LocalEngine

    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    a = make_image(2 * MiB, "a.img")
    a.random(0, 2 * MiB, seed=1)
    b = make_image(40 * MiB, "b.img")
    b.random(0, 40 * MiB, seed=2)
    real = backup_job.plan_backup

    def plan_then_cut(repo_, path, opts):  # type: ignore[no-untyped-def]
        plan = real(repo_, path, opts)
        if path == str(b.path):
            os.truncate(path, 20 * MiB)
        return plan

    monkeypatch.setattr(backup_job, "plan_backup", plan_then_cut)
    seen: list[tuple[int, int]] = []
    points, failed = backup_job.run_backups(
        repo, [str(b.path), str(a.path)], LocalEngine(2), progress=lambda d, t: seen.append((d, t))
    )
    assert [p.source for p in points] == [str(a.path)] and [f[0] for f in failed] == [str(b.path)]
    done, total = seen[-1]
    assert done == total == 2 * MiB + 16 * MiB  # a, and b's first item, the one read
