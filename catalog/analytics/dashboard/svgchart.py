"""Generic SVG line and scatter charts for self-contained HTML pages.

Owns the drawing machinery: number, byte and time axes with their ticks (time ticks adapt to
the span, from seconds to years), a log colour scale, a plot's coordinate mapping, series
marks (lines, dots, M4 thinning of long series), the chart's SVG, its legend, and picking the
drawable points out of nullable columns; byte sizes are formatted by ``catalog.units``. It
knows nothing of backups, repositories or Arrow tables: callers hand it series of (x, y)
floats (times as seconds since the epoch) and get markup back. It must not reference anything
outside the page (no scripts, fonts, stylesheets or images), and it escapes every string it is
given, so a hostile series name can neither load nor run anything. The page's CSS (classes
``grid``, ``tick``, ``line``, ``dots``, ``legend``, ``empty``) belongs to the caller.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from catalog.units import BYTE_UNITS

CHART_WIDTH_PX, CHART_HEIGHT_PX = 960, 280
PANEL_WIDTH_PX, PANEL_HEIGHT_PX = 470, 240
MARGIN_PX = (14, 40, 26, 74)  # top, right, bottom, left: room for tick labels
EMPTY = '<p class="empty">No data yet.</p>'
_SPARSE_POINTS = 60  # up to this many points a line also gets a dot per point
# Tick steps (seconds), whole seconds to fortnights; steps under a day divide it, so ticks fall
# on round times of the UTC day.
_TIME_STEPS_S = (
    1, 2, 5, 10, 15, 30, 60, 2 * 60, 5 * 60, 10 * 60, 15 * 60, 30 * 60, 3600, 2 * 3600, 3 * 3600,
    6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 14 * 86400,
)  # fmt: skip
_MONTH_STEPS = (1, 2, 3, 6, 12, 24, 60, 120)


def esc(text: object) -> str:
    """Text made safe for HTML and SVG content and attribute values."""
    return html.escape(str(text), quote=True)


def utc_date(seconds: float, fmt: str = "%Y-%m-%d") -> str:
    """Seconds since the epoch as a UTC date (or ``fmt``)."""
    return datetime.fromtimestamp(seconds, UTC).strftime(fmt)


def is_point(x: object, y: object) -> bool:
    """Whether (x, y) can be drawn: both numbers (not null), y finite."""
    return isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(y)


def points_by_key(
    keys: Sequence[Hashable], xs: Sequence[Any], ys: Sequence[Any]
) -> dict[str, list[tuple[float, float]]]:
    """Each key's (x, y) points in x order, keys sorted by name; rows with a null key, a null
    value or a non-finite y are left out (a series is drawn from whatever it has)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for k, x, y in zip(keys, xs, ys, strict=True):
        if k is not None and is_point(x, y):
            out.setdefault(str(k), []).append((float(x), float(y)))
    return {k: sorted(p) for k, p in sorted(out.items())}


def points(xs: Sequence[Any], ys: Sequence[Any]) -> list[tuple[float, float]]:
    """The drawable (x, y) points in x order."""
    return points_by_key([""] * len(xs), xs, ys).get("", [])


# --- axes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    lo: float
    hi: float
    ticks: tuple[tuple[float, str], ...]  # (value, label)


def linear_axis(lo: float, hi: float, label: Callable[[float], str], extend: bool) -> Axis:
    """Ticks at 1, 2, 2.5 or 5 x 10^k; ``extend`` widens the range to whole steps."""
    if hi <= lo:  # a single value: give it room so that it sits inside the chart
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    if extend:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks: list[tuple[float, str]] = []
    for k in itertools.count(math.ceil(lo / step - 1e-9)):
        if k * step > hi + step * 1e-9:
            return Axis(lo, hi, tuple(ticks))
        ticks.append((k * step, label(round(k * step, 9))))
    raise AssertionError("unreachable")


def bytes_axis(lo: float, hi: float, suffix: str = "", extend: bool = True) -> Axis:
    """Ticks at round numbers of one binary unit, the unit of the largest value; from 0 up."""
    lo = min(lo, 0.0)
    k = min(int(math.log(max(abs(lo), abs(hi), 1.0), 1024) + 1e-9), len(BYTE_UNITS) - 1)
    unit = 1024.0**k
    axis = linear_axis(
        lo / unit, hi / unit, lambda v: f"{v:g} {BYTE_UNITS[k]}{suffix}" if v else "0", extend
    )
    return Axis(axis.lo * unit, axis.hi * unit, tuple((v * unit, s) for v, s in axis.ticks))


def time_axis(lo: float, hi: float, max_ticks: int = 7) -> Axis:
    """UTC times at round seconds, minutes, hours, days, weeks or month starts, whichever step
    gives at most ``max_ticks`` intervals over the span: a history minutes long gets minute
    ticks, not one vertical line. ``lo`` and ``hi`` are seconds since the epoch."""
    if hi <= lo:  # a single time: show the days around it
        lo, hi = lo - 3 * 86400, hi + 3 * 86400
    elif hi - lo < 1:  # under a second apart: the whole seconds around them
        lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    for step in _TIME_STEPS_S:
        if (hi - lo) / step <= max_ticks:
            first = math.ceil(lo / step) * step
            return Axis(lo, hi, _time_ticks(range(first, math.floor(hi) + 1, step), hi - lo))
    months = (hi - lo) / (30.44 * 86400)
    step = next((m for m in _MONTH_STEPS if months / m <= max_ticks), _MONTH_STEPS[-1])
    start = datetime.fromtimestamp(lo, UTC)
    month = (start.year * 12 + start.month - 1) // step * step + step  # counted from year 0
    month_ticks: list[tuple[float, str]] = []
    while (t := datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp()) <= hi:
        month_ticks.append((t, utc_date(t)))
        month += step
    return Axis(lo, hi, tuple(month_ticks))


def _time_ticks(times: range, span_s: float) -> tuple[tuple[float, str], ...]:
    """Labels for ticks ``times.step`` seconds apart: dates for whole days; under a day, the
    time of day (with seconds when the step is under a minute) after the date where it changes
    (``Dec 06 17:05``, ``17:10``), or on every tick when the axis is longer than a day, so that
    no two ticks read the same."""
    if times.step >= 86400:
        return tuple((t, utc_date(t)) for t in times)
    clock = "%H:%M:%S" if times.step < 60 else "%H:%M"
    out: list[tuple[float, str]] = []
    day = ""
    for t in times:
        dated = utc_date(t, "%b %d ")
        out.append((t, (dated if span_s > 86400 or dated != day else "") + utc_date(t, clock)))
        day = dated
    return tuple(out)


def log_colour(count: float, top: float, stops: Sequence[str]) -> str:
    """``count`` (1 to ``top``) as a colour between ``stops`` (``#rrggbb``, two or more) on a
    log scale, so that a few very large counts do not wash out all the others."""
    t = math.log(count) / math.log(top) if top > 1 else 1.0
    pos = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    a, b, f = stops[i], stops[i + 1], pos - i
    mix = (int(a[j : j + 2], 16) * (1 - f) + int(b[j : j + 2], 16) * f for j in (1, 3, 5))
    return "#" + "".join(f"{round(c):02x}" for c in mix)


# --- charts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    points: list[tuple[float, float]]  # (x, y) in x order
    width_px: float = 2.0
    line: bool = True  # without a line, a dot per point however many there are
    dashed: bool = False


@dataclass(frozen=True)
class Plot:
    """A chart's axes and size: maps data values to pixels inside the margins."""

    x: Axis
    y: Axis
    width_px: int
    height_px: int

    def px(self, v: float) -> float:
        _, right, _, left = MARGIN_PX
        return left + (v - self.x.lo) / (self.x.hi - self.x.lo) * (self.width_px - left - right)

    def py(self, v: float) -> float:
        top, _, bottom, _ = MARGIN_PX
        inner = self.height_px - top - bottom
        return self.height_px - bottom - (v - self.y.lo) / (self.y.hi - self.y.lo) * inner


def thin(points: list[tuple[float, float]], columns: int) -> list[tuple[float, float]]:
    """First, lowest, highest and last point of each pixel column (M4): the same drawing from
    at most 4 points per column, so that a long history cannot make the page large or slow."""
    if len(points) <= 4 * columns:
        return points
    kept: list[tuple[float, float]] = []
    for _, group in itertools.groupby(points, key=lambda p: int(p[0])):
        g = list(group)
        keep = {0, len(g) - 1, min(range(len(g)), key=lambda i: g[i][1])}
        keep.add(max(range(len(g)), key=lambda i: g[i][1]))
        kept.extend(g[i] for i in sorted(keep))
    return kept


def _marks(plot: Plot, s: Series) -> str:
    pts = thin([(plot.px(x), plot.py(y)) for x, y in s.points], plot.width_px)
    name, out = esc(s.name), []
    if s.line:
        dash = ' stroke-dasharray="7 5"' if s.dashed else ""
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(
            f'<polyline class="line" data-series="{name}" points="{coords}" fill="none" '
            f'stroke="{s.colour}" stroke-width="{s.width_px}" stroke-linejoin="round"{dash}>'
            f"<title>{name}</title></polyline>"
        )
    if not s.line or len(pts) <= _SPARSE_POINTS:
        # Zero-length subpaths with round caps: a dot costs ~14 bytes instead of a <circle>.
        d = "".join(f"M{x:.1f} {y:.1f}h0" for x, y in pts)
        out.append(
            f'<path class="dots" data-series="{name}" d="{d}" stroke="{s.colour}" '
            f'stroke-width="{s.width_px + 3}" stroke-linecap="round"><title>{name}</title></path>'
        )
    return "".join(out)


def chart_svg(plot: Plot, series: Sequence[Series], overlay: str = "") -> str:
    """Grid, tick labels and the series' marks, then ``overlay`` (SVG markup) on top."""
    top, right, bottom, left = MARGIN_PX
    x1, y1 = plot.width_px - right, plot.height_px - bottom
    parts = [f'<svg viewBox="0 0 {plot.width_px} {plot.height_px}" role="img"><g class="grid">']
    for v, label in plot.y.ticks:
        y = plot.py(v)
        parts.append(
            f'<line x1="{left}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>'
        )
    for v, label in plot.x.ticks:
        x = plot.px(v)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y1 + 5}" class="tick"/>'
            f'<text x="{x:.1f}" y="{y1 + 18}" text-anchor="middle">{esc(label)}</text>'
        )
    parts.append(f'<line x1="{left}" x2="{x1}" y1="{y1}" y2="{y1}" class="tick"/></g>')
    parts.extend(_marks(plot, s) for s in series)
    return "".join(parts) + overlay + "</svg>"


def legend(series: Sequence[Series]) -> str:
    """A swatch and name per series; nothing for a single series (the heading names it)."""
    if len(series) < 2:
        return ""
    items = "".join(f'<li><i style="background:{s.colour}"></i>{esc(s.name)}</li>' for s in series)
    return f'<ul class="legend">{items}</ul>'


def figure(
    series: Sequence[Series],
    x_axis: Callable[[float, float], Axis],
    y_axis: Callable[[float, float], Axis],
    size: tuple[int, int] = (CHART_WIDTH_PX, CHART_HEIGHT_PX),
    overlay: Callable[[Plot], str] | None = None,
    with_legend: bool = True,
) -> str:
    """A legend and a chart with axes fitted to all the series' points; "no data" if none."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return EMPTY
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    plot = Plot(x_axis(min(xs), max(xs)), y_axis(min(ys), max(ys)), *size)
    svg = chart_svg(plot, drawn, overlay(plot) if overlay else "")
    return (legend(drawn) if with_legend else "") + svg
