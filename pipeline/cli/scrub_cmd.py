"""``comb scrub``: read the packs, locate damage and the points it hurts, and with
``--repair`` heal from parity or isolate it (``catalog.maint.scrub``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from catalog.errors import CorruptionError, UsageError
from catalog.maint.scrub import Damage, ScrubReport, scrub
from catalog.repo import Repository

from ..console import human_bytes, human_rate, print_json
from ..locking import ensure_locking, reader_lock
from . import Subparsers, command
from .progress import PACKS, progress_bar


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "scrub",
        "read the packs, find damaged chunks and the points they hurt; heal with --repair",
        [
            "comb -r /backup/repo scrub",
            "comb -r /backup/repo scrub --sample 10",
            "comb -r /backup/repo scrub --repair --verbose",
        ],
        json="print the findings, every damaged chunk included, as one JSON object; status "
        "lines on stderr",
    )
    s.add_argument(
        "--sample", type=float, default=100.0, metavar="PERCENT", help="of the stored bytes"
    )
    s.add_argument(
        "--repair",
        action="store_true",
        help="heal damaged packs from parity, isolate the rest so that backups heal it",
    )
    s.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every damaged chunk (by default one line per damaged pack)",
    )
    s.set_defaults(run=cmd_scrub)


def cmd_scrub(repo: str, args: argparse.Namespace) -> int:
    if not 0 < args.sample <= 100:
        raise UsageError("--sample must be a percentage above 0 and at most 100")
    r = Repository.open(repo, password=args.password)
    if args.repair:
        r.require_writable()
        ensure_locking(r)
    with reader_lock(r, "scrub"), progress_bar("scrub", args.json, PACKS) as bar:
        rep = scrub(r, args.sample, args.repair, progress=bar)
    if args.json:
        _scrub_json(rep)
    else:
        _scrub_text(rep, args.verbose)
    _scrub_verdict(rep)
    return 0


def _by_pack(rep: ScrubReport) -> dict[str, list[Damage]]:
    """The damaged chunks of each damaged pack, in the order scrub found them."""
    out: dict[str, list[Damage]] = {}
    for d in rep.damaged:
        out.setdefault(d.pack, []).append(d)
    return out


def _scrub_json(rep: ScrubReport) -> None:
    doc = {
        "packs_checked": rep.packs,
        "packs_total": rep.packs_total,
        "bytes_checked": rep.bytes,
        "seconds": round(rep.seconds, 3),
        "damaged_packs": [
            {
                "pack": pack,
                "chunks": sum(bool(d.chunk_id) for d in items),
                "healable": sum(d.healable for d in items),
            }
            for pack, items in _by_pack(rep).items()
        ],
        "damaged": [
            {
                "pack": d.pack,
                "offset": d.offset,
                "chunk_id": d.chunk_id.hex(),
                "why": d.why,
                "healable": d.healable,
            }
            for d in rep.damaged
        ],
        "affected": [asdict(a) for a in rep.affected],
        "quarantined": rep.quarantined,
        "copied_chunks": rep.copied_chunks,
        "parity": rep.parity,
        "parity_problems": rep.parity_problems,
        "healed": [
            {"pack": h.pack, "action": h.action, "shards": h.shards, "why": h.why}
            for h in rep.healed
        ],
        "unhealed": len(rep.remaining),
    }
    print_json(doc)


def _damage_lines(rep: ScrubReport, verbose: bool) -> list[str]:
    """One line per damaged pack: how many of its chunks, how many parity heals, the first
    one's damage (``verbose``: then every damaged chunk, indented). A pack damaged as a whole
    (unreadable, or damaged outside its chunks) is its one line."""
    lines = []
    for pack, items in _by_pack(rep).items():
        chunks = [d for d in items if d.chunk_id]
        healable = 0 if rep.repaired else sum(d.healable for d in items)
        heal = f" ({healable} healable from parity)" if healable else ""
        if not chunks:
            lines.append(f"damaged: {items[0].why}{heal}")
            continue
        lines.append(
            f"damaged: pack {pack[:16]}: {len(chunks)} damaged chunk(s){heal}; "
            f"first: {chunks[0].why}"
        )
        if verbose:
            tag = "" if rep.repaired else " (healable from parity)"
            lines += [f"  {d.why}{tag if d.healable else ''}" for d in chunks]
    return lines


def _scrub_text(rep: ScrubReport, verbose: bool) -> None:
    for line in _damage_lines(rep, verbose):
        print(line, file=sys.stderr)
    for _pid, why in sorted(rep.parity_problems.items()):
        print(f"parity: {why}", file=sys.stderr)
    for h in rep.healed:
        if h.action == "rebuilt from parity":
            print(f"healed: pack {h.pack[:16]} rebuilt from parity ({h.shards} shard(s))")
        elif h.action == "parity rewritten":
            print(f"healed: parity of pack {h.pack[:16]} rewritten from the intact pack")
        elif h.action == "not healable":
            print(f"not healed: pack {h.pack[:16]}: {h.why}", file=sys.stderr)
    for a in rep.affected:
        spans = ", ".join(f"{o}+{n}" for o, n in a.extents[:8])
        more = f" and {len(a.extents) - 8} more" if len(a.extents) > 8 else ""
        print(f"affected: point {a.point} of {a.source}: extents {spans}{more}", file=sys.stderr)
    state = "clean"
    if rep.damaged:
        state = f"{len(rep.damaged)} damaged chunk(s) in {len(_by_pack(rep))} pack(s)"
    if rep.parity_problems:
        state += f", {len(rep.parity_problems)} pack(s) with missing or damaged parity"
    print(
        f"scrubbed {rep.packs} of {rep.packs_total} pack(s), {human_bytes(rep.bytes)} in "
        f"{rep.seconds:.1f} s ({human_rate(rep.bytes, rep.seconds)}): {state}"
    )
    if rep.quarantined:
        print(
            f"repaired: {rep.copied_chunks} intact chunk(s) of {len(rep.quarantined)} damaged "
            "pack(s) copied, the damaged pack(s) removed"
        )


def _scrub_verdict(rep: ScrubReport) -> None:
    """The exit: an error while anything is damaged or unprotected when scrub ends."""
    if rep.repaired:
        left = rep.remaining
        if left:
            packs = len({d.pack for d in left})
            raise CorruptionError(
                f"{len(left)} damaged chunk(s) in {packs} pack(s) beyond parity, "
                f"{len(rep.affected)} recovery point(s) affected; isolated; they heal when a "
                "backup reads the same data again"
            )
        return
    if rep.damaged:
        healable = sum(d.healable for d in rep.damaged)
        hint = (
            "`comb scrub --repair` heals them from parity"
            if healable == len(rep.damaged)
            else "`comb scrub --repair` heals what parity covers and isolates the rest so that "
            "a later backup heals it"
        )
        raise CorruptionError(
            f"{len(rep.damaged)} damaged chunk(s) in {len(rep.bad_packs)} pack(s), "
            f"{len(rep.affected)} recovery point(s) affected"
            + (f", {healable} healable from parity" if rep.parity else "")
            + f"; {hint}"
        )
    if rep.parity_problems:
        raise CorruptionError(
            f"{len(rep.parity_problems)} pack(s) with missing or damaged parity; "
            "`comb scrub --repair` writes it again"
        )
