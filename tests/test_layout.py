"""The layout rules a newcomer relies on (ARCHITECTURE.md): every module of the packages is
short enough to read in one sitting and says what it owns in a docstring. The import rules are
checked by ``lint-imports`` (pyproject.toml), complexity by ruff."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("catalog", "drive", "stages", "pipeline", "bench")
MAX_LINES = 420  # "about 400": split a module before it passes this


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_is_too_long() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_every_module_says_what_it_owns() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()
    ]
    assert missing == []
