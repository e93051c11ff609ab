"""Fixtures: a repository, an image factory, and the CLI run in-process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from combtest import CliResult, CliRunner, Image, ImageFactory  # noqa: E402

from catalog.repo import Repository  # noqa: E402
from pipeline.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _comb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local engine unless a test says otherwise; no repository or cluster from outside."""
    monkeypatch.setenv("COMB_ENGINE", "local")
    monkeypatch.delenv("COMB_REPO", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    Repository.init(str(path))
    return path


@pytest.fixture
def repo(repo_path: Path) -> Repository:
    return Repository.open(str(repo_path))


@pytest.fixture
def make_image(tmp_path: Path) -> ImageFactory:
    counter = iter(range(1_000_000))

    def make(size: int, name: str | None = None) -> Image:
        return Image(tmp_path / (name or f"disk{next(counter)}.img"), size)

    return make


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Run ``comb`` in this process through ``pipeline.cli.main``; returns (code, out, err)."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture
def history(tmp_path: Path) -> tuple[object, ...]:
    """Four real backups with known changes (catalogtest.make_history): the analytics tests'
    history."""
    from catalogtest import make_history

    return make_history(tmp_path)
