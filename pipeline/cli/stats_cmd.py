"""``comb stats``: how big the repository is on disk, how much data its points hold, and how
well it deduplicates and compresses, in total and per source.

The figures come from where they are already computed: the repository-wide ones from the
``ratios`` report (its last period holds the running totals), the per-source ones from the
``sources`` and ``stored_history`` views of the analytics catalog; only the file sizes on disk
are read here.
"""

from __future__ import annotations

import argparse
from typing import Any

from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import ReportOptions, run_report
from catalog.repo import Repository
from catalog.store.format import CONFIG_NAME
from catalog.store.storage import Storage

from ..console import human_bytes, note, print_json, print_table, warn, warn_damaged
from . import Subparsers, command

# Top-level directories by what they hold; everything else comb writes is metadata.
PACKS, PARITY, OVERLAYS = "packs", "parity", "overlays"
METADATA_DIRS = ("index", "manifests", "points", "forgotten", "keys", "locks")

PER_SOURCE_SQL = (
    "SELECT s.source, s.points, sum(h.size)::BIGINT AS disk_bytes, "
    "sum(h.bytes_data)::BIGINT AS data_bytes, "
    "(SELECT sum(bytes_new) FROM stored_history x WHERE x.source = s.source)::BIGINT "
    "AS unique_bytes, s.bytes_stored AS stored_bytes, s.has_changes "
    "FROM sources s JOIN point_history h USING (source) "
    "GROUP BY s.source, s.points, s.bytes_stored, s.has_changes ORDER BY s.source"
)


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "stats",
        "show the repository's size on disk, the data its points hold, dedup and compression",
        ["comb -r /backup/repo stats", "comb stats -r /backup/repo --json"],
        json='print {"repository": {...}, "totals": {...}, "sources": [...]} as one object',
    )
    s.set_defaults(run=cmd_stats)


def disk_usage(storage: Storage) -> dict[str, int]:
    """Bytes of the repository's files on disk by kind (temporary files are not counted)."""

    def total(prefix: str) -> tuple[int, int]:
        names = storage.list(prefix)
        return len(names), sum(storage.size(n) for n in names)

    packs, pack_bytes = total(PACKS)
    parity_files, parity_bytes = total(PARITY)
    _, overlay_bytes = total(OVERLAYS)
    metadata = sum(total(d)[1] for d in METADATA_DIRS) + storage.size(CONFIG_NAME)
    return {
        "pack_files": packs,
        "pack_bytes": pack_bytes,
        "parity_files": parity_files,
        "parity_bytes": parity_bytes,
        "metadata_bytes": metadata,
        "overlay_bytes": overlay_bytes,
        "total_bytes": pack_bytes + parity_bytes + metadata + overlay_bytes,
    }


def _ratio(num: int | None, den: int | None) -> float | None:
    return None if num is None or not den else round(num / den, 3)


def compute_stats(r: Repository) -> tuple[dict[str, Any], list[str]]:
    """The ``stats --json`` document, and the notes of the reports it came from."""
    points = r.points()
    warn_damaged(r)
    cat = Catalog.open(r.storage, points)
    ratios = run_report(cat, "ratios", ReportOptions())
    last = ratios.table.to_pylist()[-1] if ratios.table.num_rows else {}
    rows = cat.con.sql(PER_SOURCE_SQL).to_arrow_table().to_pylist() if points else []
    for m in dict.fromkeys([*cat.damaged, *cat.history.damaged]):
        warn(f"left out: {m}")
    sources = [
        {
            "source": row["source"],
            "points": row["points"],
            "disk_bytes": row["disk_bytes"],
            "data_bytes": row["data_bytes"],
            "unique_bytes": row["unique_bytes"] or 0,
            "stored_bytes": row["stored_bytes"] or 0,
            # Data bytes are known only with change tables (as in the ratios report).
            "dedup_ratio": _ratio(row["data_bytes"], row["unique_bytes"])
            if row["has_changes"]
            else None,
            "compression_ratio": _ratio(row["unique_bytes"], row["stored_bytes"]),
        }
        for row in rows
    ]
    totals = {
        "points": len(points),
        "disk_bytes": sum(p.size for p in points),
        "data_bytes": last.get("logical_bytes") or 0,
        "unique_bytes": last.get("unique_bytes") or 0,
        "stored_bytes": last.get("stored_bytes") or 0,
        "dedup_ratio": None if last.get("dedup_ratio") is None else round(last["dedup_ratio"], 3),
        "compression_ratio": None
        if last.get("compression_ratio") is None
        else round(last["compression_ratio"], 3),
    }
    doc = {"repository": disk_usage(r.storage), "totals": totals, "sources": sources}
    return doc, ratios.notes


def _shown_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def cmd_stats(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    doc, notes = compute_stats(r)
    for msg in notes:
        note(msg)
    if args.json:
        print_json(doc)
        return 0
    d = doc["repository"]
    print(
        f"repository on disk: {human_bytes(d['total_bytes'])} ({d['pack_files']} pack(s) "
        f"{human_bytes(d['pack_bytes'])}, parity {human_bytes(d['parity_bytes'])}, metadata "
        f"{human_bytes(d['metadata_bytes'])}"
        + (f", overlays {human_bytes(d['overlay_bytes'])}" if d["overlay_bytes"] else "")
        + ")"
    )
    head = ["SOURCE", "POINTS", "DISKS", "DATA", "UNIQUE", "STORED", "DEDUP", "COMPRESSION"]

    def row(name: str, x: dict[str, Any]) -> list[str]:
        data = "-" if x["data_bytes"] is None else human_bytes(x["data_bytes"])
        return [
            name,
            str(x["points"]),
            human_bytes(x["disk_bytes"]),
            data,
            human_bytes(x["unique_bytes"]),
            human_bytes(x["stored_bytes"]),
            _shown_ratio(x["dedup_ratio"]),
            _shown_ratio(x["compression_ratio"]),
        ]

    rows = [row(s["source"], s) for s in doc["sources"]]
    print_table(head, [*rows, row("(all)", doc["totals"])])
    return 0
