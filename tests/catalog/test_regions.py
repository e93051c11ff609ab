"""hot-regions on an encrypted catalog (numpy over decrypted columns, catalog.analytics.regions)
gives the same table as DuckDB's SQL over the same history in a plain catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
from catalogtest import make_history
from combtest import TEST_PASSWORD, Image, MiB, api_backup

from catalog.analytics import regions
from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import ReportOptions, run_report
from catalog.repo import Repository

C = 64 * 1024


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("bucket", [None, 1 << 20, 1 << 16])
def test_encrypted_hot_regions_equal_the_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket: int | None, dense: bool
) -> None:
    if not dense:
        monkeypatch.setattr(regions, "SPARSE_ABOVE", -1)  # the sparse (np.unique) path
    tables = []
    for enc in ("none", "aes-256-gcm"):
        repo, _, _ = make_history(tmp_path / enc, enc)
        assert repo.sealer.encrypted == (enc != "none")
        cat = Catalog.open(repo.storage, repo.points())
        opts = ReportOptions(bucket_bytes=bucket, limit=None)
        got = run_report(cat, "hot-regions", opts).table
        assert got.num_rows > 0
        tables.append(got)
    plain, sealed = (t.to_pylist() for t in tables)
    assert tables[0].schema.names == tables[1].schema.names
    for row in plain + sealed:
        row.pop("source")  # each repository's disk image has its own path
    assert plain == sealed
    limited = run_report(cat, "hot-regions", ReportOptions(bucket_bytes=bucket, limit=2)).table
    assert limited.to_pylist() == tables[1].to_pylist()[:2]


@pytest.mark.parametrize("bucket", [1 << 20, 1 << 16])
def test_a_short_last_chunk_counts_its_own_bytes(tmp_path: Path, bucket: int) -> None:
    """A disk whose size is not a multiple of the chunk size: the last chunk's changed bytes
    are its own length, in numpy (encrypted) as in the SQL (plain)."""
    tables = []
    for enc in ("none", "aes-256-gcm"):
        repo = Repository.init(
            str(tmp_path / enc / "repo"), C, 3, encryption=enc, password=TEST_PASSWORD
        )
        img = Image(tmp_path / enc / "disk.img", 2 * MiB + 5000)
        img.random(0, 2 * MiB + 5000, seed=1)
        api_backup(repo.location, img.path, name="odd")
        for step in range(2):
            img.take_changes()
            img.random(2 * MiB, 5000, seed=10 + step)  # the short last chunk
            img.random(step * C, C, seed=20 + step)
            changes = img.changes_file(tmp_path / enc / f"c{step}.json")
            api_backup(repo.location, img.path, changes, name="odd")
        cat = Catalog.open(repo.storage, repo.points())
        tables.append(run_report(cat, "hot-regions", ReportOptions(bucket_bytes=bucket)).table)
    plain, sealed = (t.to_pylist() for t in tables)
    assert plain == sealed
    assert sum(r["changed_bytes"] for r in sealed) == 2 * (5000 + C)
