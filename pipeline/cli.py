"""The comb command line. Errors are one line (`comb: error: ...`) and a non-zero exit code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from catalog.errors import CombError, UsageError
from drive.formats.registry import FORMATS

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="comb", description="Block-level backup into a deduplicating repository.")
    p.add_argument(
        "-r", "--repo", default=os.environ.get("COMB_REPO"), help="repository path (or COMB_REPO)"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the repository password from FILE (else COMB_PASSWORD or a prompt)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("init", help="create a repository")
    s.add_argument(
        "--chunk-size", type=int, default=None, help="chunk size in bytes (default 65536)"
    )
    s.add_argument(
        "--zstd-level", type=int, default=None, help="compression level of new chunks (default 3)"
    )
    s.add_argument(
        "--parity-overhead",
        default=None,
        metavar="PCT",
        help="parity per pack in percent of its size, in steps of 6.25 (default 12.5: heals any "
        "2 damaged 256 KiB shards per 4 MiB stripe); 0 or none: no parity",
    )
    s.add_argument(
        "--encryption",
        choices=["aes-256-gcm", "none"],
        default="aes-256-gcm",
        help="encrypt everything stored (default) or nothing",
    )

    s = sub.add_parser("key", help="add, list or remove the passwords of an encrypted repository")
    acts = s.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    a = acts.add_parser("list", help="list the key files (the default); * marks yours")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("add", help="add a password (COMB_NEW_PASSWORD, --new-password-file)")
    a.add_argument("--new-password-file", metavar="FILE")
    a = acts.add_parser("remove", help="remove a key by id (or unique prefix)")
    a.add_argument("id")

    s = sub.add_parser("backup", help="back up a disk image, block device or vSphere VM")
    s.add_argument(
        "source",
        help="image file, block device, overlay:NAME, or vsphere://USER@HOST/DC/vm/NAME",
    )
    s.add_argument("--source-name", help="name of the source (default: its absolute path)")
    s.add_argument(
        "--changed-extents", metavar="FILE", help="JSON list of changed {offset, length}"
    )
    s.add_argument(
        "--engine", choices=["ray", "local"], default=os.environ.get("COMB_ENGINE", "ray")
    )
    s.add_argument("--ray-address", default=None, help="existing Ray cluster (or RAY_ADDRESS)")
    s.add_argument("--workers", type=int, default=None, help="worker count (default: CPUs)")
    s.add_argument("--batch-mib", type=int, default=16, help="work item size in MiB")
    s.add_argument("--json", action="store_true", help="print one JSON object per point")
    v = s.add_argument_group("vSphere (vsphere:// sources; password from COMB_VSPHERE_PASSWORD)")
    v.add_argument("--quiesce", action="store_true", help="quiesce the guest (VMware Tools)")
    v.add_argument(
        "--disk", type=int, action="append", default=[], metavar="KEY", help="disk device key"
    )
    v.add_argument("--all-disks", action="store_true", help="every disk, one source each")
    v.add_argument(
        "--cbt-audit",
        type=float,
        default=None,
        metavar="PERCENT",
        help="re-read this share of what CBT calls unchanged and check it (default 1)",
    )
    v.add_argument("--insecure", action="store_true", help="do not check the TLS certificate")
    v.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for TLS")

    s = sub.add_parser("forget", help="remove recovery points by keep rules or by id")
    s.add_argument("point", nargs="*", help="ids (or unique prefixes) to forget anyway")
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
    s.add_argument("--dry-run", action="store_true", help="list what would go, change nothing")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("prune", help="remove data no recovery point needs")
    s.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("scrub", help="read the packs, find damaged chunks and what they hurt")
    s.add_argument(
        "--sample", type=float, default=100.0, metavar="PERCENT", help="of the stored bytes"
    )
    s.add_argument("--repair", action="store_true", help="isolate damage so backups heal it")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("repair", help="rebuild derived data: `repair index` (from the packs)")
    s.add_argument("what", choices=["index"])

    s = sub.add_parser("locks", help="list repository locks")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("unlock", help="remove stale locks (never live ones)")
    s.add_argument("--stale", action="store_true", help="remove the locks of dead processes")

    s = sub.add_parser("points", help="list recovery points")
    s.add_argument("--source", help="only this source name")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("restore", help="restore a recovery point to a file or block device")
    s.add_argument("point", help="id, unique id prefix, or NAME@latest")
    s.add_argument("output")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("export", help="write a recovery point as a disk image file")
    s.add_argument("point", help="point id, unique prefix or NAME@latest")
    s.add_argument("output", help="image file to write")
    s.add_argument(
        "--format",
        default="raw",
        choices=list(FORMATS),
        help="image format (default raw)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="serve recovery points (read-only) and overlays over NBD")
    s.add_argument(
        "--listen", default="127.0.0.1:10809", metavar="HOST:PORT", help="default 127.0.0.1:10809"
    )
    s.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="NAME=POINT",
        help="serve writable overlay NAME as overlay/NAME, created over POINT if missing",
    )
    s.add_argument(
        "--cache-mib",
        type=int,
        default=16,
        help="decoded chunks cached per served point, MiB (default 16; at most 8 points loaded)",
    )

    s = sub.add_parser("overlays", help="list, create or remove writable overlays")
    s.add_argument("--json", action="store_true")
    acts = s.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    a = acts.add_parser("list", help="list overlays (the default)")
    a.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    a = acts.add_parser("create", help="create an empty overlay over a recovery point")
    a.add_argument("name")
    a.add_argument("point", help="id, unique prefix, SOURCE@latest or SOURCE@ID")
    a = acts.add_parser("rm", help="delete an overlay (refused while a server has it open)")
    a.add_argument("name")

    s = sub.add_parser("boot", help="boot a recovery point in QEMU through a writable overlay")
    s.add_argument("point", help="id, unique prefix, SOURCE@latest or SOURCE@ID")
    s.add_argument("--name", help="overlay name (default boot-<first 8 hex of the point id>)")
    s.add_argument("--print", action="store_true", help="print the QEMU and libvirt setup only")
    s.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="MiB",
        help="guest memory (default: the backed-up VM's, else 512)",
    )
    s.add_argument(
        "--cpus", type=int, default=None, help="guest CPUs (default: the backed-up VM's, else 1)"
    )
    s.add_argument("--listen", metavar="HOST:PORT", help="NBD address (default 127.0.0.1:0)")
    s.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="QEMU accelerator (default auto: KVM when a probe guest runs well here, else TCG)",
    )
    s.add_argument("--kvm", action="store_true", help="the same as --accel kvm")

    s = sub.add_parser("mount", help="mount every recovery point as disk image files (FUSE)")
    s.add_argument("mountpoint", help="an empty directory")

    s = sub.add_parser("verify", help="check the repository")
    s.add_argument("--read-data", action="store_true", help="read and re-hash every chunk")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("query", help="DuckDB SQL over the catalog views (read-only)")
    s.add_argument("sql")
    _output_options(s, with_parquet=True)

    s = sub.add_parser("report", help="a named analytics report (`report --list`)")
    s.add_argument("name", nargs="?", help="report name")
    s.add_argument("--list", action="store_true", help="list the reports")
    s.add_argument("--source", help="only this source")
    s.add_argument("--since", help="only points from this date/time on (ISO, UTC)")
    s.add_argument("--period", choices=["day", "week", "month"], default="day")
    s.add_argument("--bucket", help="hot-regions: region size (e.g. 1G, 256M)")
    s.add_argument("--limit", type=int, default=20, help="hot-regions: rows (0 = all)")
    s.add_argument(
        "--horizons", default="30,90,365", help="projection: days ahead, comma-separated"
    )
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        s.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    s.add_argument("--forget", action="append", default=[], metavar="POINT")
    _output_options(s, with_parquet=False)

    s = sub.add_parser("dashboard", help="write a self-contained HTML page with charts")
    s.add_argument("output", help="HTML file to write")

    sub.add_parser("catalog-schema", help="the catalog views and their columns")

    s = sub.add_parser("demo", help="back up, change, back up, restore, verify and query a sample")
    s.add_argument("--workdir", default="demo-work", help="where the demo puts its files")
    s.add_argument("--engine", choices=["ray", "local"], default="ray")
    s.add_argument("--size-mib", type=int, default=512)
    return p


def _output_options(s: argparse.ArgumentParser, with_parquet: bool) -> None:
    formats = ["table", "csv", "json", *(["parquet"] if with_parquet else [])]
    s.add_argument("--format", choices=formats, default="table")
    s.add_argument("--output", metavar="FILE", help="write the result to FILE (atomically)")


def _need_repo(args: argparse.Namespace) -> str:
    if not args.repo:
        raise UsageError("no repository given (use -r REPO or set COMB_REPO)")
    return str(args.repo)


def dispatch(args: argparse.Namespace) -> int:
    if args.command is None:
        raise UsageError("no command given (see `comb --help`)")
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.workdir, args.engine, args.size_mib)
    repo = _need_repo(args)
    if args.command == "key" and args.action is None:
        args.action, args.json = "list", False
    from catalog.store import crypto

    crypto.set_password_files(args.password_file, getattr(args, "new_password_file", None))
    # Imported here, inside main's error handling: pyarrow/duckdb take a moment to import,
    # and Ctrl-C during that moment must still be one line, not a traceback.
    from . import commands

    handler = getattr(commands, f"cmd_{args.command.replace('-', '_')}")
    result: Any = handler(repo, args)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        code = dispatch(args)
    except CombError as err:
        if debug:
            raise
        print(f"comb: error: {err.message}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("comb: error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = 0
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, no dump
        if debug:
            raise
        text = str(err).strip().splitlines()
        print(
            f"comb: error: internal error: {type(err).__name__}: {text[0] if text else ''} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        code = EXIT_INTERNAL
    finally:
        from catalog.store import crypto

        crypto.set_password_files(None, None)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
