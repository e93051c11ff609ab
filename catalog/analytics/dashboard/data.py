"""The dashboard's tables, computed from the analytics catalog with the named reports' queries.

Builds ``catalog.analytics.dashboard.render.DashboardData``; the page itself is drawn by
``catalog.analytics.dashboard.render``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from catalog.analytics.catalog import Catalog
from catalog.analytics.dashboard.dirgrowth import DIR_GROWTH_TOP
from catalog.analytics.dashboard.render import DashboardData
from catalog.analytics.growth_fit import fit_growth, fit_warning, linear_fit
from catalog.analytics.reports import ReportOptions, default_bucket, hot_regions, rpo
from catalog.store.points import RecoveryPoint
from catalog.units import format_bytes

HORIZONS_DAYS = (30, 90, 365)
GROWTH_CARD = "Growth per day"  # the fitted slope: it carries the projection's warning


RPO_CARD = "RPO kept"  # with a job file's targets: how many sources are within theirs


def dashboard_data(
    cat: Catalog, title: str, now: datetime | None = None,
    targets: tuple[tuple[str, float], ...] = (),
) -> DashboardData:  # fmt: skip
    """The page's data; ``targets``: each source's objective in seconds (a job file's)."""
    # Imported here: file_reports imports reports, which registers file_reports' reports as it
    # loads, so importing file_reports before reports is a cycle (this module's imports sort so).
    from catalog.analytics.file_reports import folder_growth

    now = now or datetime.now(UTC)
    cat.need("stored_history")  # forgotten points' rows: what kept points still use of theirs
    growth = cat.con.sql(
        "SELECT time, source, (sum(bytes_stored) OVER (ORDER BY ord ROWS UNBOUNDED "
        "PRECEDING))::BIGINT AS repository_stored_bytes, (sum(bytes_stored) OVER (PARTITION BY "
        "source ORDER BY ord ROWS UNBOUNDED PRECEDING))::BIGINT AS source_stored_bytes "
        "FROM stored_history ORDER BY ord"
    ).to_arrow_table()
    rate = cat.con.sql(
        "SELECT time, source, bytes_changed, bytes_changed / (epoch(time - lag(time) OVER "
        "(PARTITION BY lane ORDER BY pos)) / 3600.0) AS bytes_per_hour FROM point_history "
        "ORDER BY time, pos"
    ).to_arrow_table()
    ratios = cat.con.sql(
        "SELECT time, 'repository' AS source, sum(bytes_data) OVER w / nullif(sum(CASE WHEN "
        "has_changes THEN bytes_new END) OVER w, 0) AS dedup_ratio, "
        "sum(bytes_new) OVER w / nullif(sum(bytes_stored) OVER w, 0) "
        "AS compression_ratio FROM stored_history WINDOW w AS (ORDER BY ord ROWS "
        "UNBOUNDED PRECEDING) ORDER BY ord"
    ).to_arrow_table()
    projection, fit = _projection(cat)
    summary, warnings = _summary(cat, fit, now), {}
    if fit["warning"]:
        warnings[GROWTH_CARD] = str(fit["warning"])
    if targets:
        kept, missed = _rpo_kept(cat, now, targets)
        summary.append((RPO_CARD, f"{len(kept)} of {len(kept) + len(missed)} sources"))
        if missed:
            warnings[RPO_CARD] = "missed: " + ", ".join(missed)
    return DashboardData(
        title=title,
        generated=now.isoformat(timespec="seconds"),
        summary=summary,
        growth=growth,
        change_rate=rate.set_column(
            3, "bytes_per_hour", rate.column("bytes_per_hour").cast(pa.float64())
        ),
        ratios=ratios,
        projection=projection,
        projection_fit=fit,
        hot_regions=_heat(cat),
        dir_growth=folder_growth(cat, ReportOptions(limit=None), per_source=DIR_GROWTH_TOP),
        card_warnings=warnings,
    )


def _rpo_kept(
    cat: Catalog, now: datetime, targets: tuple[tuple[str, float], ...]
) -> tuple[list[str], list[str]]:
    """The sources within their objective, and those not (``report rpo --job``)."""
    table = rpo(cat, ReportOptions(now=now, targets=targets)).table.to_pylist()
    wanted = {s for s, _ in targets}
    kept = [r["source"] for r in table if r["source"] in wanted and r["rpo"] == "kept"]
    return kept, [r["source"] for r in table if r["source"] in wanted and r["rpo"] != "kept"]


def _projection(cat: Catalog) -> tuple[pa.Table, dict[str, object]]:
    x, y = fit_growth(cat, None)
    a, b, r2 = linear_fit(x, y)
    times = np.sort(cat.history.times()) if len(x) else np.array([], "datetime64[us]")
    t0 = times[0] if len(times) else np.datetime64("1970-01-01", "us")
    last = float(x[-1]) if len(x) else 0.0
    days = [*x.tolist(), *(last + h for h in HORIZONS_DAYS)] if len(x) else []
    observed = [*y.tolist(), *([None] * len(HORIZONS_DAYS))] if len(x) else []
    table = pa.table(
        {
            "day": pa.array(days, pa.float64()),
            "time": pa.array(
                np.array(
                    [t0 + np.timedelta64(int(d * 86400e6), "us") for d in days], "datetime64[us]"
                ),
                pa.timestamp("us", tz="UTC"),
            ),
            "stored_bytes": pa.array(observed, pa.float64()),
            "projected_bytes": pa.array([a + b * d for d in days], pa.float64()),
            "kind": pa.array(
                ["observed"] * len(x) + (["projected"] * len(HORIZONS_DAYS) if len(x) else []),
                pa.string(),
            ),
        }
    )
    fit: dict[str, object] = {
        "slope_bytes_per_day": b,
        "r2": r2,
        "points": len(x),
        "warning": fit_warning(len(x), r2, last - float(x[0]), max(HORIZONS_DAYS))
        if len(x)
        else None,
    }
    return table, fit


def _heat(cat: Catalog) -> pa.Table:
    """Every source's disk in regions, with how many chunk changes each region saw (a source
    that never changed gets one row of 0, so its disk is still drawn)."""
    t = hot_regions(cat, ReportOptions(limit=None)).table
    sizes: dict[str, int] = {}
    for p in cat.history.points:
        sizes[p.source] = max(sizes.get(p.source, 0), p.size)
    seen = set(t.column("source").to_pylist())
    quiet = [s for s in sizes if s not in seen]
    sources = [*t.column("source").to_pylist(), *quiet]
    return pa.table(
        {
            "source": pa.array(sources, pa.string()),
            "disk_bytes": pa.array([sizes[s] for s in sources], pa.int64()),
            "bucket_offset": pa.array(
                [*t.column("region_offset").to_pylist(), *([0] * len(quiet))], pa.int64()
            ),
            "bucket_bytes": pa.array(
                [*t.column("region_bytes").to_pylist(), *(default_bucket(sizes[s]) for s in quiet)],
                pa.int64(),
            ),
            "changes": pa.array(
                [*t.column("changes").to_pylist(), *([0] * len(quiet))], pa.int64()
            ),
        }
    )


def _summary(cat: Catalog, fit: Mapping[str, object], now: datetime) -> list[tuple[str, str]]:
    h = cat.history
    known = [p for p in h.points if p.changes is not None]  # data bytes need change tables
    # Stored and new bytes as the repository holds them (forgotten points' rows included).
    stored, new, new_known = cat.con.execute(
        "SELECT coalesce(sum(bytes_stored), 0)::BIGINT, coalesce(sum(bytes_new), 0)::BIGINT, "
        "coalesce(sum(bytes_new) FILTER (WHERE has_changes), 0)::BIGINT FROM stored_history"
    ).fetchall()[0]
    logical = sum(p.stats.bytes_data for p in known)
    latest: dict[str, RecoveryPoint] = {}
    for p in sorted(h.points, key=lambda p: (p.time, p.id)):
        latest[p.source] = p
    protected = [p.stats.bytes_data for p in latest.values() if p.changes is not None]
    gaps = rpo(cat, ReportOptions(now=now)).table
    worst = max(
        (g for g in gaps.column("largest_gap_hours").to_pylist() if g is not None), default=None
    )
    median = cat.con.execute(
        "SELECT median(bytes_changed / (epoch(time - prev) / 3600.0)) FROM (SELECT time, "
        "bytes_changed, lag(time) OVER (PARTITION BY lane ORDER BY pos) AS prev "
        "FROM point_history) WHERE time > prev"
    ).fetchall()[0]
    slope = float(fit["slope_bytes_per_day"])  # type: ignore[arg-type]
    na = "n/a"
    return [
        ("Recovery points", f"{len(h.points):,}"),
        ("Sources", f"{len(h.sources):,}"),
        ("Stored", format_bytes(stored)),
        ("Latest disks' data", format_bytes(sum(protected)) if protected else na),
        ("Dedup ratio", f"{logical / new_known:.1f}×" if new_known and known else na),
        ("Compression ratio", f"{new / stored:.2f}×" if stored else na),
        (GROWTH_CARD, format_bytes(slope)),
        ("Largest gap (RPO)", f"{worst:.1f} h" if worst is not None else na),
        (
            "Median change rate",
            f"{format_bytes(median[0])}/h" if median and median[0] is not None else na,
        ),
    ]
