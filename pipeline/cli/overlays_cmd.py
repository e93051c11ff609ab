"""``comb overlays``: list, create and remove writable overlays (``drive.overlays.overlay``).

Owns the command's side only: the table, the JSON. Never opens an overlay for writing
(``serve`` and ``boot`` do).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import drive.overlays.overlay as overlay
from catalog.repo import Repository
from drive.overlays.overlay import OverlayInfo

from ..console import human_bytes, print_json, print_table
from . import POINT_HELP, Subparsers, actions, command


def add_parser(sub: Subparsers) -> None:
    json = "print the result as one JSON object"
    s = command(
        sub,
        "overlays",
        "list, create or remove writable overlays",
        [
            "comb -r /backup/repo overlays",
            "comb -r /backup/repo overlays create try1 web01@latest",
            "comb -r /backup/repo overlays rm try1",
        ],
        json,
    )
    acts = actions(s, "list")
    command(
        acts,
        "list",
        "list the overlays",
        ["comb -r /backup/repo overlays list --json"],
        json='print {"overlays": [...]}',
    )
    a = command(
        acts,
        "create",
        "create an empty overlay over a recovery point",
        ["comb -r /backup/repo overlays create try1 web01@latest"],
        json,
    )
    a.add_argument("name", help="1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)")
    a.add_argument("point", help=POINT_HELP)
    a = command(
        acts,
        "rm",
        "delete an overlay and all it holds (refused while a server has it open)",
        ["comb -r /backup/repo overlays rm try1"],
        json,
    )
    a.add_argument("name", help="the overlay's name")
    s.set_defaults(run=cmd_overlays)


def overlay_summary(i: OverlayInfo) -> dict[str, object]:
    """An overlay as ``overlays --json`` prints it (``bytes_written``, as every command)."""
    doc = asdict(i)
    doc["bytes_written"] = doc.pop("written_bytes")
    return doc


def cmd_overlays(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    action = args.action or "list"
    if action == "create":
        overlay.check_name(args.name)
        point = r.resolve(args.point)
        overlay.create(r, args.name, point)
        if args.json:
            print_json({"created": args.name, "base": point.id, "source": point.source})
        else:
            print(f"created overlay {args.name} over recovery point {point.id} of {point.source}")
        return 0
    if action == "rm":
        overlay.remove(r, args.name)
        if args.json:
            print_json({"removed": args.name})
        else:
            print(f"removed overlay {args.name}")
        return 0
    infos = [overlay.info(r, name) for name in overlay.names(r)]
    if args.json:
        print_json({"overlays": [overlay_summary(i) for i in infos]})
        return 0
    if not infos:
        print("no overlays")
        return 0
    head = ["NAME", "BASE", "SOURCE", "SIZE", "WRITTEN", "LOG", "LAST WRITE (UTC)"]
    rows = [
        [
            i.name,
            i.base,
            i.source,
            human_bytes(i.size),
            human_bytes(i.written_bytes),
            human_bytes(i.log_bytes),
            (i.last_write or "-").replace("T", " ").rstrip("Z"),
        ]
        for i in infos
    ]
    print_table(head, rows)
    return 0
