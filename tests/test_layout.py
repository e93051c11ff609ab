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


# Where repository files are reached through the storage interface only (catalog.store.storage:
# a second storage must be a drop-in): no file call of their own.
STORAGE_ONLY = ("catalog/repo.py", "catalog/maint/*.py", "drive/overlays/*.py")
_OS_NAMES = {"path", "sep", "getpid", "environ", "strerror"}  # no file is touched through these
_OS_PATH_NAMES = {"abspath", "join", "dirname", "basename", "normpath", "split", "splitext"}
_FILE_MODULES = {"fcntl", "shutil", "pathlib", "mmap", "io", "tempfile", "glob"}


def _file_calls(tree: ast.AST) -> list[str]:
    """``open(``, ``os.X`` / ``os.path.X`` that can touch a file, and file modules imported."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "open":
                found.append((node.lineno, "open()"))
        elif isinstance(node, ast.Attribute) and _is_os(node.value, "os"):
            if node.attr not in _OS_NAMES:
                found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Attribute) and _is_os(node.value, "os.path"):
            if node.attr not in _OS_PATH_NAMES:
                found.append((node.lineno, f"os.path.{node.attr}"))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name.split(".")[0] in _FILE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
            allowed = _OS_NAMES if node.module == "os" else _OS_PATH_NAMES
            found += [
                (node.lineno, f"import {node.module}.{a.name}")
                for a in node.names
                if a.name not in allowed
            ]
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FILE_MODULES
        ):
            found.append((node.lineno, f"import {node.module}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def _is_os(node: ast.expr, dotted: str) -> bool:
    """Whether ``node`` is the name ``os`` or the attribute ``os.path``."""
    if dotted == "os":
        return isinstance(node, ast.Name) and node.id == "os"
    return isinstance(node, ast.Attribute) and node.attr == "path" and _is_os(node.value, "os")


def test_repository_files_are_reached_through_the_storage_only() -> None:
    offenders = {
        str(p.relative_to(ROOT)): calls
        for pattern in STORAGE_ONLY
        for p in sorted(ROOT.glob(pattern))
        if (calls := _file_calls(ast.parse(p.read_text())))
    }
    assert offenders == {}


def test_the_storage_only_check_finds_file_calls() -> None:
    bad = (
        "import fcntl\nfrom os import listdir\nfrom pathlib import Path\n"
        "os.open(p, 0)\nopen(p)\nos.scandir(p)\nos.path.isdir(p)\nos.pwrite(fd, b'', 0)\n"
        "x = os.path.join(a, b)\ny = os.path.abspath(a)\nfrom os.path import join\n"
    )
    assert _file_calls(ast.parse(bad)) == [
        "1: import fcntl",
        "2: import os.listdir",
        "3: import pathlib",
        "4: os.open",
        "5: open()",
        "6: os.scandir",
        "7: os.path.isdir",
        "8: os.pwrite",
    ]
