"""The command line is one consistent tool: the global options work before or after the command
(a value after it wins), ``--version`` prints the package's version, and every command of the
registry (and every action under it) explains every option and ends its help with an example,
so a command added without them fails here."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, assert_one_line_error

from catalog.errors import RepositoryError, UsageError
from pipeline.cli import Parser, build_parser
from pipeline.cli.registry import COMMANDS

GLOBAL = {"-r", "--password-file", "--debug"}


def _commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(``comb NAME [ACTION]``, its parser) for every command each registry module adds."""

    def walk(
        name: str, p: argparse.ArgumentParser
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(f"{name} {sub_name}", sub)

    for module in COMMANDS:
        sub = Parser(prog="comb").add_subparsers(parser_class=Parser)
        module.add_parser(sub)
        assert sub.choices, f"{module.__name__} adds no command"
        for name, p in sub.choices.items():
            yield from walk(f"comb {name}", p)


def test_every_command_and_option_has_help_and_every_command_an_example() -> None:
    missing, no_example, no_globals = [], [], []
    found = list(_commands())
    assert len(found) >= 25  # 22 commands, and the actions of key and overlays
    for name, p in found:
        for action in p._actions:
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
        epilog = (p.epilog or "").rstrip()
        example = re.search(r"^examples:\n(  .*\n)*  ([A-Z_]+=\S+ )*comb \S", epilog, re.M)
        if not example or not p.format_help().rstrip().endswith(epilog):
            no_example.append(name)
        options = {s for a in p._actions for s in a.option_strings}
        if not GLOBAL <= options:
            no_globals.append(name)
    assert missing == [], "options or commands without help text"
    assert no_example == [], "commands whose help does not end with an example"
    assert no_globals == [], "commands without the global options"


def test_top_level_help_lists_every_command_with_help() -> None:
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(c.help for c in sub._choices_actions)
    assert all(a.help for a in p._actions)
    assert "examples:" in p.format_help()


def test_version(cli: CliRunner) -> None:
    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"comb {version('comb')}" == "comb 0.1.0"


def test_help_returns_zero_in_process(cli: CliRunner) -> None:
    res = cli("points", "--help")
    assert res.code == 0 and res.out.rstrip().endswith("--json")
    assert "examples:" in res.out and "global options" in res.out


def test_global_options_before_or_after_the_command(
    cli: CliRunner, repo_path: Path, tmp_path: Path
) -> None:
    before = cli("-r", repo_path, "--json", "points")
    after = cli("points", "-r", repo_path, "--json")
    mixed = cli("--json", "points", "-r", repo_path)
    assert before.code == after.code == mixed.code == 0, after.err
    assert (
        json.loads(before.out) == json.loads(after.out) == json.loads(mixed.out) == {"points": []}
    )
    # A value after the command wins over one before it.
    res = cli("-r", tmp_path / "nowhere", "points", "-r", repo_path)
    assert res.code == 0 and "no recovery points" in res.out
    res = cli("-r", repo_path, "points", "-r", tmp_path / "nowhere")
    assert_one_line_error(res, "nowhere", code=RepositoryError.exit_code)
    # --password-file and --debug after the command too.
    pw = tmp_path / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    assert cli("points", "--password-file", pw, "-r", repo_path).code == 0
    pw.write_text("wrong\n")
    assert cli("points", "-r", repo_path, "--password-file", pw).code == 12
    with pytest.raises(RepositoryError):
        cli("points", "-r", tmp_path / "nowhere", "--debug")


def test_actions_take_the_global_options(cli: CliRunner, repo_path: Path) -> None:
    for args in (["key", "list", "--json"], ["key", "--json", "list"], ["--json", "key"]):
        res = cli("-r", repo_path, *args)
        assert res.code == 0, (args, res.err)
        assert len(json.loads(res.out)["keys"]) == 1
    res = cli("overlays", "list", "-r", repo_path, "--json")
    assert res.code == 0 and json.loads(res.out) == {"overlays": []}


@pytest.mark.parametrize("name", ["serve", "mount", "boot", "demo"])
def test_json_where_there_is_none_is_a_usage_error(
    cli: CliRunner, repo_path: Path, name: str
) -> None:
    args = {"boot": ["x"], "mount": ["/nonexistent"]}.get(name, [])
    res = cli("--json", "-r", repo_path, name, *args)
    assert_one_line_error(res, f"`comb {name}` has no JSON output", code=UsageError.exit_code)
    res = cli(name, *args, "-r", repo_path, "--json")  # after the command: not an option there
    assert_one_line_error(res, "--json", code=UsageError.exit_code)
