"""``comb export POINT OUTPUT``: a recovery point as a disk image file (raw, qcow2, VHD, VHDX,
VMDK) generated on the fly (``drive.formats``)."""

from __future__ import annotations

import argparse
import time

from catalog.repo import Repository
from drive.formats.export import export_image
from drive.formats.registry import FORMATS, builder

from ..console import print_json, warn_damaged
from ..locking import reader_lock
from . import POINT_HELP, Subparsers


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser("export", help="write a recovery point as a disk image file")
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("output", help="image file to write")
    s.add_argument(
        "--format",
        default="raw",
        choices=list(FORMATS),
        help="image format (default raw)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_export)


def cmd_export(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    with reader_lock(r, "export"):  # as restore: prune waits (FORMAT.md 13)
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        t0 = time.perf_counter()
        image = builder(args.format)(r.reader(point))
        written = export_image(image, args.output, force=args.force)
        seconds = time.perf_counter() - t0
    if args.json:
        print_json(
            {
                "point": point.id,
                "format": args.format,
                "output": args.output,
                "image_bytes": image.size,
                "bytes_written": written,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(
            f"exported recovery point {point.id} as {args.format} to {args.output}: "
            f"{image.size} bytes, {written} written ({written / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
        )
    return 0
