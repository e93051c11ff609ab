"""``comb forget``: remove recovery points by keep rules or by name. The rules are
``catalog.maint.forget``'s; this module parses them and says what went. Without ``--keep-*``
rules and point ids, the ``[keep]`` table of the configuration file is the policy."""

from __future__ import annotations

import argparse

import drive.overlays.overlay as overlay
from catalog.errors import UsageError
from catalog.maint.forget import Forgotten, forget
from catalog.maint.retention import KeepPolicy
from catalog.repo import Repository

from ..console import note, print_json, waiting
from ..locking import command_line
from . import POINT_HELP, Subparsers, command
from .prune_cmd import print_prune, prune_doc, run_prune


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "forget",
        "remove recovery points by keep rules or by id (`prune` then frees their data)",
        [
            "comb -r /backup/repo forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 "
            "--dry-run",
            "comb -r /backup/repo forget 3f2a91 web01@latest",
            "comb -r /backup/repo forget --keep-last 10 --prune --json",
            "comb -r /backup/repo forget --dry-run    (the [keep] rules of the config file)",
        ],
        json="print what was (or would be) forgotten and kept as one JSON object (with "
        '--prune: {"forget": {...}, "prune": {...}})',
    )
    s.add_argument(
        "point",
        nargs="*",
        help=f"points to forget anyway ({POINT_HELP}); without them and without --keep-* "
        "rules, the config file's [keep] table is the policy",
    )
    s.add_argument("--source", help="apply the keep rules to this source only")
    for rule, what in (
        ("last", "the N newest points"),
        ("hourly", "the newest point of each of the last N hours with points"),
        ("daily", "... of each of the last N days"),
        ("weekly", "... of each of the last N ISO weeks"),
        ("monthly", "... of each of the last N months"),
        ("yearly", "... of each of the last N years"),
    ):
        s.add_argument(f"--keep-{rule}", type=int, default=None, metavar="N", help=f"keep {what}")
    s.add_argument(
        "--prune",
        action="store_true",
        help="then free the data no recovery point needs any more (as `comb prune`)",
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would go, change nothing (with --prune: neither step changes anything)",
    )
    s.set_defaults(run=cmd_forget)


def overlay_bases(repo: Repository) -> dict[str, list[str]]:
    """Point id -> names of the overlays over it (``forget`` keeps those points)."""
    out: dict[str, list[str]] = {}
    for name in overlay.names(repo):
        base = str(overlay.read_doc(repo, name)["base"])
        out.setdefault(base, []).append(name)
    return out


def _policy(args: argparse.Namespace) -> KeepPolicy:
    values = {}
    for rule in KeepPolicy.__dataclass_fields__:
        n = getattr(args, f"keep_{rule}")
        if n is not None and n < 0:
            raise UsageError(f"--keep-{rule} must be 0 or more")
        values[rule] = n or 0
    return KeepPolicy(**values)


def _any_rule_given(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, f"keep_{rule}") is not None for rule in KeepPolicy.__dataclass_fields__
    )


def cmd_forget(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    r.require_writable()
    policy = _policy(args)
    config = getattr(args, "config", None)
    if config is not None and config.keep and not args.point and not _any_rule_given(args):
        policy = KeepPolicy(**config.keep)
        if not args.json:
            rules = ", ".join(f"{rule} {n}" for rule, n in config.keep.items())
            note(f"keep rules from {config.path}: {rules}")
    if not policy.any() and not args.point:
        raise UsageError("give --keep-* rules and/or point ids to forget (nothing would go)")
    res = forget(
        r,
        policy,
        tuple(args.point),
        args.source,
        args.dry_run,
        lambda: overlay_bases(r),
        command_line(),
        waiting,
    )
    doc = {
        "dry_run": args.dry_run,
        "forgotten": [p.id for p in res.gone],
        "kept": res.kept,
        "held_by_overlays": {p.id: names for p, names in res.held},
        "held_by_object_lock": {p.id: round(left) for p, left in res.locked},
    }
    if not args.prune:
        if args.json:
            print_json(doc)
        else:
            _print_forget(res, args.dry_run, hint=True)
        return 0
    if not args.json:  # forget's lines first: they stay if the prune then fails
        _print_forget(res, args.dry_run, hint=False)
    pruned = run_prune(r, args.dry_run)
    if args.json:
        print_json({"forget": doc, "prune": prune_doc(pruned)})
    else:
        if args.dry_run and res.gone:
            print("prune (as the repository is now: the points above are not forgotten yet):")
        print_prune(pruned)
    return 0


def _print_forget(res: Forgotten, dry_run: bool, hint: bool) -> None:
    verb = "would forget" if dry_run else "forgot"
    for p in res.gone:
        print(f"{verb} {p.id}  {p.time}  {p.source}")
    for p, names in res.held:
        print(f"kept {p.id}  {p.time}  {p.source}  (base of overlay {', '.join(names)})")
    for p, left in res.locked:
        print(f"kept {p.id}  {p.time}  {p.source}  (Object Lock for {left / 86400:.1f} more days)")
    print(
        f"{verb} {len(res.gone)} recovery point(s), kept {res.kept}"
        + ("; run `comb prune` to free their data" if hint and res.gone and not dry_run else "")
    )
