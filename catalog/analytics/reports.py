"""Named reports over the analytics catalog: each one SQL (plus a little arithmetic) returning
one Arrow table, with notes for anything the reader must know (a poor fit, incomplete history).

Reports read point documents and change tables only, never manifests or packs, so each one
costs what the history changed, not points x disk size (bench: ``python -m bench catalog``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from catalog.analytics.catalog import Catalog
from catalog.analytics.growth_fit import first_time, fit_growth, fit_warning, linear_fit
from catalog.analytics.regions import hot_regions_table
from catalog.errors import PointNotFound, QueryError, UsageError
from catalog.maint.retention import KeepPolicy, forget_mask

MIB = 1 << 20
HOT_REGION_BUCKETS = 1024  # default: the disk in about this many regions (power-of-two sizes)


@dataclass(frozen=True)
class ReportOptions:
    source: str | None = None
    since: datetime | None = None
    period: str = "day"
    bucket_bytes: int | None = None
    limit: int | None = 20
    horizons: tuple[int, ...] = (30, 90, 365)
    policy: KeepPolicy = field(default_factory=KeepPolicy)
    forget: tuple[str, ...] = ()
    held: frozenset[str] = frozenset()  # points a forget keeps whatever the policy (overlay bases)
    now: datetime | None = None
    # rpo: each source's objective in seconds (a job file's `every`), by source name
    targets: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ReportResult:
    table: pa.Table
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    name: str
    help: str
    run: Callable[[Catalog, ReportOptions], ReportResult]


def _filter(opts: ReportOptions, time_col: str = "time") -> tuple[str, list[object]]:
    """A WHERE clause (and its parameters) for --source and --since. On a ``period`` column,
    --since keeps the period it falls in (the periods are those of --period)."""
    conds: list[str] = ["true"]
    params: list[object] = []
    if opts.source is not None:
        conds.append("source = ?")
        params.append(opts.source)
    if opts.since is not None:
        if time_col == "period":
            conds.append("period >= date_trunc(?, ?::TIMESTAMPTZ)")
            params += [opts.period, opts.since]
        else:
            conds.append(f"{time_col} >= ?")
            params.append(opts.since)
    return " AND ".join(conds), params


def _sql(cat: Catalog, sql: str, params: list[object] | None = None) -> pa.Table:
    cat.need(sql)
    return cat.con.sql(sql, params=params or None).to_arrow_table()


def _history_notes(cat: Catalog) -> list[str]:
    bad = cat.incomplete_sources()
    notes = [cat.forgotten_note] if cat.forgotten_note else []
    if not bad:
        return notes
    return [
        f"{len(bad)} source(s) have points without change tables (made before comb 0.2) or "
        "whose parent is missing (a damaged point document); their change figures are "
        f"partial: {', '.join(map(repr, bad[:3]))}",
        *notes,
    ]


def growth(cat: Catalog, opts: ReportOptions) -> ReportResult:
    if opts.period not in ("day", "week", "month"):
        raise UsageError(f"unknown period {opts.period!r} (day, week or month)")
    where, params = _filter(opts, "period")
    # Stored bytes as the repository holds them: forgotten points' rows count what kept
    # points still use of what they stored (a period may have no live point left).
    table = _sql(
        cat,
        "WITH g AS (SELECT source, date_trunc(?, time) AS period, count(*) AS points, "
        "arg_max(bytes_data, pos) AS data_bytes, arg_max(size, pos) AS disk_bytes "
        "FROM point_history GROUP BY ALL), "
        "s AS (SELECT source, date_trunc(?, time) AS period, "
        "sum(bytes_stored)::BIGINT AS stored_bytes FROM stored_history GROUP BY ALL), "
        "j AS (SELECT source, period, coalesce(g.points, 0) AS points, "
        "coalesce(s.stored_bytes, 0) AS stored_bytes, data_bytes, disk_bytes "
        "FROM g FULL JOIN s USING (source, period)) "
        "SELECT source, period, points, stored_bytes, (sum(stored_bytes) OVER "
        "(PARTITION BY source ORDER BY period))::BIGINT AS cumulative_stored_bytes, "
        f"data_bytes, disk_bytes FROM j WHERE {where} ORDER BY source, period",
        [opts.period, opts.period, *params],
    )
    return ReportResult(table, [cat.forgotten_note] if cat.forgotten_note else [])


def change_rate(cat: Catalog, opts: ReportOptions) -> ReportResult:
    where, params = _filter(opts)
    rate = "bytes_changed / hours"
    table = _sql(
        cat,
        "WITH r AS (SELECT source, time, bytes_changed, epoch(time - lag(time) OVER "
        "(PARTITION BY lane ORDER BY pos)) / 3600.0 AS hours FROM point_history) "
        "SELECT source, count(*) AS intervals, sum(bytes_changed)::BIGINT AS changed_bytes, "
        "sum(hours) AS hours, sum(bytes_changed) / sum(hours) AS mean_bytes_per_hour, "
        f"quantile_cont({rate}, 0.5) AS p50_bytes_per_hour, "
        f"quantile_cont({rate}, 0.9) AS p90_bytes_per_hour, "
        f"quantile_cont({rate}, 0.99) AS p99_bytes_per_hour, max({rate}) AS max_bytes_per_hour "
        f"FROM r WHERE hours > 0 AND bytes_changed IS NOT NULL AND {where} "
        "GROUP BY source ORDER BY source",
        params,
    )
    return ReportResult(table, _history_notes(cat))


def default_bucket(disk_bytes: int) -> int:
    """Power-of-two region size (at least 1 MiB) giving about HOT_REGION_BUCKETS regions."""
    want = max(MIB, -(-disk_bytes // HOT_REGION_BUCKETS))
    return 1 << (want - 1).bit_length()


def hot_regions(cat: Catalog, opts: ReportOptions) -> ReportResult:
    """Regions by how often they changed; first backups (everything is new) do not count.
    Each source's disk is cut in regions of ``--bucket`` bytes, or by default its own size
    in about HOT_REGION_BUCKETS power-of-two regions."""
    if opts.bucket_bytes is not None and opts.bucket_bytes < 1:
        raise UsageError("--bucket must be a positive size")
    h = cat.history
    sizes = {name: 0 for name in h.sources}
    for p in h.points:
        sizes[p.source] = max(sizes[p.source], p.size)
    times = h.times()
    since = (
        np.datetime64(opts.since.astimezone(UTC).replace(tzinfo=None), "us") if opts.since else None
    )
    # The points that count, each with its region size: a small table, joined first, so the
    # scan of the change rows aggregates per (point, region) before anything else.
    chosen = [
        i
        for i, p in enumerate(h.points)
        if p.parent is not None
        and (opts.source is None or p.source == opts.source)
        and (since is None or times[i] >= since)
    ]
    cat.con.register(
        "_regions_of",
        pa.table(
            {
                "pos": pa.array(chosen, pa.int64()),
                "bucket": pa.array(
                    [
                        opts.bucket_bytes or default_bucket(sizes[h.points[i].source])
                        for i in chosen
                    ],
                    pa.int64(),
                ),
                "size": pa.array([h.points[i].size for i in chosen], pa.int64()),
                "chunk": pa.array([h.points[i].chunk_size for i in chosen], pa.int64()),
            }
        ),
    )
    if cat.storage.sealer.encrypted:  # numpy over two decrypted columns
        buckets = [opts.bucket_bytes or default_bucket(sizes[h.points[i].source]) for i in chosen]
        table = hot_regions_table(h, chosen, buckets, opts.limit)
        return ReportResult(table, _history_notes(cat))
    cat.need_changes()
    limit = f"LIMIT {int(opts.limit)}" if opts.limit else ""
    table = _sql(
        cat,
        'WITH c AS (SELECT o.pos, (o."offset" // b.bucket) * b.bucket AS region_offset, '
        'b.bucket AS region_bytes, count(*) AS n, sum(least(b.chunk, b.size - o."offset")) '
        "AS bytes FROM _changes o JOIN _regions_of b ON b.pos = o.pos GROUP BY ALL) "
        "SELECT h.source, region_offset, region_bytes, sum(n)::BIGINT AS changes, "
        "count(*) AS points, sum(bytes)::BIGINT AS changed_bytes, "
        "sum(n) / sum(sum(n)) OVER (PARTITION BY h.source) AS share "
        "FROM c JOIN _point_history h ON h.pos = c.pos "
        "GROUP BY h.source, region_offset, region_bytes "
        f"ORDER BY changes DESC, h.source, region_offset {limit}",
    )
    return ReportResult(table, _history_notes(cat))


def ratios(cat: Catalog, opts: ReportOptions) -> ReportResult:
    """Repository-wide dedup and compression over time (cumulative, as of each period's end)."""
    where, params = _filter(replace(opts, source=None), "period")
    table = _sql(
        cat,
        # Data bytes are known only with change tables: the dedup ratio counts those points
        # alone (in both terms); compression counts every point.
        # Forgotten points' rows (stored_history) bring what kept points still use of theirs.
        "WITH c AS (SELECT time, row_number() OVER w AS n, sum(bytes_data) OVER w AS logical, "
        "sum(CASE WHEN has_changes THEN bytes_new END) OVER w AS plain_known, "
        "sum(bytes_new) OVER w AS plain, sum(bytes_stored) OVER w AS stored FROM stored_history "
        "WINDOW w AS (ORDER BY ord ROWS UNBOUNDED PRECEDING)), "
        "p AS (SELECT date_trunc(?, time) AS period, arg_max(logical, n) AS logical, "
        "arg_max(plain_known, n) AS plain_known, arg_max(plain, n) AS plain, "
        "arg_max(stored, n) AS stored FROM c GROUP BY 1) "
        "SELECT period, logical::BIGINT AS logical_bytes, plain::BIGINT AS unique_bytes, "
        "stored::BIGINT AS stored_bytes, logical / nullif(plain_known, 0) AS dedup_ratio, "
        "plain / nullif(stored, 0) AS compression_ratio "
        f"FROM p WHERE {where} ORDER BY period",
        [opts.period, *params],
    )
    notes = _history_notes(cat)
    if opts.source is not None:
        notes.append("ratios are repository-wide (chunks are shared across sources)")
    return ReportResult(table, notes)


def unique(cat: Catalog, opts: ReportOptions) -> ReportResult:
    where, params = _filter(opts)
    table = _sql(
        cat,
        "SELECT point_id, source, time, unique_bytes, stored_bytes, changed_bytes, new_bytes "
        f"FROM point_usage WHERE {where} ORDER BY source, time",
        params,
    )
    return ReportResult(table, _history_notes(cat))


def retention(cat: Catalog, opts: ReportOptions) -> ReportResult:
    """What forgetting points (a keep policy and/or named points) would free. Freed bytes are
    null for a source whose history is incomplete (they could not be exact)."""
    h = cat.history
    if not opts.policy.any() and not opts.forget:
        raise UsageError(
            "give a policy (--keep-last/-hourly/-daily/-weekly/-monthly/-yearly) "
            "or points to --forget"
        )
    if opts.since is not None:
        raise UsageError("retention applies to whole histories: --since does not apply")
    forget = forget_mask(h.points, opts.policy, opts.forget, opts.source)
    kept_anyway = forget & np.array([p.id in opts.held for p in h.points], bool)
    forget &= ~kept_anyway
    freed = cat.freed(forget)
    rows: list[tuple[str, int, int, int, int | None]] = []
    for s, name in enumerate(h.sources):
        mine = h.source_of == s
        if opts.source is not None and name != opts.source:
            continue
        exact = bool(h.complete[s])
        rows.append(
            (
                name,
                int(mine.sum()),
                int((mine & ~forget).sum()),
                int((mine & forget).sum()),
                freed.get(name, 0) if exact else None,
            )
        )
    # Chunks stored by a source none of whose points is left (forgotten earlier) but which
    # points of other sources still hold.
    rows += [
        (name, 0, 0, 0, n)
        for name, n in sorted(freed.items())
        if n and name not in h.sources and (opts.source is None or name == opts.source)
    ]
    table = pa.table(
        {
            "source": pa.array([r[0] for r in rows], pa.string()),
            "points": pa.array([r[1] for r in rows], pa.int64()),
            "kept": pa.array([r[2] for r in rows], pa.int64()),
            "forgotten": pa.array([r[3] for r in rows], pa.int64()),
            "freed_bytes": pa.array([r[4] for r in rows], pa.int64()),
        }
    )
    total = sum(r[4] or 0 for r in rows)
    notes = [
        f"forgetting {int(forget.sum())} of {len(h.points)} point(s) frees {total:,} bytes "
        f"({total / 2**30:.2f} GiB)"
    ]
    if kept_anyway.any():
        notes.append(
            f"{int(kept_anyway.sum())} point(s) the policy would forget are kept as the base of "
            "an overlay, as `forget` keeps them"
        )
    return ReportResult(table, notes + _history_notes(cat))


def projection(cat: Catalog, opts: ReportOptions) -> ReportResult:
    x, y = fit_growth(cat, opts.source, opts.since)
    if len(x) == 0:
        raise PointNotFound("no recovery points to project from")
    a, b, r2 = linear_fit(x, y)
    first = cat.history.times().min() if opts.source is None else None
    t0 = first_time(cat, opts.source) if first is None else first
    last = float(x[-1])
    horizons = (0, *opts.horizons)
    days = [last + d for d in horizons]
    dates = [(t0 + np.timedelta64(int(d * 86400e6), "us")) for d in days]
    table = pa.table(
        {
            "horizon_days": pa.array(horizons, pa.int64()),
            "date": pa.array(np.array(dates, "datetime64[us]"), pa.timestamp("us", tz="UTC")),
            "projected_bytes": pa.array([a + b * d for d in days], pa.float64()),
            "slope_bytes_per_day": pa.array([b] * len(days), pa.float64()),
            "r2": pa.array([r2] * len(days), pa.float64()),
            "fit_points": pa.array([len(x)] * len(days), pa.int64()),
        }
    )
    notes = []
    warning = fit_warning(len(x), r2, last - float(x[0]), max(horizons))
    if warning:
        notes.append(warning)
    return ReportResult(table, notes)


def throughput(cat: Catalog, opts: ReportOptions) -> ReportResult:
    where, params = _filter(opts)
    table = _sql(
        cat,
        "SELECT point_id, source, time, mode, engine, seconds, bytes_read, "
        "bytes_read / nullif(seconds, 0) / 1e6 AS read_mb_per_s, bytes_stored, "
        "bytes_stored / nullif(seconds, 0) / 1e6 AS stored_mb_per_s "
        f"FROM point_history WHERE {where} ORDER BY time, pos",
        params,
    )
    return ReportResult(table)


def rpo(cat: Catalog, opts: ReportOptions) -> ReportResult:
    """The recovery point objective achieved: the largest gap between points per source; with
    targets (``report rpo --job FILE``), each target in hours and whether the latest point is
    within it (``kept``) or not (``missed``: a source of the job with no point too)."""
    where, params = _filter(opts)
    now = opts.now or datetime.now(UTC)
    sql = (
        "WITH g AS (SELECT source, time, lag(time) OVER (PARTITION BY source ORDER BY pos) "
        "AS prev FROM point_history) "
        "SELECT source, count(*) AS points, min(time) AS first_time, max(time) AS last_time, "
        "max(epoch(time - prev)) / 3600.0 AS largest_gap_hours, "
        "arg_max(prev, time - prev) AS gap_from, arg_max(time, time - prev) AS gap_to, "
        "median(epoch(time - prev)) / 3600.0 AS median_gap_hours, "
        "epoch(?::TIMESTAMPTZ - max(time)) / 3600.0 AS hours_since_last "
        f"FROM g WHERE {where} GROUP BY source"
    )
    if not opts.targets:
        return ReportResult(_sql(cat, f"{sql} ORDER BY source", [now, *params]))
    wanted = [(s, e) for s, e in opts.targets if opts.source is None or s == opts.source]
    cat.con.register("_rpo_targets", pa.table({
        "source": pa.array([s for s, _ in wanted], pa.string()),
        "every_s": pa.array([e for _, e in wanted], pa.float64()),
    }))  # fmt: skip
    table = _sql(
        cat,
        f"WITH r AS ({sql}) SELECT coalesce(r.source, t.source) AS source, "
        "coalesce(r.points, 0) AS points, first_time, last_time, largest_gap_hours, gap_from, "
        "gap_to, median_gap_hours, hours_since_last, t.every_s / 3600.0 AS every_hours, "
        "CASE WHEN t.every_s IS NULL THEN NULL WHEN hours_since_last * 3600 <= t.every_s "
        "THEN 'kept' ELSE 'missed' END AS rpo "
        "FROM r FULL OUTER JOIN _rpo_targets t ON r.source = t.source ORDER BY 1",
        [now, *params],
    )
    return ReportResult(table)


REPORTS: dict[str, Report] = {
    r.name: r
    for r in [
        Report(
            "growth", "stored bytes per source per day/week/month, and the running total", growth
        ),
        Report(
            "change-rate", "bytes changed per hour per source: mean and percentiles", change_rate
        ),
        Report("hot-regions", "disk regions that change most often across points", hot_regions),
        Report("ratios", "dedup and compression ratio of the repository over time", ratios),
        Report("unique", "per point: bytes no other point holds (freed by deleting it)", unique),
        Report("retention", "what a keep policy or forgetting points would free", retention),
        Report(
            "projection", "repository size 30/90/365 days ahead (linear fit, with r²)", projection
        ),
        Report("throughput", "per point: backup duration and MB/s", throughput),
        Report("rpo", "recovery point objective achieved: largest gap between points", rpo),
    ]
}


def _file_reports() -> None:
    """The reports over the file catalogs (``file_reports`` builds on this module's types)."""
    from catalog.analytics.file_reports import FILE_REPORTS

    REPORTS.update({r.name: r for r in FILE_REPORTS})


_file_reports()


def run_report(cat: Catalog, name: str, opts: ReportOptions) -> ReportResult:
    report = REPORTS.get(name)
    if report is None:
        raise QueryError(f"unknown report {name!r} (see `comb report --list`)")
    return report.run(cat, opts)
