"""hot-regions on an encrypted catalog (numpy over decrypted columns, catalog.regions) gives the
same table as DuckDB's SQL over the same history in a plain catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
from catalogtest import make_history

from catalog import regions
from catalog.analytics import Catalog
from catalog.reports import ReportOptions, run_report


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("bucket", [None, 1 << 20, 1 << 16])
def test_encrypted_hot_regions_equal_the_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket: int | None, dense: bool
) -> None:
    if not dense:
        monkeypatch.setattr(regions, "DENSE_BINS", 1)  # the sparse (np.unique) path
    tables = []
    for enc in ("none", "aes-256-gcm"):
        repo, _, _ = make_history(tmp_path / enc, enc)
        assert (repo.keys is None) == (enc == "none")
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
