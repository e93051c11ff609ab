"""``comb overlays``: list, create and remove writable overlays (``drive.overlays.overlay``).

Owns the command's side only: the table, the JSON. Never opens an overlay for writing
(``serve`` and ``boot`` do).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import drive.overlays.overlay as overlay
from catalog.repo import Repository

from ..console import human_bytes, print_json, print_table
from . import POINT_HELP, Parser, Subparsers


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser("overlays", help="list, create or remove writable overlays")
    s.add_argument("--json", action="store_true")
    acts = s.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    a = acts.add_parser("list", help="list overlays (the default)")
    a.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    a = acts.add_parser("create", help="create an empty overlay over a recovery point")
    a.add_argument("name")
    a.add_argument("point", help=POINT_HELP)
    a = acts.add_parser("rm", help="delete an overlay (refused while a server has it open)")
    a.add_argument("name")
    s.set_defaults(run=cmd_overlays)


def cmd_overlays(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    action = args.action or "list"
    if action == "create":
        overlay.check_name(args.name)
        point = r.resolve(args.point)
        overlay.create(r, args.name, point)
        print(f"created overlay {args.name} over recovery point {point.id} of {point.source}")
        return 0
    if action == "rm":
        overlay.remove(r, args.name)
        print(f"removed overlay {args.name}")
        return 0
    infos = [overlay.info(r, name) for name in overlay.names(r)]
    if args.json:
        print_json({"overlays": [asdict(i) for i in infos]}, pretty=True)
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
