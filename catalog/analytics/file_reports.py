"""The named reports over the file catalogs (``file_views``): ``file-growth`` (the folders that
grew most between a source's first and last point with a catalog in the period; ``folder_growth``,
which the dashboard draws too) and ``file-churn`` (the files rewritten most often).

``file-churn`` reads the catalogs' change rows only; ``file-growth`` rebuilds two listings per
source (its first and last cataloged point in the period), whatever the history's length.

Owns these two reports. Must not: write, or read a filesystem.
"""

from __future__ import annotations

import pyarrow as pa

from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import Report, ReportOptions, ReportResult, _filter, _sql
from catalog.store import filecat

GROWTH_DEPTH = 2  # folders are grouped by their first two levels below the volume

_PARENT = "regexp_replace(f.path_text, '/[^/]*$', '')"
_DIR = (
    f"'/' || f.volume || coalesce(nullif(array_to_string(list_slice(string_split({_PARENT}, '/'), "
    f"1, {GROWTH_DEPTH + 1}), '/'), ''), '')"
)


def folder_growth(cat: Catalog, opts: ReportOptions, per_source: int | None = None) -> pa.Table:
    """The folders by bytes grown from each source's first to its last point with a file
    catalog in the period (``opts``' --source and --since): source, folder, grown_bytes,
    bytes_before, bytes_now, grown_files; most growth first, at most ``opts.limit`` rows and
    ``per_source`` a source. A point without a catalog is left out rather than read as an empty
    disk (history from before the catalogs would make every folder look new), and a source with
    one such point grew 0. Empty: no point in the period has a catalog. Shared by
    ``file-growth`` and the dashboard's chart."""
    where, params = _filter(opts)
    limit = f"LIMIT {int(opts.limit)}" if opts.limit else ""
    rank = "row_number() OVER (PARTITION BY source ORDER BY grown_bytes DESC, folder)"
    top = f"QUALIFY {rank} <= {int(per_source)}" if per_source else ""
    return _sql(
        cat,
        "WITH pts AS (SELECT source, min_by(id, time) AS first_point, max_by(id, time) AS "
        f"last_point FROM points WHERE {where} AND list_contains(?, id) GROUP BY source), "
        "f AS (SELECT pts.source, f.point_id = pts.first_point AS first, "
        f"f.point_id = pts.last_point AS last, {_DIR} AS folder, f.size FROM files f JOIN pts "
        "ON f.point_id IN (pts.first_point, pts.last_point) WHERE f.kind = 'file'), "
        "g AS (SELECT source, folder, "
        "coalesce(sum(size) FILTER (WHERE last), 0)::BIGINT AS bytes_now, "
        "coalesce(sum(size) FILTER (WHERE first), 0)::BIGINT AS bytes_before, "
        "count(*) FILTER (WHERE last) AS files_now, count(*) FILTER (WHERE first) AS "
        "files_before FROM f GROUP BY ALL) "
        "SELECT source, folder, bytes_now - bytes_before AS grown_bytes, bytes_before, "
        f"bytes_now, files_now - files_before AS grown_files FROM g {top} "
        f"ORDER BY grown_bytes DESC, source, folder {limit}",
        [*params, sorted(filecat.cataloged(cat.storage))],
    )


def file_growth(cat: Catalog, opts: ReportOptions) -> ReportResult:
    table = folder_growth(cat, opts)
    notes = []
    if not table.num_rows:
        notes.append("no point in the period has a file catalog (`comb index --all` builds them)")
    return ReportResult(table, notes)


def file_churn(cat: Catalog, opts: ReportOptions) -> ReportResult:
    where, params = _filter(opts)
    limit = f"LIMIT {int(opts.limit)}" if opts.limit else ""
    table = _sql(
        cat,
        "SELECT source, '/' || volume || path_text AS path, count(*) AS rewrites, "
        "min(time) AS first_rewrite, max(time) AS last_rewrite, arg_max(size, time) AS size "
        f"FROM file_changes WHERE change = 'modified' AND kind = 'file' AND {where} "
        f"GROUP BY ALL ORDER BY rewrites DESC, source, path {limit}",
        params,
    )
    return ReportResult(table, [])


FILE_REPORTS = [
    Report(
        "file-growth",
        "folders whose files grew most from a source's first to its last point in the period",
        file_growth,
    ),
    Report("file-churn", "files rewritten most often (from the file catalogs)", file_churn),
]
