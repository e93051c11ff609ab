"""The history dashboard: self-contained, escaped, one chart per section, and a real render."""

from __future__ import annotations

import dataclasses
import html
import random
import re
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from combtest import TEST_PASSWORD, need_tool

from catalog.analytics.catalog import Catalog
from catalog.analytics.dashboard.data import GROWTH_CARD, dashboard_data
from catalog.analytics.dashboard.render import (
    FIT_COLOUR,
    HEAT_COLOURS,
    SOURCE_COLOURS,
    DashboardData,
    render_dashboard,
)
from catalog.repo import Repository
from catalog.store.points import PointStats, RecoveryPoint, commit_point
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
HORIZONS_D = (30, 90, 365)


def _table(schema: pa.Schema, rows: Sequence[tuple[object, ...]]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)


def _data(
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
        growth=_table(GROWTH, growth),
        change_rate=_table(CHANGE, change),
        ratios=_table(RATIOS, ratios),
        projection=_table(PROJECTION, dated),
        projection_fit=fit,
        hot_regions=_table(HOT, hot),
    )


class _Page(HTMLParser):
    """The elements of each section in document order (end tags as "/tag"), and all text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.section = ""
        self.sections: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = (tag, {k: v or "" for k, v in attrs})
        self.tags.append(element)
        if tag == "section":
            self.section = element[1]["id"]
            self.sections[self.section] = []
        elif self.section:
            self.sections[self.section].append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = ""
        elif self.section:
            self.sections[self.section].append(("/" + tag, {}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def marks(self, section: str, tag: str, cls: str) -> dict[str, list[dict[str, str]]]:
        """Elements of one tag and class in a section, by their data-series."""
        out: dict[str, list[dict[str, str]]] = {}
        for t, attrs in self.sections[section]:
            if t == tag and attrs.get("class") == cls:
                out.setdefault(attrs.get("data-series", ""), []).append(attrs)
        return out

    def count(self, section: str, tag: str) -> int:
        return sum(t == tag for t, _ in self.sections[section])


def _npoints(attrs: dict[str, str]) -> int:
    return len(attrs["points"].split())


def _heat_rects(page: _Page) -> dict[str, int]:
    """Bucket rects per source: the rects inside each <g class="buckets">."""
    out: dict[str, int] = {}
    source = None
    for tag, attrs in page.sections["hot-regions"]:
        if tag == "g" and attrs.get("class") == "buckets":
            source = attrs["data-series"]
            out[source] = 0
        elif tag == "/g":
            source = None
        elif tag == "rect" and source is not None:
            out[source] += 1
    return out


def test_page_is_self_contained_and_escapes_every_data_string() -> None:
    text = render_dashboard(_data())
    page = _Page(text)
    assert "http://" not in text and "https://" not in text
    assert not [a for _, a in page.tags if {"src", "href", "xlink:href"} & a.keys()]
    assert "script" not in [t for t, _ in page.tags]
    assert re.findall(r"url\((.)", text) == ["#"]  # only the heat gradient, in the page itself
    assert "<script>alert" not in text and "<repo>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;q&quot;" in text
    # Escaped once, not twice: the browser shows the names exactly.
    assert HOSTILE in page.text and "/backup/<repo> & co" in page.text
    assert "generated 2024-05-01 12:00 UTC" in "".join(page.text)


def test_each_chart_draws_every_point() -> None:
    data = _data(sources=3, points=40)
    page = _Page(render_dashboard(data))
    growth = page.marks("growth", "polyline", "line")
    assert {k: [_npoints(a) for a in v] for k, v in growth.items()} == {
        "repository (all sources)": [120], "web00": [40], HOSTILE: [40], "web02": [40],
    }  # fmt: skip
    rates = page.marks("change-rate", "polyline", "line")  # a first point has no rate
    assert {k: [_npoints(a) for a in v] for k, v in rates.items()} == {
        "web00": [39], HOSTILE: [39], "web02": [39],
    }  # fmt: skip
    assert page.count("ratios", "svg") == 2
    ratios = page.marks("ratios", "polyline", "line")
    assert sorted((k, [_npoints(a) for a in v]) for k, v in ratios.items()) == sorted(
        (k, [40, 40]) for k in ("web00", HOSTILE, "web02")
    )
    observed = page.marks("projection", "path", "dots")["observed"][0]
    assert observed["d"].count("M") == 120
    fit = page.marks("projection", "polyline", "line")["linear fit"][0]
    assert _npoints(fit) == data.projection.num_rows == 125
    assert len(page.marks("projection", "circle", "horizon")[""]) == 3
    hot = data.hot_regions.group_by("source").aggregate([("changes", "count")]).to_pylist()
    assert _heat_rects(page) == {r["source"]: r["changes_count"] for r in hot}
    assert all(page.count(s, "svg") >= 1 for s in page.sections)


def test_projection_shows_fit_and_horizons() -> None:
    data = _data()
    text = render_dashboard(data)
    rows = data.projection.filter(pc.equal(data.projection["kind"], "projected"))
    observed = data.projection.filter(pc.equal(data.projection["kind"], "observed"))
    last = pc.max(observed["day"]).as_py()
    days, values = rows["day"].to_pylist(), rows["projected_bytes"].to_pylist()
    horizons = {round(d - last): v for d, v in zip(days, values, strict=True) if d > last}
    assert sorted(horizons) == list(HORIZONS_D)
    for ahead, value in horizons.items():
        assert f"+{ahead} d: {format_bytes(value)}" in text  # on the chart
        assert f"<dt>In {ahead} days</dt><dd>{format_bytes(value)}</dd>" in text
    assert "<dt>Fit r²</dt><dd>0.988</dd>" in text


def _horizon_labels(page: _Page) -> list[str]:
    """The texts next to the horizon rings on the projection chart, in horizon order."""
    return [t for t in page.text if re.search(r"\+\d+ d: ", t)]


def test_projection_x_axis_shows_dates() -> None:
    data = _data()
    page = _Page(render_dashboard(data))
    observed = data.projection.filter(pc.equal(data.projection["kind"], "observed"))
    last = pc.max(observed["time"]).as_py()
    labels = _horizon_labels(page)
    assert len(labels) == len(HORIZONS_D)
    for ahead, label in zip(HORIZONS_D, labels, strict=True):
        when = datetime.fromtimestamp(last.timestamp() + ahead * 86400, UTC)
        assert label.startswith(f"{when:%Y-%m-%d} · +{ahead} d: "), label
    assert labels[-1].startswith("2024-12-")  # 365 days after 2023-12-23
    # The axis: month starts from the first point to about a year past the last.
    ticks = [t for t in page.text if re.fullmatch(r"\d{4}-\d\d-01", t)]
    assert len(ticks) >= 4 and ticks[-1] >= "2024-10-01" and ticks[0] <= "2024-01-01"


def test_projection_without_time_counts_days() -> None:
    data = _data()
    undated = dataclasses.replace(data, projection=data.projection.drop_columns(["time"]))
    page = _Page(render_dashboard(undated))
    labels = _horizon_labels(page)
    assert [label.split(":")[0] for label in labels] == [f"+{h} d" for h in HORIZONS_D]
    assert "day 0" in page.text and "day 400" in page.text  # the x axis counts days
    # A time column of nulls only is no time axis either.
    nulls = data.projection.set_column(1, "time", pa.nulls(data.projection.num_rows, TS))
    page = _Page(render_dashboard(dataclasses.replace(data, projection=nulls)))
    assert [label.split(":")[0] for label in _horizon_labels(page)] == ["+30 d", "+90 d", "+365 d"]


def test_buckets_without_changes_stay_grey() -> None:
    disk = 8 * GiB
    bucket = disk // 4
    hot = _table(HOT, [
        ("busy", disk, 0, bucket, 0), ("busy", disk, bucket, bucket, 3),
        ("busy", disk, 2 * bucket, bucket, 12), ("idle", disk, 0, bucket, 0),
        ("sizeless", None, 0, bucket, 0),  # no disk size: no strip to draw
    ])  # fmt: skip
    data = dataclasses.replace(_data(sources=1), hot_regions=hot)
    text = render_dashboard(data)
    page = _Page(text)
    # Only changed buckets are drawn; the rest is the grey disk bar showing through.
    assert _heat_rects(page) == {"busy": 2, "idle": 0}
    # Those two, a swatch and a disk bar per strip, and the legend's scale.
    assert page.count("hot-regions", "rect") == 2 + 2 * 2 + 1
    fills = [a["fill"] for t, a in page.sections["hot-regions"] if t == "rect" and "fill" in a]
    assert HEAT_COLOURS[-1] in fills and "#e4e7eb" not in fills
    assert "12 (max)" in text and "0 (max)" not in text  # the scale ignores unchanged buckets
    assert "8.00 GiB disk · never changed" in text
    assert "8.00 GiB disk · 2 buckets changed · hottest at 4.00 GiB (12 changes)" in text
    # Nothing changed anywhere: grey strips, and a legend without a scale.
    still = hot.filter(pc.equal(hot["changes"], 0))
    page = _Page(render_dashboard(dataclasses.replace(data, hot_regions=still)))
    assert _heat_rects(page) == {"busy": 0, "idle": 0}
    assert "(max)" not in "".join(page.text) and "no chunk changes yet" in "".join(page.text)


def test_warning_banner_only_when_the_fit_has_a_warning() -> None:
    assert 'class="warning"' not in render_dashboard(_data())
    text = render_dashboard(_data(warning="only <3> points & a gap"))
    assert text.count('class="warning"') == 1
    assert "only &lt;3&gt; points &amp; a gap" in text


def test_empty_tables_show_no_data() -> None:
    empty = DashboardData(
        title="repo",
        generated="not a time",
        summary=[],
        growth=GROWTH.empty_table(),
        change_rate=CHANGE.empty_table(),
        ratios=pa.table({}),  # not even columns
        projection=PROJECTION.empty_table(),
        projection_fit={"slope_bytes_per_day": None, "r2": None, "points": 0, "warning": None},
        hot_regions=HOT.empty_table(),
    )
    text = render_dashboard(empty)
    page = _Page(text)
    assert text.count("No data yet.") == 5 == len(page.sections)
    assert "<svg" not in text and "generated not a time" in "".join(page.text)


def test_single_point_and_null_values() -> None:
    data = _data(sources=1, points=1, buckets=1)
    page = _Page(render_dashboard(data))
    (line,) = page.marks("growth", "polyline", "line")["repository (all sources)"]
    assert _npoints(line) == 1
    assert page.marks("growth", "path", "dots")["repository (all sources)"][0]["d"].count("M") == 1
    assert "No data yet." in "".join(page.text)  # the only rate is null: nothing to draw
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", t) for t in page.text)  # a dated x axis
    assert "nan" not in " ".join(a.get("points", "") + a.get("d", "") for _, a in page.tags)


def test_long_history_ticks_at_month_starts() -> None:
    page = _Page(render_dashboard(_data(sources=2, points=200, step_us=5 * DAY_US)))
    dates = [t for t in page.text if re.fullmatch(r"\d{4}-\d\d-\d\d", t)]
    assert len(dates) >= 4 and all(d.endswith("-01") for d in dates)


@pytest.mark.parametrize(
    ("step_s", "clock"), [(1, r"\d\d:\d\d:\d\d"), (60, r"\d\d:\d\d"), (3600, r"\d\d:\d\d")]
)
def test_a_history_of_seconds_minutes_or_hours_spans_the_time_axis(step_s: int, clock: str) -> None:
    """Backups seconds apart (what a real run of backups makes) are spread across the plot, not
    drawn as one vertical line; the ticks step in seconds, minutes or hours, the first with
    its date ("Nov 14 22:14"), and no two read the same."""
    text = render_dashboard(_data(sources=1, points=6, step_us=step_s * 1_000_000))
    for section, name in (("growth", "web00"), ("change-rate", "web00")):
        (line,) = _Page(text).marks(section, "polyline", "line")[name]
        xs = [float(p.split(",")[0]) for p in line["points"].split()]
        assert xs == sorted(set(xs)) and xs[0] < 100 and xs[-1] > 900  # margin to margin
        svg = text.split(f'id="{section}"')[1].split("</svg>")[0]
        ticks = re.findall(r'text-anchor="middle">([^<]*)<', svg)
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
        assert re.fullmatch(r"[A-Z][a-z]{2} \d\d " + clock, ticks[0]), ticks
        assert all(re.fullmatch(f"([A-Z][a-z]{{2}} \\d\\d )?{clock}", t) for t in ticks), ticks


def _history(tmp_path: Path, step: timedelta, n: int) -> DashboardData:
    """The dashboard of ``n`` backups ``step`` apart, each storing 1 MiB (documents only)."""
    repo = Repository.init(str(tmp_path / f"r{n}"), 65536, 3, password=TEST_PASSWORD)
    for k in range(n):
        when = datetime(2026, 3, 1, tzinfo=UTC) + k * step
        stats = PointStats(bytes_read=1 << 21, bytes_stored=1 << 20, seconds=1.0)
        commit_point(repo.storage, RecoveryPoint(
            "vm", "/dev/null", when.isoformat(), 1 << 30, 65536, 16, "0" * 64, None, None, None,
            "local", "full", stats=stats))  # fmt: skip
    return dashboard_data(Catalog.open(repo.storage, repo.points()), "repo")


def test_growth_card_carries_the_projections_warning(tmp_path: Path) -> None:
    short = _history(tmp_path, timedelta(minutes=2), 5)  # minutes of history, a year ahead
    warning = str(short.projection_fit["warning"])
    assert "the history spans" in warning and short.card_warnings == {GROWTH_CARD: warning}
    text = render_dashboard(short)
    row = html.unescape(text.split('<div class="cards">')[1].split("\n")[0])
    cards = row.split('<div class="card">')[1:]
    value = dict(short.summary)[GROWTH_CARD]
    assert [c for c in cards if 'class="caveat"' in c] == [
        f'<div class="label">{GROWTH_CARD}</div><div class="value">{value}</div>'
        f'<p class="caveat" role="note">⚠ {warning}</p></div>'
    ]
    assert text.count("⚠ " + html.escape(warning)) == 2  # the card and the projection's banner
    long = _history(tmp_path, timedelta(days=1), 40)  # a steady line over 40 days
    assert long.projection_fit["warning"] is None and long.card_warnings == {}
    assert 'class="caveat"' not in render_dashboard(long)


def test_big_history_stays_small() -> None:
    data = _data(sources=10, points=1000, buckets=1024)
    text = render_dashboard(data)
    assert len(text.encode()) < 2_000_000
    page = _Page(text)
    lines = page.marks("growth", "polyline", "line")
    assert len(lines) == 11 and _npoints(lines["web00"][0]) == 1000


def test_dense_series_is_thinned_but_keeps_its_extremes() -> None:
    n = 50_000
    values = [1 << 30] * n
    values[n // 2] = 5 << 30  # one spike among 50,000 points
    growth = _table(GROWTH, [(T0_US + k * 60_000_000, "a", v, v) for k, v in enumerate(values)])
    page = _Page(render_dashboard(dataclasses.replace(_data(sources=1), growth=growth)))
    (line,) = page.marks("growth", "polyline", "line")["repository (all sources)"]
    ys = [float(p.split(",")[1]) for p in line["points"].split()]
    assert len(ys) <= 4 * 960 < n
    assert min(ys) < max(ys) - 100  # the spike is still drawn


def test_format_bytes() -> None:
    """The one byte formatter (``catalog.units``): three significant digits on the dashboard,
    one decimal in the commands' output (``pipeline.console.human_bytes``)."""
    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(100 * GiB) == "100 GiB"
    assert format_bytes(-3 * GiB // 2) == "-1.50 GiB" and format_bytes(5 << 40) == "5.00 TiB"
    assert format_bytes(1023, decimals=1) == "1023 B" and format_bytes(-5, decimals=1) == "-5 B"
    assert format_bytes(1536, decimals=1) == "1.5 KiB"
    assert format_bytes(100 * GiB, decimals=1) == "100.0 GiB"
    assert format_bytes(-3 * GiB // 2, decimals=1) == "-1.5 GiB"


# --- a real browser ---------------------------------------------------------------------------


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    if kind == 0:
        return line
    if kind == 2:  # the most common filter: a fast path
        return bytearray((x + y) & 255 for x, y in zip(line, prev, strict=True))
    for i in range(len(line)):
        a = line[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            predicted = a
        elif kind == 3:
            predicted = (a + b) // 2
        else:  # 4, Paeth
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predicted = a if pa <= pb and pa <= pc else b if pb <= pc else c
        line[i] = (line[i] + predicted) & 255
    return line


def _decode_png(data: bytes) -> tuple[int, int, Counter[bytes]]:
    """Width, height and pixel counts by RGB of an 8-bit RGB(A) PNG, with the stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body, pos = data[pos + 8 : pos + 8 + length], pos + 12 + length
        if kind == b"IHDR":
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    bpp, raw = 3 if colour_type == 2 else 4, zlib.decompress(b"".join(idat))
    stride, prev, pixels = width * bpp, bytearray(width * bpp), Counter[bytes]()
    for y in range(height):
        start = y * (stride + 1)
        prev = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), prev, bpp)
        row = bytes(prev)
        pixels.update(row[i : i + 3] for i in range(0, stride, bpp))
    return width, height, pixels


def _near(pixels: Counter[bytes], colour: str, tolerance: int = 8) -> int:
    want = bytes.fromhex(colour[1:])
    return sum(
        n
        for rgb, n in pixels.items()
        if all(abs(a - b) <= tolerance for a, b in zip(rgb, want, strict=True))
    )


def test_renders_in_chromium(tmp_path: Path) -> None:
    chromium = need_tool("chromium")
    page = tmp_path / "dashboard.html"
    page.write_text(render_dashboard(_data(warning="a short history")), encoding="utf-8")
    shot = tmp_path / "dashboard.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync"]  # fmt: skip
    # One launch: the screenshot, the DOM as parsed, and the console (every console line is a
    # problem: the page has no script, so only a blocked load or a parse error can log).
    result = subprocess.run(
        [chromium, *flags, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []
    assert result.stdout.count("<svg") == 6 and "<script" not in result.stdout
    width, height, pixels = _decode_png(shot.read_bytes())
    assert (width, height) == (1280, 2400)
    assert len(pixels) > 500  # charts, text and antialiasing, not a blank page
    assert pixels.most_common(1)[0][1] < 0.8 * width * height
    # The series colours are drawn, well beyond their legend swatches (3 x 64 pixels).
    for colour in SOURCE_COLOURS[:3]:
        assert _near(pixels, colour) > 1000, colour
    assert _near(pixels, FIT_COLOUR) > 300
    assert _near(pixels, "#e4e7eb") > 20_000  # the heat strips' disk bars
    assert sum(_near(pixels, c, 24) for c in HEAT_COLOURS) > 10_000  # and their buckets
