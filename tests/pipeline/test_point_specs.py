"""One point grammar for every command (``catalog.store.points.resolve``): an id, a unique
prefix, ``SOURCE@latest``, ``SOURCE@ID`` or ``SOURCE@PREFIX`` (a point of that source only); an
ambiguous prefix names the points it matches."""

from __future__ import annotations

from pathlib import Path

import pytest
from combtest import (
    CliRunner,
    ImageFactory,
    KiB,
    MiB,
    assert_one_line_error,
    backup_json,
    cmp_files,
)

from catalog.errors import PointNotFound

# Ids by source, and a copy of each point's image by id.
TwoSources = tuple[dict[str, list[str]], dict[str, Path]]


@pytest.fixture
def two_sources(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, tmp_path: Path
) -> TwoSources:
    """Two points of source ``a`` (the image changed between them) and one of ``b``."""
    ids: dict[str, list[str]] = {"a": [], "b": []}
    states: dict[str, Path] = {}
    img = make_image(MiB)
    for name, seed in (("a", 1), ("a", 2), ("b", 3)):
        img.random(0, 128 * KiB, seed=seed)
        pid = str(backup_json(cli, repo_path, img.path, "--source-name", name)["id"])
        ids[name].append(pid)
        states[pid] = img.snapshot(tmp_path / f"state-{pid}.img")
    return ids, states


def test_restore_and_export_take_source_at_id(
    cli: CliRunner, repo_path: Path, tmp_path: Path, two_sources: TwoSources
) -> None:
    ids, states = two_sources
    first = ids["a"][0]
    for spec in (f"a@{first}", f"a@{first[:6]}", f"a@{first.upper()}"):
        out = tmp_path / f"restored-{spec.replace('@', '_')}.img"
        res = cli("-r", repo_path, "restore", spec, out)
        assert res.code == 0, res.err
        cmp_files(states[first], out)
        out = tmp_path / f"exported-{spec.replace('@', '_')}.img"
        res = cli("-r", repo_path, "export", spec, out)
        assert res.code == 0, res.err
        cmp_files(states[first], out)


def test_a_point_of_another_source_is_refused(
    cli: CliRunner, repo_path: Path, tmp_path: Path, two_sources: TwoSources
) -> None:
    ids, _ = two_sources
    out = tmp_path / "x.img"
    for command in ("restore", "export"):
        res = cli("-r", repo_path, command, f"b@{ids['a'][0]}", out)
        assert_one_line_error(res, "of source 'b'", code=PointNotFound.exit_code)
        res = cli("-r", repo_path, command, f"c@{ids['a'][0]}", out)
        assert_one_line_error(res, "no recovery point for source 'c'", code=PointNotFound.exit_code)
        res = cli("-r", repo_path, command, "a@not-hex", out)
        assert_one_line_error(res, "SOURCE@ID", code=PointNotFound.exit_code)
    assert not out.exists()


def test_an_ambiguous_prefix_lists_its_matches(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path, tmp_path: Path
) -> None:
    img = make_image(64 * KiB)
    img.random(0, 100)
    seen: dict[str, str] = {}
    pair: list[str] = []
    for _ in range(17):  # 17 ids over 16 hex digits: two share a first digit
        pid = str(backup_json(cli, repo_path, img.path, "--source-name", "s")["id"])
        if pid[0] in seen:
            pair = [seen[pid[0]], pid]
            break
        seen[pid[0]] = pid
    assert pair
    for spec in (pair[0][0], f"s@{pair[0][0]}"):
        for command in ("restore", "export"):
            res = cli("-r", repo_path, command, spec, tmp_path / "x.img")
            line = assert_one_line_error(res, "ambiguous", code=PointNotFound.exit_code)
            assert all(pid in line for pid in pair), line
