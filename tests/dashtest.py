"""Dashboard test data: the report tables the dashboard draws, built by hand (shared by the
dashboard tests)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pyarrow as pa

from catalog.analytics.dashboard.render import (
    DashboardData,
)
from catalog.units import format_bytes

HOSTILE = '<script>alert("x")</script> & "q"'
DAY_US = 86_400_000_000
T0_US = 1_700_000_000_000_000  # 2023-11-14
TS = pa.timestamp("us", tz="UTC")
GiB = 1 << 30
GROWTH = pa.schema(
    [("time", TS), ("source", pa.string()), ("repository_stored_bytes", pa.int64()),
     ("source_stored_bytes", pa.int64())]
)  # fmt: skip
CHANGE = pa.schema(
    [("time", TS), ("source", pa.string()), ("bytes_changed", pa.int64()),
     ("bytes_per_hour", pa.float64())]
)  # fmt: skip
RATIOS = pa.schema(
    [("time", TS), ("source", pa.string()), ("dedup_ratio", pa.float64()),
     ("compression_ratio", pa.float64())]
)  # fmt: skip
PROJECTION = pa.schema(
    [("day", pa.float64()), ("time", TS), ("stored_bytes", pa.float64()),
     ("projected_bytes", pa.float64()), ("kind", pa.string())]
)  # fmt: skip
HOT = pa.schema([("source", pa.string())] + [
    (c, pa.int64()) for c in ("disk_bytes", "bucket_offset", "bucket_bytes", "changes")
])  # fmt: skip
DIR_GROWTH = pa.schema([("source", pa.string()), ("folder", pa.string())] + [
    (c, pa.int64()) for c in ("grown_bytes", "bytes_before", "bytes_now", "grown_files")
])  # fmt: skip
HORIZONS_D = (30, 90, 365)


def dash_table(schema: pa.Schema, rows: Sequence[tuple[object, ...]]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)


def dash_data(
    sources: int = 3,
    points: int = 40,
    buckets: int = 64,
    warning: str | None = None,
    step_us: int = DAY_US,
) -> DashboardData:
    """Every source backed up once per step, in turn; one of them has a hostile name."""
    names = [HOSTILE if i == 1 else f"web{i:02d}" for i in range(sources)]
    rng = random.Random(7)
    growth, change, ratios = [], [], []
    repository, own = 0, dict.fromkeys(names, 0)
    for k in range(points):
        for i, name in enumerate(names):
            time = T0_US + k * step_us + i * step_us // sources
            added = rng.randint(1, 50) << 20
            repository, own[name] = repository + added, own[name] + added
            growth.append((time, name, repository, own[name]))
            change.append((time, name, added, added / 24 if k else None))
            ratios.append((time, name, 1.2 + rng.random(), 1.5 + i / 2 + rng.random() / 5))
    days = [(g[0] - T0_US) / DAY_US for g in growth]
    slope = repository / max(days[-1], 1.0)
    projection: list[tuple[float, float | None, float, str]] = [
        (d, float(g[2]), d * slope, "observed") for d, g in zip(days, growth, strict=True)
    ]
    projection += [(d, None, d * slope, "projected") for d in (0.0, days[-1])]
    projection += [(days[-1] + h, None, (days[-1] + h) * slope, "projected") for h in HORIZONS_D]
    dated = [(d, T0_US + round(d * DAY_US), *rest) for d, *rest in projection]
    hot = []
    for i, name in enumerate(names):
        disk = (4 << i) * GiB
        for b in range(buckets):
            if rng.random() < 0.5:
                hot.append((name, disk, b * disk // buckets, disk // buckets, rng.randint(1, 40)))
    folders = [f"/disk/srv/{HOSTILE}" if i == 2 else f"/disk/home/u{i}" for i in range(12)]
    dirs = []
    for name in names:
        for folder in folders:  # a few shrank, and more grew than the chart draws
            grown, before = rng.randint(-(4 << 20), 64 << 20), rng.randint(1 << 20, 1 << 30)
            dirs.append((name, folder, grown, before, before + grown, rng.randint(-3, 40)))
    fit: dict[str, object] = {
        "slope_bytes_per_day": slope,
        "r2": 0.98765,
        "points": len(days),
        "warning": warning,
    }
    return DashboardData(
        title="/backup/<repo> & co",
        generated="2024-05-01T12:00:00Z",
        summary=[("Recovery points", f"{len(growth):,}"), ("Stored", format_bytes(repository))],
        growth=dash_table(GROWTH, growth),
        change_rate=dash_table(CHANGE, change),
        ratios=dash_table(RATIOS, ratios),
        projection=dash_table(PROJECTION, dated),
        projection_fit=fit,
        hot_regions=dash_table(HOT, hot),
        dir_growth=dash_table(DIR_GROWTH, dirs),
    )
