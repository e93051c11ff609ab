"""``comb export POINT OUTPUT``: a recovery point as a disk image file (raw, qcow2, VHD, VHDX,
VMDK) generated on the fly (``drive.formats``), with the progress of its data bytes."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from catalog.repo import Repository
from drive.formats.export import export_image
from drive.formats.image import VirtualImage
from drive.formats.registry import FORMATS, builder

from ..console import human_bytes, human_rate, print_json, warn_damaged
from ..locking import reader_lock
from . import POINT_HELP, Subparsers, command
from .progress import Report, progress_bar


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "export",
        "write a recovery point as a disk image file (raw, qcow2, VHD, VHDX, VMDK)",
        [
            "comb -r /backup/repo export web01@latest web01.img",
            "comb -r /backup/repo export web01@latest web01.qcow2 --format qcow2 --force",
        ],
        json="print the result as one JSON object; status lines on stderr",
    )
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("output", help="image file to write")
    s.add_argument(
        "--format",
        default="raw",
        choices=list(FORMATS),
        help="image format (default raw)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.set_defaults(run=cmd_export)


class _Reporting(VirtualImage):
    """The image, reporting how many of its data bytes (what is written: holes are not) have
    been handed to the writer."""

    report: Report | None = None

    def pieces(self, max_bytes: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
        total = sum(s.length for s in self.segments)
        done = 0
        for offset, data in super().pieces(max_bytes):
            yield offset, data
            done += len(data)
            if self.report is not None:
                self.report(done, total)


def cmd_export(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    with reader_lock(r, "export"):  # as restore: prune waits (FORMAT.md 13)
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        t0 = time.perf_counter()
        built = builder(args.format)(r.reader(point))
        image = _Reporting(built.size, built.segments, built.source)
        with progress_bar(f"export {point.id[:8]}", args.json) as bar:
            image.report = bar
            written = export_image(image, args.output, force=args.force)
        seconds = time.perf_counter() - t0
    if args.json:
        print_json(
            {
                "point": point.id,
                "source": point.source,
                "format": args.format,
                "output": args.output,
                "size": point.size,
                "image_bytes": image.size,
                "bytes_written": written,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(
            f"exported recovery point {point.id} as {args.format} to {args.output}: "
            f"{human_bytes(image.size)}, {human_bytes(written)} written "
            f"({human_rate(written, seconds)})"
        )
    return 0
