"""The dashboard's "Directories that grew most" section: per source, a bar per folder of the bytes
its files grew over the history shown, labelled with the growth and the sizes before and now.

Owns this section's heading, note and SVG (bars on a bytes axis shared by every source, from
``catalog.analytics.dashboard.svgchart``). It must not read the repository or compute analytics:
the caller hands it the ``folder_growth`` table (``catalog.analytics.file_reports``). Like the
rest of the page, it references nothing outside the file and escapes every data string (folder
names come from the guests' filesystems).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.analytics.dashboard.svgchart import CHART_WIDTH_PX, bytes_axis, esc
from catalog.units import format_bytes

DIR_GROWTH_TOP = 10  # folders drawn per source
DIR_GROWTH_SECTION = (
    "dir-growth",
    "Directories that grew most",
    f"Per source, the {DIR_GROWTH_TOP} folders (two levels below each volume) whose files grew "
    "most from its first to its last recovery point with a file catalog.",
)
NO_CATALOG = (
    '<p class="empty">No recovery point has a file catalog (<code>comb index --all</code> '
    "builds them).</p>"
)
NO_GROWTH = '<p class="empty">No folder grew over the history shown.</p>'

_LABEL_PX, _VALUE_PX, _HEAD_PX, _BAR_PX, _AXIS_PX = 330, 250, 24, 20, 26
_FOLDER_CHARS = 48  # longer folder names keep their end (the tooltip has them whole)

_Row = tuple[str, int, int, int, int]  # folder, grown bytes, bytes before, bytes now, files


def _folder(name: str) -> str:
    return name if len(name) <= _FOLDER_CHARS else "…" + name[-(_FOLDER_CHARS - 1) :]


def _rows(table: pa.Table) -> dict[str, list[_Row]]:
    """Every source of the table, with its folders that grew, most first (at most
    ``DIR_GROWTH_TOP``)."""
    names = ("source", "folder", "grown_bytes", "bytes_before", "bytes_now", "grown_files")
    out: dict[str, list[_Row]] = {}
    columns = [table.column(n).to_pylist() for n in names]
    for source, folder, grown, before, now, files in zip(*columns, strict=True):
        if source is None:
            continue
        rows = out.setdefault(str(source), [])
        if folder is not None and grown is not None and grown > 0:
            rows.append((str(folder), grown, before or 0, now or 0, files or 0))
    return {
        s: sorted(r, key=lambda r: (-r[1], r[0]))[:DIR_GROWTH_TOP] for s, r in sorted(out.items())
    }


def _block(source: str, colour: str, rows: list[_Row], top: int, y: int) -> str:
    left, right = _LABEL_PX, CHART_WIDTH_PX - _VALUE_PX
    scale = (right - left) / top
    info = f"{len(rows)} folders grew" if rows else "no folder grew"
    parts = [
        f'<rect x="10" y="{y + 6}" width="10" height="10" rx="2" fill="{colour}"/>'
        f'<text x="26" y="{y + 15}" class="name">{esc(source)}</text>'
        f'<text x="{CHART_WIDTH_PX - 10}" y="{y + 15}" text-anchor="end">{info}</text>'
        f'<g class="bars" data-series="{esc(source)}">'
    ]
    for i, (folder, grown, before, now, files) in enumerate(rows):
        by = y + _HEAD_PX + i * _BAR_PX
        value = f"+{format_bytes(grown)} · {format_bytes(before)} → {format_bytes(now)}"
        whole = f"{folder}: {value} ({files:+,} files)"
        parts.append(
            f'<g class="bar" data-folder="{esc(folder)}" data-grown="{grown}"><title>'
            f'{esc(whole)}</title><text x="{left - 8}" y="{by + 13}" text-anchor="end" '
            f'class="name">{esc(_folder(folder))}</text><rect x="{left}" y="{by + 3}" '
            f'width="{max(grown * scale, 1.0):.1f}" height="{_BAR_PX - 6}" fill="{colour}"/>'
            f'<text x="{left + grown * scale + 6:.1f}" y="{by + 13}">{esc(value)}</text></g>'
        )
    parts.append("</g>")
    axis_y = y + _HEAD_PX + len(rows) * _BAR_PX
    if rows:
        for v, label in bytes_axis(0, top).ticks:
            x = left + v * scale
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 4}" class="tick"/>'
                f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{esc(label)}</text>'
            )
    return "".join(parts)


def dir_growth(table: pa.Table, colours: dict[str, str]) -> str:
    """The section's body: a one-line message when no point has a catalog (an empty table) or
    no folder grew, else a block of bars per source, all on one scale."""
    blocks = _rows(table) if table.num_rows else {}
    if not blocks:
        return NO_CATALOG
    grown = [r[1] for rows in blocks.values() for r in rows]
    if not grown:
        return NO_GROWTH
    top = int(bytes_axis(0, max(grown)).hi)  # the axis' last round tick: the bars' full width
    parts, y = [], 0
    for source, rows in blocks.items():
        parts.append(_block(source, colours.get(source, "#4e79a7"), rows, top, y))
        y += _HEAD_PX + len(rows) * _BAR_PX + (_AXIS_PX if rows else 0) + 8
    return f'<svg viewBox="0 0 {CHART_WIDTH_PX} {y}" role="img">{"".join(parts)}</svg>'
