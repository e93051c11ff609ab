"""Several disks in one engine run (``pipeline.jobs.runner.run_jobs``): each disk is its own point,
restores byte-identical, and chunks shared across the disks are stored once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from combtest import TEST_PASSWORD, Image, MiB, api_restore, cmp_files

from catalog.repo import Repository
from pipeline.engines import LocalEngine
from pipeline.jobs.backup import plan_backup
from pipeline.jobs.plan import subtract
from pipeline.jobs.runner import BackupOptions, DiskJob, run_jobs
from pipeline.jobs.vsphere import parse_url
from pipeline.jobs.vsphere_backup import audit_sample
from pipeline.jobs.vsphere_vm import DiskInfo
from stages.sources.image import ImageSource


def _jobs(repo: Repository, images: list[Image]) -> list[DiskJob]:
    out = []
    for img in images:
        plan = plan_backup(repo, str(img.path), BackupOptions())
        out.append(DiskJob(plan, ImageSource(str(img.path)), str(img.path)))
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_two_disks_one_run(repo: Repository, make_image, tmp_path: Path, workers: int) -> None:  # type: ignore[no-untyped-def]
    a: Image = make_image(9 * MiB + 4096, "a.img")
    b: Image = make_image(5 * MiB, "b.img")
    shared = a.random(0, 3 * MiB, seed=7)
    b.write(MiB, shared)  # the same 3 MiB on both disks: stored once
    a.random(6 * MiB, 3 * MiB + 4096, seed=8)
    b.random(4 * MiB + 65536, 100_000, seed=9)
    opts = BackupOptions(batch_bytes=MiB)
    points = run_jobs(repo, _jobs(repo, [a, b]), LocalEngine(workers), opts)
    assert [p.source for p in points] == [str(a.path), str(b.path)]
    assert points[0].index_segment == points[1].index_segment
    # a: 6 MiB + a last partial chunk of 4 KiB; b: two chunks of its own; the shared 3 MiB once
    assert points[0].stats.bytes_new + points[1].stats.bytes_new == 6 * MiB + 4096 + 2 * 65536
    for p, img in zip(points, [a, b], strict=True):
        out = tmp_path / f"{p.id}.out"
        api_restore(repo.location, p.id, out)
        cmp_files(out, img.path)
    # An incremental of both disks in one run: only the changed chunk of each is read.
    a.random(65536, 10, seed=10)
    b.random(0, 10, seed=11)
    repo = Repository.open(repo.location, password=TEST_PASSWORD)
    again = run_jobs(repo, _jobs(repo, [a, b]), LocalEngine(workers), opts)
    for p, img in zip(again, [a, b], strict=True):
        assert p.parent is not None and p.stats.bytes_changed == 65536
        out = tmp_path / f"{p.id}.out"
        api_restore(repo.location, p.id, out)
        cmp_files(out, img.path)


def test_subtract() -> None:
    assert subtract([(0, 10), (20, 30)], [(5, 8), (9, 22), (29, 40)]) == [
        (0, 5),
        (8, 9),
        (22, 29),
    ]
    assert subtract([(0, 10)], []) == [(0, 10)]
    assert subtract([(0, 10)], [(0, 10)]) == []
    assert subtract([], [(0, 1)]) == []


def test_audit_sample_share_and_bounds() -> None:
    rng = np.random.default_rng(1)
    unit = MiB
    size = 1000 * MiB + 5
    got = audit_sample(size, unit, 5, rng)
    assert sum(e - s for s, e in got) == pytest.approx(50 * MiB, abs=MiB)
    assert got == sorted(got) and got[-1][1] <= size
    assert all(s % unit == 0 for s, _ in got)
    assert audit_sample(size, unit, 100, rng) == [(0, size)]
    assert audit_sample(size, unit, 0, rng) == []
    assert len(audit_sample(3 * MiB, unit, 0.001, rng)) == 1  # at least one unit


def test_parse_url() -> None:
    u = parse_url("vsphere://administrator%40vsphere.local@vc.example:8443/DC0/vm/web/db1")
    assert (u.user, u.host, u.port, u.path) == (
        "administrator@vsphere.local",
        "vc.example",
        8443,
        "DC0/vm/web/db1",
    )
    assert u.server == "vc.example:8443"
    assert parse_url("vsphere://root@vc/DC0/vm/x").server == "vc"


@pytest.mark.parametrize(
    "url",
    ["vsphere://vc/DC0/vm/x", "vsphere://root@vc/DC0", "vsphere://root@vc:99999/DC0/vm/x"],
)
def test_parse_url_rejects(url: str) -> None:
    from catalog.errors import UsageError

    with pytest.raises(UsageError):
        parse_url(url)


def test_flat_path() -> None:
    d = DiskInfo(2000, "Hard disk 1", 1, "[LocalDS_0] vm one/vm one.vmdk", "LocalDS_0", None, False)
    assert d.flat_path() == "vm one/vm one-flat.vmdk"
