"""Byte sizes for people: the one formatter of a byte count in binary units, and the units.

Used for the commands' output (``pipeline.console.human_bytes``) and the dashboard's cards and
chart axes; importable from every package, like ``errors``: it imports nothing and stands
outside the repository layers. Must not parse sizes or know what is being measured.
"""

from __future__ import annotations

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float, decimals: int | None = None) -> str:
    """``n`` bytes in the largest binary unit that keeps it at 1 or more, whole bytes below
    1 KiB: three significant digits (``1.50 KiB``, ``12.3 TiB``, ``100 GiB``), or, with
    ``decimals``, that many decimals (``decimals=1``: ``1.5 KiB``, ``100.0 GiB``)."""
    value, k = abs(float(n)), 0
    while value >= 1024 and k < len(BYTE_UNITS) - 1:
        value, k = value / 1024, k + 1
    sign = "-" if n < 0 else ""
    if k == 0:
        return f"{sign}{value:.0f} B"
    digits = decimals if decimals is not None else 2 if value < 10 else 1 if value < 100 else 0
    return f"{sign}{value:.{digits}f} {BYTE_UNITS[k]}"
