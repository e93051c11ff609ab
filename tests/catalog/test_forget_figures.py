"""Figures after `forget`: the bytes that kept points still use of a forgotten point's backup
stay in growth, ratios, the sources view and the dashboard (they are still stored), and
`report retention` forgets exactly what `forget --dry-run` would."""

from __future__ import annotations

import json
from pathlib import Path

from catalogtest import gc_truth
from combtest import TEST_PASSWORD, CliRunner, Image, MiB, api_backup

import drive.overlays.overlay as overlay
from catalog.analytics.catalog import Catalog
from catalog.analytics.dashboard.data import dashboard_data
from catalog.repo import Repository
from catalog.units import format_bytes

C = 64 * 1024


def _held_by_live(repo: Repository) -> int:
    """Stored bytes of the chunks some live point's manifest holds (manifests and index)."""
    held, stored = gc_truth(repo)
    return sum(stored[c] for c in set().union(*held.values()))


def _two_backups(tmp_path: Path) -> tuple[Repository, Image]:
    repo = Repository.init(str(tmp_path / "repo"), C, 3, password=TEST_PASSWORD)
    img = Image(tmp_path / "s.img", 8 * MiB)
    img.random(0, 6 * MiB, seed=1)
    api_backup(repo.location, img.path)
    img.random(MiB, MiB, seed=2)
    api_backup(repo.location, img.path)
    return repo, img


def test_stored_bytes_survive_forget_and_prune(cli: CliRunner, tmp_path: Path) -> None:
    repo, _ = _two_backups(tmp_path)
    r = repo.location
    assert cli("-r", r, "forget", "--keep-last", "1").code == 0
    assert cli("-r", r, "prune").code == 0
    truth = _held_by_live(Repository.open(r, password=TEST_PASSWORD))
    assert truth > 5 * MiB  # the first backup's data, still used by the kept point
    res = cli("-r", r, "report", "growth", "--format", "json")
    assert res.code == 0, res.err
    rows = json.loads(res.out)["rows"]
    assert sum(row["stored_bytes"] for row in rows) == truth
    assert rows[-1]["cumulative_stored_bytes"] == truth
    ratios = json.loads(cli("-r", r, "report", "ratios", "--format", "json").out)["rows"]
    assert ratios[-1]["stored_bytes"] == truth
    assert 0.9 < ratios[-1]["dedup_ratio"] < 1.1  # one disk, no duplicate content
    res = cli("-r", r, "query", "select bytes_stored from sources", "--format", "json")
    assert json.loads(res.out)["rows"] == [{"bytes_stored": truth}]
    r2 = Repository.open(r, password=TEST_PASSWORD)
    summary = dict(dashboard_data(Catalog.open(r2.storage, r2.points()), "t").summary)
    assert summary["Stored"] == format_bytes(truth)


def test_retention_keeps_overlay_bases_as_forget_does(cli: CliRunner, tmp_path: Path) -> None:
    repo, img = _two_backups(tmp_path)
    img.random(4 * MiB, MiB, seed=3)
    api_backup(repo.location, img.path)
    r = repo.location
    oldest = Repository.open(r, password=TEST_PASSWORD).points()[0]
    overlay.create(Repository.open(r, password=TEST_PASSWORD), "o1", oldest)
    dry = json.loads(cli("-r", r, "forget", "--keep-last", "1", "--dry-run", "--json").out)
    assert oldest.id in dry["held_by_overlays"]
    res = cli("-r", r, "report", "retention", "--keep-last", "1", "--format", "json")
    assert res.code == 0, res.err
    (row,) = json.loads(res.out)["rows"]
    assert row["forgotten"] == len(dry["forgotten"]) == 1
    assert row["kept"] == dry["kept"] == 2
    assert "base of an overlay" in res.err
