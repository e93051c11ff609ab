"""Fitting a straight line to the growth of stored bytes: the projection report's and the
dashboard's arithmetic (least squares over the cumulative stored bytes of ``stored_history``),
and the warning a short or poor fit must carry. Prints nothing."""

from __future__ import annotations

from datetime import datetime

import numpy as np

from catalog.analytics.catalog import Catalog

# A fit explaining less than this share of the variance is called poor.
POOR_FIT_R2 = 0.8


def fit_growth(
    cat: Catalog, source: str | None, since: datetime | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(days since the first point, cumulative stored bytes) per point, in time order; with
    ``since``, only points from then on are fitted (their totals still count everything)."""
    cat.need("stored_history")
    t = cat.con.sql(
        "SELECT * FROM (SELECT time, epoch(time - min(time) OVER ()) / 86400.0 AS day, "
        "sum(bytes_stored) OVER (ORDER BY ord ROWS UNBOUNDED PRECEDING) AS stored "
        "FROM stored_history WHERE source = ? OR ? IS NULL) WHERE time >= ? OR ? IS NULL "
        "ORDER BY time",
        params=[source, source, since, since],
    ).to_arrow_table()
    return (
        t.column("day").to_numpy(zero_copy_only=False).astype(float),
        t.column("stored").to_numpy(zero_copy_only=False).astype(float),
    )


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float | None]:
    """Least squares y = a + b x: (a, b, r²); r² is None when y does not vary."""
    if len(x) < 2 or float(np.ptp(x)) == 0.0:
        return (float(y[-1]) if len(y) else 0.0), 0.0, None
    b, a = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = None if ss_tot == 0 else 1.0 - float(((y - (a + b * x)) ** 2).sum()) / ss_tot
    return float(a), float(b), r2


def fit_warning(n: int, r2: float | None, span_days: float, ahead_days: float) -> str | None:
    """Why the projection should not be trusted, if it should not (None when it may be)."""
    if n < 3:
        return f"only {n} point(s): the projection is a guess"
    why = []
    if r2 is not None and r2 < POOR_FIT_R2:
        why.append(f"poor fit (r² = {r2:.2f} < {POOR_FIT_R2}): growth is not linear")
    if span_days < max(1.0, ahead_days / 10):
        why.append(f"the history spans {span_days:.2g} day(s), projected {ahead_days:.0f} ahead")
    return "; ".join(why) + ": do not trust the projection" if why else None


def first_time(cat: Catalog, source: str | None) -> np.datetime64:
    times = cat.history.times()
    mine = np.array([p.source == source for p in cat.history.points], bool)
    return times[mine].min() if mine.any() else times.min()
