"""The virtual-drive commands (export for now)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from catalog.repo import Repository
from catalog.store.points import resolve
from drive.formats.export import export_image
from drive.formats.registry import builder
from drive.source import PointSource

from .lifecycle import reader_lock


def cmd_export(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    with reader_lock(r, "export"):  # as restore: prune waits (FORMAT.md 13)
        points = r.points()
        for msg in r.damaged:
            print(f"comb: warning: skipping {msg}", file=sys.stderr)
        point = resolve(points, args.point)
        t0 = time.perf_counter()
        image = builder(args.format)(PointSource(r, point))
        written = export_image(image, args.output, force=args.force)
        seconds = time.perf_counter() - t0
    if args.json:
        doc = {
            "point": point.id,
            "format": args.format,
            "output": args.output,
            "image_bytes": image.size,
            "bytes_written": written,
            "seconds": round(seconds, 3),
        }
        print(json.dumps(doc, sort_keys=True))
    else:
        print(
            f"exported recovery point {point.id} as {args.format} to {args.output}: "
            f"{image.size} bytes, {written} written ({written / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
        )
    return 0
