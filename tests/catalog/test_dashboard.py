"""The history dashboard: self-contained, escaped, one chart per section, and a real render
(the directory-growth chart from real backups of a real ext4 image changed with debugfs)."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from combtest import TEST_PASSWORD, CliRunner, need_tool
from dashtest import (
    CHANGE,
    DAY_US,
    DIR_GROWTH,
    GROWTH,
    HORIZONS_D,
    HOSTILE,
    HOT,
    PROJECTION,
    T0_US,
    TS,
    GiB,
    dash_data,
    dash_table,
)
from fsimages import ext4_image

from catalog.analytics.catalog import Catalog
from catalog.analytics.dashboard.data import GROWTH_CARD, dashboard_data
from catalog.analytics.dashboard.dirgrowth import DIR_GROWTH_TOP, NO_CATALOG, NO_GROWTH
from catalog.analytics.dashboard.render import (
    HEAT_COLOURS,
    DashboardData,
    render_dashboard,
)
from catalog.repo import Repository
from catalog.store.points import PointStats, RecoveryPoint, commit_point
from catalog.units import format_bytes


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


def _bars(page: _Page) -> dict[str, list[tuple[str, int]]]:
    """The directory-growth bars per source: (folder, grown bytes), top to bottom."""
    out: dict[str, list[tuple[str, int]]] = {}
    source = ""
    for tag, attrs in page.sections["dir-growth"]:
        if tag == "g" and attrs.get("class") == "bars":
            source = attrs["data-series"]
            out[source] = []
        elif tag == "g" and attrs.get("class") == "bar":
            out[source].append((attrs["data-folder"], int(attrs["data-grown"])))
    return out


def test_page_is_self_contained_and_escapes_every_data_string() -> None:
    text = render_dashboard(dash_data())
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
    data = dash_data(sources=3, points=40)
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
    grew = [r for r in data.dir_growth.to_pylist() if r["grown_bytes"] > 0]
    top = {
        s: sorted(((r["folder"], r["grown_bytes"]) for r in grew if r["source"] == s),
                  key=lambda r: -r[1])[:DIR_GROWTH_TOP]
        for s in ("web00", HOSTILE, "web02")
    }  # fmt: skip
    assert _bars(page) == top and all(len(b) == DIR_GROWTH_TOP for b in top.values())
    assert all(page.count(s, "svg") >= 1 for s in page.sections)


def test_projection_shows_fit_and_horizons() -> None:
    data = dash_data()
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
    data = dash_data()
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
    data = dash_data()
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
    hot = dash_table(HOT, [
        ("busy", disk, 0, bucket, 0), ("busy", disk, bucket, bucket, 3),
        ("busy", disk, 2 * bucket, bucket, 12), ("idle", disk, 0, bucket, 0),
        ("sizeless", None, 0, bucket, 0),  # no disk size: no strip to draw
    ])  # fmt: skip
    data = dataclasses.replace(dash_data(sources=1), hot_regions=hot)
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
    assert 'class="warning"' not in render_dashboard(dash_data())
    text = render_dashboard(dash_data(warning="only <3> points & a gap"))
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
        dir_growth=DIR_GROWTH.empty_table(),
    )
    text = render_dashboard(empty)
    page = _Page(text)
    assert text.count("No data yet.") == 5 == len(page.sections) - 1
    assert text.count(NO_CATALOG) == 1  # the directory-growth section: no file catalog
    assert "<svg" not in text and "generated not a time" in "".join(page.text)
    shrank = dash_table(
        DIR_GROWTH, [("a", "/disk/tmp", -5, 10, 5, -1), ("a", "/disk/x", 0, 1, 1, 0)]
    )
    assert NO_GROWTH in render_dashboard(dataclasses.replace(empty, dir_growth=shrank))


def test_single_point_and_null_values() -> None:
    data = dash_data(sources=1, points=1, buckets=1)
    page = _Page(render_dashboard(data))
    (line,) = page.marks("growth", "polyline", "line")["repository (all sources)"]
    assert _npoints(line) == 1
    assert page.marks("growth", "path", "dots")["repository (all sources)"][0]["d"].count("M") == 1
    assert "No data yet." in "".join(page.text)  # the only rate is null: nothing to draw
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", t) for t in page.text)  # a dated x axis
    assert "nan" not in " ".join(a.get("points", "") + a.get("d", "") for _, a in page.tags)


def test_long_history_ticks_at_month_starts() -> None:
    page = _Page(render_dashboard(dash_data(sources=2, points=200, step_us=5 * DAY_US)))
    dates = [t for t in page.text if re.fullmatch(r"\d{4}-\d\d-\d\d", t)]
    assert len(dates) >= 4 and all(d.endswith("-01") for d in dates)


@pytest.mark.parametrize(
    ("step_s", "clock"), [(1, r"\d\d:\d\d:\d\d"), (60, r"\d\d:\d\d"), (3600, r"\d\d:\d\d")]
)
def test_a_history_of_seconds_minutes_or_hours_spans_the_time_axis(step_s: int, clock: str) -> None:
    """Backups seconds apart (what a real run of backups makes) are spread across the plot, not
    drawn as one vertical line; the ticks step in seconds, minutes or hours, the first with
    its date ("Nov 14 22:14"), and no two read the same."""
    text = render_dashboard(dash_data(sources=1, points=6, step_us=step_s * 1_000_000))
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
    data = dash_data(sources=10, points=1000, buckets=1024)
    text = render_dashboard(data)
    assert len(text.encode()) < 2_000_000
    page = _Page(text)
    lines = page.marks("growth", "polyline", "line")
    assert len(lines) == 11 and _npoints(lines["web00"][0]) == 1000


def test_dense_series_is_thinned_but_keeps_its_extremes() -> None:
    n = 50_000
    values = [1 << 30] * n
    values[n // 2] = 5 << 30  # one spike among 50,000 points
    growth = dash_table(GROWTH, [(T0_US + k * 60_000_000, "a", v, v) for k, v in enumerate(values)])
    page = _Page(render_dashboard(dataclasses.replace(dash_data(sources=1), growth=growth)))
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


# --- the directory-growth chart from real backups ---------------------------------------------


def _backup(cli: CliRunner, repo: Path, image: Path, *more: str) -> dict:
    got = cli("-r", repo, "backup", image, "--source-name", "web", "--json", *more)
    assert got.code == 0, got.err
    return json.loads(got.out.splitlines()[-1])


def _real_dashboard(repo: Path) -> _Page:
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    return _Page(render_dashboard(dashboard_data(Catalog.open(r.storage, r.points()), "repo")))


def test_directory_growth_from_real_backups(cli: CliRunner, tmp_path: Path) -> None:
    """An ext4 image (mkfs.ext4 -d) backed up without a file catalog, then with one; debugfs
    grows /home/ann by a 200,000-byte file and /srv/www by a 5,000-byte one and empties
    /var/log; backed up again. The chart draws exactly the two folders that grew, by the bytes
    written, measured from the first point with a catalog (not from the one without)."""
    tree = tmp_path / "tree"
    for d in ("etc", "home/ann", "srv/www", "var/log"):
        (tree / d).mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (tree / "home" / "ann" / "notes.txt").write_text("notes\n")
    (tree / "srv" / "www" / "index.html").write_text("<h1>hi</h1>\n")
    (tree / "var" / "log" / "syslog").write_bytes(os.urandom(300_000))
    image = ext4_image(tree, tmp_path / "disk.img")
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    _backup(cli, repo, image, "--no-files")
    page = _real_dashboard(repo)
    assert "".join(page.text).count("No recovery point has a file catalog") == 1
    assert page.count("dir-growth", "svg") == 0 and page.count("dir-growth", "p") == 2  # + note
    _backup(cli, repo, image)
    big, small = tmp_path / "big.bin", tmp_path / "new.html"
    big.write_bytes(os.urandom(200_000))
    small.write_bytes(b"x" * 5_000)
    for request in (
        f"write {big} /home/ann/big.bin",
        f"write {small} /srv/www/new.html",
        "rm /var/log/syslog",
    ):
        subprocess.run([need_tool("debugfs"), "-w", "-R", request, image], check=True,
                       capture_output=True)  # fmt: skip
    _backup(cli, repo, image)
    page = _real_dashboard(repo)
    assert _bars(page) == {"web": [("/disk/home/ann", 200_000), ("/disk/srv/www", 5_000)]}
    text = "".join(page.text)
    assert f"+{format_bytes(200_000)} · {format_bytes(6)} → {format_bytes(200_006)}" in text
    assert f"+{format_bytes(5_000)} · {format_bytes(12)} → {format_bytes(5_012)}" in text
    assert "/disk/var/log" not in text  # it shrank
    # The named report runs the same query: the same folders, by the same bytes.
    rows = json.loads(cli("-r", repo, "report", "file-growth", "--json").out)["rows"]
    assert [(r["folder"], r["grown_bytes"]) for r in rows if r["grown_bytes"] > 0] == [
        ("/disk/home/ann", 200_000), ("/disk/srv/www", 5_000),
    ]  # fmt: skip
