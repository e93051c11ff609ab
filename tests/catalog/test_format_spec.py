"""FORMAT.md and the code agree: markers, constants, names and content addressing.

The table readers live in tests/spectables.py; packs, Parquet files and JSON documents have
their own test_format_spec_*.py files.
"""

from __future__ import annotations

import ast
import importlib
import re
from typing import Any

import blake3
import pytest
from spectables import (
    EXAMPLES,
    GOLDEN,
    MARKERS,
    SPEC,
    spec_example,
    spec_table,
)

from catalog.store import index


def test_every_marker_has_a_table() -> None:
    found = set(re.findall(r"<!-- spec:([a-z0-9-]+) -->", SPEC.read_text(encoding="utf-8")))
    assert found == MARKERS
    for name in sorted(MARKERS):
        spec_table(name)


def test_every_example_marker_has_a_code_block() -> None:
    found = set(re.findall(r"<!-- example:([a-z0-9-]+) -->", SPEC.read_text(encoding="utf-8")))
    assert found == EXAMPLES
    for name in sorted(EXAMPLES):
        assert spec_example(name).strip()


# ---------------------------------------------------------------------------------------------
# Constants


def _code_object(path: str) -> Any:
    module, attr = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def test_constants_match_code() -> None:
    for row in spec_table("constants"):
        expected = ast.literal_eval(row["Value"])
        actual = _code_object(row["Code"])
        assert actual == expected, f"{row['Code']}: code has {actual!r}, FORMAT.md {expected!r}"
        if not isinstance(expected, set):
            assert type(actual) is type(expected), row["Code"]


@pytest.mark.parametrize(
    "module",
    [
        "catalog.store.format",
        "catalog.store.packs",
        "catalog.store.parity",
        "catalog.store.points",
        "catalog.store.index",
        "catalog.store.manifest",
        "catalog.store.parquet_io",
        "catalog.store.storage",
        "catalog.repo",
        "catalog.store.crypto",
        "catalog.store.blocks",
    ],
)
def test_every_format_constant_is_in_the_spec(module: str) -> None:
    """A new constant in a format module must be added to FORMAT.md's constants table."""
    documented = {row["Code"].rsplit(".", 1)[1] for row in spec_table("constants")}
    mod = importlib.import_module(module)
    plain = (int, str, bytes, frozenset, tuple)
    names = {
        k
        for k, v in vars(mod).items()
        if k.isupper() and not k.startswith("_") and type(v) in plain
    }
    assert names <= documented, f"{module}: not in FORMAT.md: {sorted(names - documented)}"


# ---------------------------------------------------------------------------------------------
# Names and content addressing

_EXAMPLE_ID = "0123456789abcdef" * 4
_EXAMPLE_POINT = "fedcba9876543210"
_EXAMPLE_RANDOM = "00ff00ff00ff00ff"  # a key or lock id: 16 random hex digits


def _fill(pattern: str) -> str:
    return (
        pattern.replace("<id[0:2]>", _EXAMPLE_ID[:2])
        .replace("<id>", _EXAMPLE_ID)
        .replace("<point id>", _EXAMPLE_POINT)
        .replace("<key id>", _EXAMPLE_RANDOM)
        .replace("<lock id>", _EXAMPLE_RANDOM)
    )


def test_names_table_matches_code() -> None:
    for row in spec_table("names"):
        obj, pattern = _code_object(row["Code"]), row["Name"]
        if callable(obj):
            arg = _EXAMPLE_POINT if "<point id>" in pattern else _EXAMPLE_ID
            if "<key id>" in pattern or "<lock id>" in pattern:
                arg = _EXAMPLE_RANDOM
            assert obj(arg) == _fill(pattern), row["Object"]
        elif "/" in pattern:
            assert pattern.startswith(obj + "/"), row["Object"]
        else:
            assert pattern == obj, row["Object"]
    # The index segment has no name function: the Parquet writer names it under its prefix.
    index_row = next(r for r in spec_table("names") if r["Object"] == "index segment")
    assert index_row["Name"] == f"{index.INDEX_PREFIX}/<id>.parquet"


def _name_regex(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern)
    rx = rx.replace(re.escape("<id[0:2]>"), "(?P<fan>[0-9a-f]{2})")
    rx = rx.replace(re.escape("<id>"), "(?P<id>[0-9a-f]{64})")
    rx = rx.replace(re.escape("<point id>"), "(?P<point>[0-9a-f]{16})")
    rx = rx.replace(re.escape("<key id>"), "[0-9a-f]{16}")
    rx = rx.replace(re.escape("<lock id>"), "[0-9a-f]{16}")
    rx = rx.replace(re.escape("<pid>-<16 hex>"), r"\d+-[0-9a-f]{16}")
    return re.compile(rx)


def test_golden_files_follow_names_and_content_addressing() -> None:
    patterns = {r["Object"]: _name_regex(r["Name"]) for r in spec_table("names")}
    files = sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file())
    kinds: dict[str, int] = {}
    for name in files:
        matches = [(obj, rx.fullmatch(name)) for obj, rx in patterns.items() if rx.fullmatch(name)]
        assert len(matches) == 1, f"{name} matches {len(matches)} name patterns"
        obj, m = matches[0]
        assert m is not None
        kinds[obj] = kinds.get(obj, 0) + 1
        groups = m.groupdict()
        if groups.get("id"):
            digest = blake3.blake3((GOLDEN / name).read_bytes()).hexdigest()
            assert digest == groups["id"], f"{name} is not named by its content"
            if groups.get("fan"):
                assert groups["fan"] == groups["id"][:2]
    assert kinds == {
        "config": 1,
        "pack": 3,
        "index segment": 3,
        "leaves file": 3,
        "root file": 3,
        "point document": 3,
    }
