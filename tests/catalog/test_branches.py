"""A source whose points branch (two backups that ran at once, an overlay's backup beside the
device's next one, two first backups) keeps exact figures: every lane of the tree is a valid
history, checked against what garbage collection would free (manifests and the index)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from catalogtest import gc_frees, gc_truth
from combtest import TEST_PASSWORD, Image, MiB

from catalog.analytics.catalog import Catalog
from catalog.analytics.history import History
from catalog.analytics.reports import ReportOptions, run_report
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint, retire_point
from pipeline.engines import LocalEngine
from pipeline.jobs.backup import plan_backup
from pipeline.jobs.runner import BackupOptions, run_jobs
from pipeline.jobs.runner import DiskJob as Job
from stages.sources.image import ImageSource

C = 64 * 1024


def backup_from(repo: Repository, img: Image, parent: RecoveryPoint | None) -> RecoveryPoint:
    """A backup of ``img`` (source "v") whose parent is ``parent``, as a backup that ran at the
    same time as the one that became the source's latest would have it."""
    plan = plan_backup(repo, str(img.path), BackupOptions(source_name="v"))
    plan = replace(plan, parent=parent, mode="full" if parent is None else "full-reread")
    job = Job(plan, ImageSource(str(img.path)), str(img.path))
    return run_jobs(repo, [job], LocalEngine(2), BackupOptions())[0]


def branched(tmp_path: Path) -> tuple[Repository, dict[str, RecoveryPoint]]:
    """a -> b -> d, a -> c -> e (c a branch of a), e2 a branch of c, and r a second first
    backup; each step writes new data, copies old data (dedup hits) and zeroes a chunk."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    img = Image(tmp_path / "v.img", 4 * MiB)
    img.random(0, 3 * MiB, seed=1)
    pts: dict[str, RecoveryPoint] = {}
    pts["a"] = backup_from(repo, img, None)
    for i, (name, parent) in enumerate(
        [("b", "a"), ("c", "a"), ("d", "b"), ("e", "c"), ("e2", "c"), ("r", None)]
    ):
        img.random((i % 3) * MiB, 2 * C, seed=10 + i)
        img.write(3 * MiB + i * C, open(img.path, "rb").read(C))  # a dedup hit of chunk 0
        img.zeros(2 * MiB + i * C, C)
        pts[name] = backup_from(repo, img, pts[parent] if parent else None)
    return repo, pts


def test_branches_are_lanes_and_every_figure_is_exact(tmp_path: Path) -> None:
    repo, pts = branched(tmp_path)
    held, stored = gc_truth(repo)
    h = History.of(repo.storage, repo.points())
    assert h.complete.all()
    assert len(h.lanes) == 4  # a-b-d, c-e, e2, r
    assert h.lives() is not None
    ids = [p.id for p in h.points]
    assert list(h.lone_bytes()) == [gc_frees(held, stored, {pid}) for pid in ids]
    rng = np.random.default_rng(1)
    for mask in [np.ones(len(ids), bool)] + [rng.random(len(ids)) < 0.5 for _ in range(8)]:
        gone = {pid for pid, m in zip(ids, mask, strict=True) if m}
        assert int(h.freed_by(mask).sum()) == gc_frees(held, stored, gone), mask
    # The row walk (used for incomplete histories) agrees on the lanes too.
    walked = History.of(repo.storage, repo.points())
    walked.lives = lambda: None  # type: ignore[method-assign]
    assert list(walked.lone_bytes()) == list(h.lone_bytes())


def test_reports_of_a_branched_source_are_not_blank(tmp_path: Path) -> None:
    """Before lanes one branch blanked unique and retention's freed bytes for every source
    with forgotten points; now they are exact, also after forgetting along a branch."""
    repo, pts = branched(tmp_path)
    other = Image(tmp_path / "w.img", MiB)
    other.random(0, MiB, seed=99)
    w = backup_from_other(repo, other)
    retire_point(repo.storage, pts["c"].id)  # inside a lane that has a branch (e2)
    retire_point(repo.storage, w.id)
    held, stored = gc_truth(repo)
    cat = Catalog.open(repo.storage, repo.points())
    assert cat.incomplete_sources() == []
    rows = run_report(cat, "unique", ReportOptions()).table.to_pylist()
    assert {r["point_id"]: r["unique_bytes"] for r in rows} == {
        pid: gc_frees(held, stored, {pid}) for pid in held
    }
    got = run_report(cat, "retention", ReportOptions(forget=(pts["e"].id,))).table.to_pylist()
    assert got[0]["freed_bytes"] == gc_frees(held, stored, {pts["e"].id})


def backup_from_other(repo: Repository, img: Image) -> RecoveryPoint:
    plan = plan_backup(repo, str(img.path), BackupOptions(source_name="w"))
    return run_jobs(
        repo,
        [Job(plan, ImageSource(str(img.path)), str(img.path))],
        LocalEngine(2),
        BackupOptions(),
    )[0]
