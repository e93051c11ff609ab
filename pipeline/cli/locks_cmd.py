"""``comb locks`` and ``comb unlock --stale``: the repository's lock files (FORMAT.md 13)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from catalog.errors import UsageError
from catalog.repo import Repository
from catalog.store.locks import read_locks, remove_stale

from ..console import print_json
from . import Subparsers, command


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "locks",
        "list the repository's locks and which are stale",
        ["comb -r /backup/repo locks", "comb -r /backup/repo locks --json"],
        json='print {"locks": [...]}',
    )
    s.set_defaults(run=cmd_locks)
    s = command(
        sub,
        "unlock",
        "remove stale locks (never live ones)",
        ["comb -r /backup/repo unlock --stale"],
        json="print the locks removed as one JSON object",
    )
    s.add_argument("--stale", action="store_true", help="remove the locks of dead processes")
    s.set_defaults(run=cmd_unlock)


def cmd_locks(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    locks = read_locks(r.storage)
    if args.json:
        print_json({"locks": [{**asdict(lk), "stale": lk.stale()} for lk in locks]})
        return 0
    for lk in locks:
        why = lk.stale()
        state = f"STALE ({why})" if why else f"alive, heartbeat {lk.heartbeat}"
        print(f"{lk.id}  {lk.describe()}  {state}")
    if not locks:
        print("no locks")
    return 0


def cmd_unlock(repo: str, args: argparse.Namespace) -> int:
    if not args.stale:
        raise UsageError("unlock removes stale locks only: give --stale")
    r = Repository.open(repo, password=args.password)
    removed = remove_stale(r.storage)
    live = len(read_locks(r.storage))
    if args.json:
        print_json(
            {"removed": [{**asdict(lk), "stale": why} for lk, why in removed], "locks_left": live}
        )
        return 0
    for lk, why in removed:
        print(f"removed {lk.id}  {lk.describe()}  ({why})")
    print(f"removed {len(removed)} stale lock(s); {live} live lock(s) left")
    return 0
