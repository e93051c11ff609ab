"""The history dashboard: one self-contained HTML page made from analytics tables.

Owns the presentation only: summary cards, the charts' content (growth, change rate, ratios,
projection; drawn by ``catalog.analytics.dashboard.svgchart``) and per-source heat strips, with the
page's CSS (the directory-growth section is ``dirgrowth``'s). It must not read the repository or
compute analytics: the caller builds the tables, this module formats them. It must not make the
page depend on anything outside the file either: no scripts, fonts, stylesheets or images are
referenced, and a Content-Security-Policy forbids every fetch, so the page opens offline and a
hostile source name (every data string is HTML-escaped) can neither load nor run anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from catalog.analytics.dashboard.dirgrowth import DIR_GROWTH_SECTION, dir_growth
from catalog.analytics.dashboard.svgchart import (
    CHART_WIDTH_PX,
    EMPTY,
    MARGIN_PX,
    PANEL_HEIGHT_PX,
    PANEL_WIDTH_PX,
    Plot,
    Series,
    bytes_axis,
    esc,
    figure,
    is_point,
    legend,
    linear_axis,
    log_colour,
    points,
    points_by_key,
    time_axis,
    utc_date,
)
from catalog.units import format_bytes

__all__ = [
    "FIT_COLOUR", "HEAT_COLOURS", "REPOSITORY_COLOUR", "SOURCE_COLOURS", "DashboardData",
    "render_dashboard",
]  # fmt: skip

# Tableau 10: distinguishable on white and under the common colour-vision deficiencies.
SOURCE_COLOURS = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
    "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac",
)  # fmt: skip
REPOSITORY_COLOUR = "#1f2933"
FIT_COLOUR = "#d9480f"
# ColorBrewer YlOrRd: a sequential scale that stays readable in greyscale.
HEAT_COLOURS = ("#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026")

_HEAT_ROW_PX, _HEAT_BAR_PX, _HEAT_LEGEND_PX = 74, 22, 40
_NAME_CHARS = 60  # longer source names are cut in chart labels (the tooltip has them whole)


@dataclass(frozen=True)
class DashboardData:
    """What the page shows, built by the caller; times are timestamp[us, UTC], one row per
    recovery point in time order unless said otherwise. Empty tables are shown as "no data"."""

    title: str  # e.g. the repository path
    generated: str  # ISO-8601 time of generation
    summary: list[tuple[str, str]]  # (label, formatted value) cards
    growth: pa.Table  # time, source, repository_stored_bytes, source_stored_bytes (cumulative)
    change_rate: pa.Table  # time, source, bytes_changed, bytes_per_hour (null: first point)
    ratios: pa.Table  # time, source, dedup_ratio, compression_ratio (nullable floats)
    # day (since the first point), time (optional: without it the x axis counts days),
    # stored_bytes (null when projected), projected_bytes (the fit), kind ("observed" or
    # "projected"; projected rows after the last point are the horizons)
    projection: pa.Table
    projection_fit: Mapping[str, object]  # slope_bytes_per_day, r2, points, warning (or None)
    # source, disk_bytes, bucket_offset, bucket_bytes, changes: one row per bucket; a row with
    # 0 changes and the disk size gives a disk that never changed its (all grey) strip
    hot_regions: pa.Table
    dir_growth: pa.Table  # folder_growth's top folders per source (``dirgrowth`` draws them)
    # a card's label -> a warning shown on that card (e.g. the fit's, on the growth card)
    card_warnings: Mapping[str, str] = field(default_factory=dict)


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "…"


# --- table access -----------------------------------------------------------------------------


def _columns(table: pa.Table, *names: str) -> list[list[Any]]:
    """Columns as Python lists; timestamps as float seconds since the epoch (UTC)."""
    out = []
    for name in names:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            us = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
            out.append([None if v is None else v / 1e6 for v in us])
        else:
            out.append(column.to_pylist())
    return out


def _source_colours(data: DashboardData) -> dict[str, str]:
    """One colour per source, the same in every chart (sources sorted by name)."""
    names: set[str] = set()
    for table in (data.growth, data.change_rate, data.ratios, data.hot_regions, data.dir_growth):
        if table.num_rows and "source" in table.column_names:
            names.update(str(v) for v in table.column("source").to_pylist() if v is not None)
    return {n: SOURCE_COLOURS[i % len(SOURCE_COLOURS)] for i, n in enumerate(sorted(names))}


# --- sections ---------------------------------------------------------------------------------


def _growth(table: pa.Table, colours: dict[str, str]) -> str:
    if table.num_rows == 0:
        return EMPTY
    cols = ("time", "source", "repository_stored_bytes", "source_stored_bytes")
    time, source, repository, own = _columns(table, *cols)
    total = points(time, repository)
    series = [Series("repository (all sources)", REPOSITORY_COLOUR, total, width_px=2.5)]
    series += [Series(n, colours[n], p) for n, p in points_by_key(source, time, own).items()]
    return figure(series, time_axis, bytes_axis)


def _change_rate(table: pa.Table, colours: dict[str, str]) -> str:
    if table.num_rows == 0:
        return EMPTY
    time, source, rate = _columns(table, "time", "source", "bytes_per_hour")
    by_source = points_by_key(source, time, rate).items()
    series = [Series(n, colours[n], p, width_px=1.5) for n, p in by_source]
    return figure(series, time_axis, lambda lo, hi: bytes_axis(lo, hi, "/h"))


def _ratios(table: pa.Table, colours: dict[str, str]) -> str:
    if table.num_rows == 0:
        return EMPTY
    cols = ("time", "source", "dedup_ratio", "compression_ratio")
    time, source, dedup, compression = _columns(table, *cols)
    panels: list[str] = []
    widest: list[Series] = []
    for heading, values in (("Dedup ratio", dedup), ("Compression ratio", compression)):
        series = [Series(n, colours[n], p) for n, p in points_by_key(source, time, values).items()]
        chart = figure(
            series,
            lambda lo, hi: time_axis(lo, hi, max_ticks=4),  # half a chart's width
            lambda lo, hi: linear_axis(min(lo, 1.0), hi, lambda v: f"{v:g}×", extend=True),
            (PANEL_WIDTH_PX, PANEL_HEIGHT_PX),
            with_legend=False,
        )
        panels.append(f"<div><h3>{heading}</h3>{chart}</div>")
        widest = series if len(series) > len(widest) else widest
    return legend(widest) + f'<div class="pair">{"".join(panels)}</div>'


_Horizon = tuple[float, float, float]  # x on the chart, projected bytes, days ahead


def _horizon_marks(plot: Plot, horizons: list[_Horizon], last_x: float, dated: bool) -> str:
    """The last backup as a dashed rule; each horizon as a ring labelled with its value (and
    its date on a time axis)."""
    x, (top, _, bottom, _) = plot.px(last_x), MARGIN_PX
    out = [
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{plot.height_px - bottom}" '
        f'class="rule"/><text x="{x + 4:.1f}" y="{top + 10}" class="halo">last backup</text>'
    ]
    for i, (hx_value, value, ahead_d) in enumerate(horizons):
        hx, hy = plot.px(hx_value), plot.py(value)
        # Each later horizon's label sits one line higher, so close horizons never overlap.
        ty = max(hy - 10 - 16 * i, top + 10)
        label = f"{utc_date(hx_value)} · " if dated else ""
        label += f"+{ahead_d:.0f} d: {format_bytes(value)}"
        # Left of the ring, unless (at about 6.6 px a character) it would run off the chart.
        tx, anchor = (hx - 8, "end") if hx - 8 > 6.6 * len(label) else (hx + 8, "start")
        out.append(
            f'<circle cx="{hx:.1f}" cy="{hy:.1f}" r="5" class="horizon" stroke="{FIT_COLOUR}"/>'
            f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" class="halo strong">'
            f"{label}</text>"
        )
    return "".join(out)


def _start(xs: list[Any], stored: list[Any], projected: list[Any]) -> float:
    """Where the projection starts: the last observed point, or without one the fit's first."""
    observed, line = points(xs, stored), points(xs, projected)
    return observed[-1][0] if observed else line[0][0] if line else 0.0


def _projection(table: pa.Table, fit: Mapping[str, object]) -> str:
    warning = fit.get("warning")
    banner = f'<div class="warning" role="alert">⚠ {esc(warning)}</div>' if warning else ""
    if table.num_rows == 0:
        return banner + EMPTY
    day, stored, projected, kind = _columns(table, "day", "stored_bytes", "projected_bytes", "kind")
    # Dates on the x axis when the table has them (rows without a time are then left out);
    # "days ahead" always comes from ``day``, so it is exact whatever the time zone or DST.
    dated = "time" in table.column_names and table.column("time").null_count < table.num_rows
    xs = _columns(table, "time")[0] if dated else day
    last_x, last_day = _start(xs, stored, projected), _start(day, stored, projected)
    horizons = sorted(
        (float(x), float(v), float(d) - last_day)
        for x, d, v, k in zip(xs, day, projected, kind, strict=True)
        if k == "projected" and is_point(x, v) and is_point(d, v) and d > last_day + 1e-9
    )
    series = [
        Series("observed", REPOSITORY_COLOUR, points(xs, stored), line=False),
        Series("linear fit", FIT_COLOUR, points(xs, projected), dashed=True),
    ]
    chart = figure(
        series,
        time_axis if dated else lambda lo, hi: linear_axis(lo, hi, "day {:g}".format, False),
        bytes_axis,
        overlay=lambda plot: _horizon_marks(plot, horizons, last_x, dated),
    )
    return banner + chart + _fit_facts(fit, horizons)


def _fit_facts(fit: Mapping[str, object], horizons: list[_Horizon]) -> str:
    def number(key: str) -> float | None:
        value = fit.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    slope, r2, fitted = number("slope_bytes_per_day"), number("r2"), fit.get("points")
    facts = [
        ("Growth", "n/a" if slope is None else f"{'+' * (slope >= 0)}{format_bytes(slope)}/day"),
        ("Fit r²", "n/a" if r2 is None else f"{r2:.3f}"),
        ("Points fitted", f"{fitted:,}" if isinstance(fitted, int) else "n/a"),
    ]
    facts += [(f"In {ahead_d:.0f} days", format_bytes(v)) for _, v, ahead_d in horizons]
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in facts)
    return f'<dl class="facts">{items}</dl>'


def _heat_rows(table: pa.Table) -> dict[str, tuple[int, list[tuple[int, int, int]]]]:
    """Per source: the disk size and its changed buckets (offset, bytes, changes), coolest
    first so that the hottest are drawn on top where narrow buckets overlap. A bucket with no
    changes is not drawn (the grey disk bar shows through), but its row's disk size gives a
    disk that never changed its strip."""
    names = ("source", "disk_bytes", "bucket_offset", "bucket_bytes", "changes")
    rows: dict[str, list[tuple[int, int, int]]] = {}
    disks: dict[str, int] = {}
    for source, disk, offset, size, changes in zip(*_columns(table, *names), strict=True):
        if source is None:
            continue
        if offset is not None and size and changes and changes > 0:
            rows.setdefault(source, []).append((offset, size, changes))
            disks[source] = max(disks.get(source, 0), disk or 0, offset + size)
        elif disk and disk > 0:  # without a size there is nothing to draw the strip to
            rows.setdefault(source, [])
            disks[source] = max(disks.get(source, 0), disk)
    return {s: (disks[s], sorted(r, key=lambda b: b[2])) for s, r in sorted(rows.items())}


def _heat_legend(top: int) -> str:
    if top < 1:  # no scale to show: every strip is grey
        return '<text x="10" y="16">no chunk changes yet; grey: never changed</text>'
    stops = "".join(
        f'<stop offset="{i / (len(HEAT_COLOURS) - 1):g}" stop-color="{c}"/>'
        for i, c in enumerate(HEAT_COLOURS)
    )
    mid = f'<text x="110" y="32" text-anchor="middle">{round(math.sqrt(top)):,}</text>'
    return (
        f'<defs><linearGradient id="heat-scale">{stops}</linearGradient></defs>'
        '<rect x="10" y="6" width="200" height="12" rx="2" fill="url(#heat-scale)"/>'
        f'<text x="10" y="32">1</text>{mid if top >= 9 else ""}'
        f'<text x="210" y="32" text-anchor="end">{top:,} (max)</text>'
        '<text x="222" y="16">chunk changes per bucket (log scale); grey: never changed</text>'
    )


def _heat_row(name: str, colour: str, disk: int, buckets: list[tuple[int, int, int]], top: int,
              y: int) -> str:  # fmt: skip
    left, right, bar_y, bar_h = 10, CHART_WIDTH_PX - 30, y + 22, _HEAT_BAR_PX
    scale, info = (right - left) / disk, f"{format_bytes(disk)} disk · "
    if buckets:
        hot = buckets[-1]
        info += f"{len(buckets):,} buckets changed · hottest at "
        info += f"{format_bytes(hot[0])} ({hot[2]:,} changes)"
    else:
        info += "never changed"
    parts = [
        f'<rect x="{left}" y="{y + 4}" width="10" height="10" rx="2" fill="{colour}"/>'
        f'<text x="{left + 16}" y="{y + 13}" class="name">{esc(_short(name))}'
        f'<title>{esc(name)}</title></text><text x="{right}" y="{y + 13}" text-anchor="end">'
        f'{info}</text><rect x="{left}" y="{bar_y}" width="{right - left}" height="{bar_h}" '
        f'class="disk"/><g class="buckets" data-series="{esc(name)}">'
    ]
    parts += [
        f'<rect x="{left + o * scale:.1f}" y="{bar_y}" width="{max(b * scale, 0.8):.2f}" '
        f'height="{bar_h}" fill="{log_colour(c, top, HEAT_COLOURS)}"/>'
        for o, b, c in buckets
    ]
    parts.append("</g>")
    for v, label in bytes_axis(0, disk, extend=False).ticks:
        x = left + v * scale
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y + bar_h}" y2="{bar_y + bar_h + 4}" '
            f'class="tick"/><text x="{x:.1f}" y="{bar_y + bar_h + 16}" text-anchor="middle">'
            f"{label}</text>"
        )
    return "".join(parts)


def _heat_strips(table: pa.Table, colours: dict[str, str]) -> str:
    rows = _heat_rows(table) if table.num_rows else {}
    if not rows:
        return EMPTY
    top = max((buckets[-1][2] for _, buckets in rows.values() if buckets), default=0)
    height = _HEAT_LEGEND_PX + _HEAT_ROW_PX * len(rows)
    parts = [f'<svg viewBox="0 0 {CHART_WIDTH_PX} {height}" role="img">', _heat_legend(top)]
    for i, (name, (disk, buckets)) in enumerate(rows.items()):
        y = _HEAT_LEGEND_PX + i * _HEAT_ROW_PX
        parts.append(_heat_row(name, colours[name], disk, buckets, top, y))
    return "".join(parts) + "</svg>"


# --- page -------------------------------------------------------------------------------------

# Nothing may be fetched: the page is one file, and data strings must never become requests.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_CSS = """
*{box-sizing:border-box} h2{margin:0;font-size:16px} h3{margin:8px 0 4px;font-size:13px}
body{margin:0;background:#f3f5f8;color:#1f2933;font:14px/1.45 system-ui,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif} main{max-width:1100px;margin:0 auto;padding:24px 24px 48px}
header{background:#1f2933;color:#fff;padding:20px 32px} header p{margin:4px 0 0;color:#cbd2d9}
header h1{margin:0;font-size:20px;font-weight:600;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:12px;
margin-bottom:20px} .card,section{background:#fff;border:1px solid #e1e6ec;border-radius:8px}
.card{padding:12px 16px} section{padding:16px 20px 18px;margin-bottom:20px}
.card .label{color:#616e7c;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:600;overflow-wrap:anywhere}
.caveat{margin:4px 0 0;color:#8d2b0b;font-size:12px;font-weight:600}
.note{margin:2px 0 12px;color:#616e7c} .pair{display:grid;grid-template-columns:1fr 1fr;gap:20px}
.legend{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 6px;padding:0;list-style:none;
font-size:12px;overflow-wrap:anywhere}
.legend i{display:inline-block;width:16px;height:4px;border-radius:2px;margin-right:6px;
vertical-align:middle} svg{display:block;width:100%;height:auto}
svg text{font-size:11px;fill:#616e7c} svg text.name,svg text.strong{fill:#1f2933;font-weight:600}
.grid line{stroke:#e8ecf1} line.tick{stroke:#9aa5b1} .rule{stroke:#9aa5b1;stroke-dasharray:3 3}
.horizon{fill:#fff;stroke-width:2} .disk{fill:#e4e7eb}
.halo{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.empty{color:#7b8794;font-style:italic;text-align:center;padding:28px 0;margin:0}
.warning{background:#fff8e6;border:1px solid #f7c948;border-left:5px solid #de911d;
border-radius:6px;padding:10px 14px;margin:0 0 12px;color:#8d2b0b;font-weight:600}
.facts{display:flex;flex-wrap:wrap;gap:8px 32px;margin:10px 0 0}
.facts dt{color:#616e7c;font-size:12px} .facts dd{margin:0;font-weight:600;font-size:15px}
"""
_SECTIONS = (
    ("growth", "Repository growth", "Stored bytes after each recovery point: the whole "
     "repository (dark line) and the bytes each source has added."),
    ("change-rate", "Change rate", "Bytes changed per hour between consecutive recovery points "
     "of each source."),
    ("ratios", "Space savings", "Deduplication and compression ratio of each recovery point; "
     "higher is better, 1× saves nothing."),
    ("projection", "Growth projection", "A linear fit of the repository's stored bytes, extended "
     "one year past the last recovery point."),
    ("hot-regions", "Hot regions", "Where each disk changes: a bar spans the whole disk, and each "
     "bucket is coloured by how many chunk changes fell into it over the whole history."),
    DIR_GROWTH_SECTION,
)  # fmt: skip


def _when(generated: str) -> str:
    try:
        moment = datetime.fromisoformat(generated)
    except ValueError:
        return generated  # shown as given: an odd time string is not worth failing the page
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def render_dashboard(data: DashboardData) -> str:
    """The whole HTML document."""
    colours = _source_colours(data)
    bodies = (
        _growth(data.growth, colours),
        _change_rate(data.change_rate, colours),
        _ratios(data.ratios, colours),
        _projection(data.projection, data.projection_fit),
        _heat_strips(data.hot_regions, colours),
        dir_growth(data.dir_growth, colours),
    )
    sections = "".join(
        f'<section id="{key}"><h2>{heading}</h2><p class="note">{note}</p>{body}</section>\n'
        for (key, heading, note), body in zip(_SECTIONS, bodies, strict=True)
    )
    warn = {
        k: f'<p class="caveat" role="note">⚠ {esc(v)}</p>' for k, v in data.card_warnings.items()
    }
    cards = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div>'
        f'<div class="value">{esc(value)}</div>{warn.get(label, "")}</div>'
        for label, value in data.summary
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>comb · {esc(data.title)}</title><style>{_CSS}</style></head>\n<body><header>"
        f"<h1>{esc(data.title)}</h1><p>Backup history · generated {esc(_when(data.generated))}"
        f'</p></header>\n<main><div class="cards">{cards}</div>\n{sections}</main></body></html>\n'
    )
