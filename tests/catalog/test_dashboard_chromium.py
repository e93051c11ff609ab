"""The dashboard as a browser draws it: headless Chromium renders the page (no console line),
and the screenshot holds the series, fit and heat colours."""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

from combtest import need_tool
from dashtest import dash_data

from catalog.analytics.dashboard.dirgrowth import DIR_GROWTH_TOP
from catalog.analytics.dashboard.render import (
    FIT_COLOUR,
    HEAT_COLOURS,
    SOURCE_COLOURS,
    render_dashboard,
)


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
    page.write_text(render_dashboard(dash_data(warning="a short history")), encoding="utf-8")
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
    # Six charts (ratios has two) and the directory-growth bars.
    assert result.stdout.count("<svg") == 7 and "<script" not in result.stdout
    assert result.stdout.count('class="bar"') == 3 * DIR_GROWTH_TOP
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
