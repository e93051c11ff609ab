"""The command line's errors: one line, no traceback, a precise exit code (in process, local
engine); and every command has its module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import (
    CliRunner,
    ImageFactory,
    KiB,
    MiB,
    assert_one_line_error,
    backup_json,
    point_ids,
)

from catalog.errors import (
    ChangeListError,
    CombError,
    PointNotFound,
    RepositoryError,
    SourceError,
    UsageError,
)

C = 64 * KiB
SIZE = 24 * MiB + 4321  # mostly holes, not a multiple of the chunk size


def test_missing_source(cli: CliRunner, repo_path: Path, tmp_path: Path) -> None:
    res = cli("-r", repo_path, "backup", tmp_path / "nope.img")
    assert_one_line_error(res, str(tmp_path / "nope.img"), code=SourceError.exit_code)


def test_directory_as_source(cli: CliRunner, repo_path: Path, tmp_path: Path) -> None:
    res = cli("-r", repo_path, "backup", tmp_path)
    assert_one_line_error(res, "is a directory", code=SourceError.exit_code)


def test_source_shorter_than_parent(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(2 * MiB)
    img.random(0, MiB)
    first = backup_json(cli, repo_path, img.path)
    img.resize(MiB)
    res = cli("-r", repo_path, "backup", img.path)
    assert_one_line_error(
        res, "shorter than its parent", str(first["id"]), code=SourceError.exit_code
    )
    assert point_ids(cli, repo_path) == [first["id"]]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('[{"offset": 0, ', "not valid JSON"),
        ('{"offset": 0, "length": 1}', "JSON array"),
        ('[{"offset": 0, "len": 1}]', "item 0"),
        ('[{"offset": 0, "length": 99999999999}]', "beyond the end"),
        ('[{"offset": -4096, "length": 4096}]', "negative"),
    ],
)
def test_bad_changed_extents(
    cli: CliRunner,
    repo_path: Path,
    make_image: ImageFactory,
    tmp_path: Path,
    content: str,
    needle: str,
) -> None:
    img = make_image(MiB)
    img.random(0, 64 * KiB)
    first = backup_json(cli, repo_path, img.path)
    changes = tmp_path / "changes.json"
    changes.write_text(content)
    res = cli("-r", repo_path, "backup", img.path, "--changed-extents", changes)
    assert_one_line_error(res, str(changes), needle, code=ChangeListError.exit_code)
    assert point_ids(cli, repo_path) == [first["id"]]


def test_missing_changed_extents_file(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(MiB)
    res = cli("-r", repo_path, "backup", img.path, "--changed-extents", tmp_path / "none.json")
    assert_one_line_error(res, "none.json", code=ChangeListError.exit_code)


def test_missing_repository(cli: CliRunner, tmp_path: Path, make_image: ImageFactory) -> None:
    img = make_image(MiB)
    for args in (["points"], ["backup", img.path], ["verify"], ["query", "SELECT 1"]):
        res = cli("-r", tmp_path / "no-repo", *args)
        assert_one_line_error(res, str(tmp_path / "no-repo"), code=RepositoryError.exit_code)
    assert not (tmp_path / "no-repo").exists()


def test_unknown_repository_version(cli: CliRunner, repo_path: Path) -> None:
    cfg = repo_path / "config.json"
    doc = json.loads(cfg.read_text())
    doc["version"] = 99
    cfg.write_text(json.dumps(doc))
    res = cli("-r", repo_path, "points")
    assert_one_line_error(res, "version 99", code=RepositoryError.exit_code)


def test_no_repository_given(cli: CliRunner) -> None:
    assert_one_line_error(cli("points"), "COMB_REPO", code=UsageError.exit_code)


def test_ambiguous_prefix(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(64 * KiB)
    img.random(0, 100)
    seen: dict[str, str] = {}
    prefix = None
    for k in range(17):  # 17 ids over 16 hex digits: two share a first digit
        pid = str(backup_json(cli, repo_path, img.path, "--source-name", f"s{k}")["id"])
        if pid[0] in seen:
            prefix = pid[0]
            break
        seen[pid[0]] = pid
    assert prefix is not None
    res = cli("-r", repo_path, "restore", prefix, tmp_path / "x")
    assert_one_line_error(res, "ambiguous", code=PointNotFound.exit_code)


def test_usage_errors_are_one_line(cli: CliRunner, repo_path: Path) -> None:
    assert_one_line_error(cli("-r", repo_path), code=UsageError.exit_code)
    assert_one_line_error(cli("-r", repo_path, "frobnicate"), code=UsageError.exit_code)
    assert_one_line_error(cli("-r", repo_path, "restore"), code=UsageError.exit_code)
    assert_one_line_error(cli("-r", repo_path, "backup", "x", "--engine", "warp"), code=2)


@pytest.mark.parametrize("args", [["--workers", "-1"], ["--batch-mib", "0"]])
def test_bad_backup_options(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, args: list[str]
) -> None:
    img = make_image(MiB)
    img.random(0, 64 * KiB)
    res = cli("-r", repo_path, "backup", img.path, *args)
    assert_one_line_error(res, args[0])
    assert point_ids(cli, repo_path) == []


def test_query_errors_are_one_line(cli: CliRunner, repo_path: Path) -> None:
    assert_one_line_error(cli("-r", repo_path, "query", "DROP VIEW points"), "read-only", code=9)
    assert_one_line_error(cli("-r", repo_path, "query", "SELECT * FROM nope"), code=9)


def test_debug_shows_the_exception(cli: CliRunner, tmp_path: Path) -> None:
    with pytest.raises(CombError, match="does not exist"):
        cli("--debug", "-r", tmp_path / "none", "points")


def test_every_command_has_its_module_and_run_function() -> None:
    """The commands `comb --help` lists are those of ``pipeline.cli.registry``: each parser's
    ``run`` is ``cmd_<name>`` of one of its modules."""
    import argparse

    from pipeline.cli import build_parser
    from pipeline.cli.registry import COMMANDS

    modules = {m.__name__ for m in COMMANDS}
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub.choices) >= len(modules)
    for name, parser in sub.choices.items():
        run = parser.get_default("run")
        assert run.__module__ in modules and run.__name__ == f"cmd_{name.replace('-', '_')}"
    assert {parser.get_default("run").__module__ for parser in sub.choices.values()} == modules
