"""The comb command line: ``main``, the global options, dispatch and error handling. Errors are
one line (``comb: error: ...``) and a non-zero exit code (README.md lists them).

Each command is one module ``<name>_cmd.py`` (a few closely related commands share one) that
owns its parser (``add_parser(subparsers)``, which sets ``run``) and its run function
``cmd_<name>(repo, args)``; ``registry.COMMANDS`` lists them in the order ``comb --help`` shows
them. ``command`` makes a command's parser: its help, its examples (the end of its ``--help``)
and the global options (``-r``, ``--password-file``, ``--debug``, ``--json``), which work before
or after the command's name. ``args.password`` is the command's password source
(``passwords``): the run function passes it to ``Repository.open`` or ``Repository.init``, which
ask it only for an encrypted repository. ``dispatch`` falls back on the configuration file
(``config``) for the repository and the password file; ``args.config`` holds it for the
commands that have more defaults there (``backup``, ``forget``). The command modules are
imported inside ``main``'s error handling: pyarrow and DuckDB take a moment to import, and
Ctrl-C during that moment must still be one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# numpy's OpenBLAS starts a thread per core that spins after use: 2 % of a restore's CPU for
# nothing (comb's numpy work is element-wise). Set before numpy is imported (the workers of
# comb's own Ray inherit it; a cluster's do not).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from catalog.errors import CombError, UsageError  # noqa: E402

from .. import signals

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM
# How every command that takes a recovery point names it (catalog.store.points.resolve).
POINT_HELP = "id, unique prefix, SOURCE@latest or SOURCE@ID"
GLOBAL_OPTIONS = "global options (before or after the command)"


# What a command module's ``add_parser`` gets: ``add_subparsers()``'s result.
Subparsers = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    """Usage errors as ``UsageError`` (one line, exit code 2), naming the help to read."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def comb_version() -> str:
    """The installed package's version (pyproject.toml), or ``unknown`` outside an install."""
    try:
        return version("comb")
    except PackageNotFoundError:
        return "unknown"


def add_global_options(p: argparse.ArgumentParser, json_help: str | None, top: bool) -> None:
    """``-r``, ``--password-file``, ``--debug`` and, where the command prints JSON, ``--json``:
    on the top parser and again on every command's, so they work before or after the command.
    A command's copies have no default (``SUPPRESS``), so a value given before the command is
    kept and one given after it wins."""
    g = p.add_argument_group(GLOBAL_OPTIONS)
    unset: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    g.add_argument(
        "-r",
        "--repo",
        metavar="REPO",
        help="repository path or s3://BUCKET/PREFIX (or COMB_REPO, or `repository` in the "
        "config file)",
        **({"default": os.environ.get("COMB_REPO")} if top else unset),
    )
    g.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the repository password from FILE (else COMB_PASSWORD_FILE, COMB_PASSWORD, "
        "`password-file` in the config file, or a prompt)",
        **unset,
    )
    g.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible server of an s3:// repository (else AWS_ENDPOINT_URL, else AWS)",
        **unset,
    )
    g.add_argument(
        "--s3-max-requests-per-s",
        metavar="N",
        type=float,
        help="at most N requests a second to S3 from each comb process (for providers that "
        "throttle; else COMB_S3_MAX_REQUESTS_PER_S, else no limit)",
        **unset,
    )
    g.add_argument("--debug", action="store_true", help="show a traceback on errors", **unset)
    if json_help is not None:
        g.add_argument("--json", action="store_true", help=json_help, **unset)


def examples_text(examples: Sequence[str]) -> str:
    """The end of a command's help: its examples, one command line each."""
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


def command(
    sub: Subparsers, name: str, summary: str, examples: Sequence[str], json: str | None
) -> argparse.ArgumentParser:
    """A command's parser: ``summary`` in the list of ``comb --help`` and atop its own help, its
    ``examples`` at the end, and the global options; ``json`` says what ``--json`` prints
    (``None``: the command has no JSON output, and ``--json`` is a usage error)."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=f"{summary[:1].upper()}{summary[1:]}.",
        epilog=examples_text(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(p, json, top=False)
    p.set_defaults(has_json=json is not None)
    return p


def actions(p: argparse.ArgumentParser, default: str) -> Subparsers:
    """The ``ACTION`` of a command that has several (``key``, ``overlays``)."""
    return p.add_subparsers(
        dest="action", metavar="ACTION", parser_class=Parser, help=f"what to do (default {default})"
    )


def build_parser() -> argparse.ArgumentParser:
    from .registry import COMMANDS

    p = Parser(
        prog="comb",
        description="Block-level backup into a deduplicating repository.",
        epilog=examples_text(
            [
                "comb -r /backup/repo init",
                "comb -r /backup/repo backup /var/lib/images/web01.img",
                "comb points -r /backup/repo --json",
                "comb COMMAND --help    (each command's options and examples)",
            ]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--version", action="version", version=f"comb {comb_version()}", help="print the version"
    )
    add_global_options(p, 'print results as JSON (README.md, "JSON output")', top=True)
    p.set_defaults(needs_repo=True, has_json=False)
    sub = p.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=Parser, help="what to do"
    )
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace | None:
    """The command line; None when ``--help`` or ``--version`` has printed all there is to do
    (a bad command line is a ``UsageError``: ``Parser.error``)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as done:
        if done.code not in (0, None):
            raise
        return None


def dispatch(args: argparse.Namespace) -> int:
    if args.command is None:
        raise UsageError("no command given (see `comb --help`)")
    if args.json and not args.has_json:
        raise UsageError(f"`comb {args.command}` has no JSON output (see `comb --help`)")
    from .config import Config, load_config
    from .passwords import PASSWORD_ENV, PASSWORD_FILE_ENV, password_source

    # The configuration file comes last, after the option and its environment variable; a
    # command without a repository (``completion``, ``demo``) does not read it.
    args.config = config = load_config() if args.needs_repo else Config()
    repo = ""
    if args.needs_repo:
        repo = str(args.repo or config.repository or "")
        if not repo:
            raise UsageError(
                "no repository given (use -r REPO, set COMB_REPO or `repository` in the "
                "config file)"
            )
    password_file = args.password_file
    if not (password_file or os.environ.get(PASSWORD_FILE_ENV) or PASSWORD_ENV in os.environ):
        password_file = config.password_file
    # The repository never looks a password up: each command passes this source on.
    args.password = password_source(password_file)
    with _s3_settings(args):
        return int(args.run(repo, args) or 0)


@contextmanager
def _s3_settings(args: argparse.Namespace) -> Iterator[None]:
    """--s3-endpoint and --s3-max-requests-per-s, for the command's run: set as the variables
    every S3 client of this process (and the Ray actors it starts) reads, then put back."""
    settings: dict[str, str] = {}
    endpoint = getattr(args, "s3_endpoint", None)
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"--s3-endpoint {endpoint}: give an http:// or https:// URL")
        settings["AWS_ENDPOINT_URL"] = settings["AWS_ENDPOINT_URL_S3"] = endpoint
    budget = getattr(args, "s3_max_requests_per_s", None)
    if budget is not None:
        if not budget > 0:
            raise UsageError(f"--s3-max-requests-per-s {budget:g}: give a number above 0")
        settings["COMB_S3_MAX_REQUESTS_PER_S"] = f"{budget:g}"
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run one command; its exit code. ``exiting``: the process ends right after (the ``comb``
    program), so a signal after the command is noted rather than raised at exit."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    previous = signals.install()
    try:
        args = parse(argv)
        code = 0 if args is None else dispatch(args)
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
    """The ``comb`` program. Interrupted after Ray was started in this process, it leaves at
    once (its cleanup is done and said): Python's own finalization then ran into Ray's
    half-stopped threads and crashed (SIGSEGV) after the one-line error."""
    code = main(exiting=True)
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) and "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
