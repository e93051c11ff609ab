"""The comb command line: ``main``, the global options, dispatch and error handling. Errors are
one line (``comb: error: ...``) and a non-zero exit code (README.md lists them).

Each command is one module ``<name>_cmd.py`` (a few closely related commands share one) that
owns its parser (``add_parser(subparsers)``, which sets ``run``) and its run function
``cmd_<name>(repo, args)``; ``registry.COMMANDS`` lists them in the order ``comb --help`` shows
them. ``args.password`` is the command's password source (``passwords``): the run function
passes it to ``Repository.open`` or ``Repository.init``, which ask it only for an encrypted
repository. The command modules are imported inside ``main``'s error handling: pyarrow and DuckDB
take a moment to import, and Ctrl-C during that moment must still be one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from catalog.errors import CombError, UsageError

from .. import signals

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM
# How every command that takes a recovery point names it (catalog.store.points.resolve).
POINT_HELP = "id, unique prefix, SOURCE@latest or SOURCE@ID"


# What a command module's ``add_parser`` gets: ``add_subparsers()``'s result.
Subparsers = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    """Usage errors as ``UsageError`` (one line, exit code 2), naming the help to read."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .registry import COMMANDS

    p = Parser(prog="comb", description="Block-level backup into a deduplicating repository.")
    p.add_argument(
        "-r", "--repo", default=os.environ.get("COMB_REPO"), help="repository path (or COMB_REPO)"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the repository password from FILE (else COMB_PASSWORD or a prompt)",
    )
    p.set_defaults(needs_repo=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def dispatch(args: argparse.Namespace) -> int:
    if args.command is None:
        raise UsageError("no command given (see `comb --help`)")
    repo = ""
    if args.needs_repo:
        if not args.repo:
            raise UsageError("no repository given (use -r REPO or set COMB_REPO)")
        repo = str(args.repo)
    from .passwords import password_source

    # The repository never looks a password up: each command passes this source on.
    args.password = password_source(args.password_file)
    return int(args.run(repo, args) or 0)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run one command; its exit code. ``exiting``: the process ends right after (the ``comb``
    program), so a signal after the command is noted rather than raised at exit."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    previous = signals.install()
    try:
        args = build_parser().parse_args(argv)
        code = dispatch(args)
        signals.hold()  # the command is done: a late signal changes nothing
        late = signals.pending()
        if late is not None:
            print(
                f"comb: warning: {signal.Signals(late).name} arrived after the work was "
                "committed; it is complete",
                file=sys.stderr,
            )
    except CombError as err:
        if debug:
            raise
        print(f"comb: error: {err.message}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt as err:
        term = isinstance(err, signals.Interrupted) and err.signum == signal.SIGTERM
        print(f"comb: error: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        code = EXIT_TERMINATED if term else EXIT_INTERRUPTED
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
        if exiting:
            signals.hold()
        else:
            signals.restore(previous)
    sys.stdout.flush()
    return code


def run() -> None:
    """The ``comb`` program."""
    sys.exit(main(exiting=True))
