"""`comb init` options: chunk size and compression level are recorded and used."""

from __future__ import annotations

import json
import os
from pathlib import Path

from combtest import CliRunner, ImageFactory, assert_one_line_error, cmp_files

from catalog.errors import RepositoryError


def test_zstd_level_is_recorded_and_used(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory
) -> None:
    img = make_image(4 << 20)
    img.compressible(0, 3 << 20, seed=5)
    stored = {}
    for level in (1, 19):
        repo = tmp_path / f"repo{level}"
        res = cli("-r", repo, "init", "--zstd-level", level)
        assert res.code == 0 and f"zstd level {level}" in res.out
        assert json.loads((repo / "config.json").read_text())["zstd_level"] == level
        out = json.loads(cli("-r", repo, "backup", img.path, "--json").out)
        stored[level] = out["bytes_stored"]
        restored = tmp_path / f"out{level}.img"
        assert cli("-r", repo, "restore", f"{img.path}@latest", restored).code == 0
        cmp_files(restored, img.path)
    assert stored[19] < stored[1]


def test_bad_init_options_are_one_line_errors(cli: CliRunner, tmp_path: Path) -> None:
    res = cli("-r", tmp_path / "a", "init", "--zstd-level", "0")
    assert_one_line_error(res, "zstd level", code=2)
    res = cli("-r", tmp_path / "b", "init", "--chunk-size", "3000")
    assert_one_line_error(res, "chunk size", code=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_init_twice_is_refused(cli: CliRunner, repo_path: Path) -> None:
    assert_one_line_error(cli("-r", repo_path, "init"), "already", code=RepositoryError.exit_code)
    assert os.path.exists(repo_path / "config.json")


def test_new_repositories_use_zstd_1_and_a_config_without_a_level_reads_as_3(
    cli: CliRunner, tmp_path: Path
) -> None:
    from catalog.repo import Repository

    repo = tmp_path / "repo"
    assert cli("-r", repo, "init", "--encryption", "none").code == 0
    config = json.loads((repo / "config.json").read_text())
    assert config["zstd_level"] == 1  # the default since bench/README.md "Compression level"
    del config["zstd_level"]  # FORMAT.md: a missing zstd_level reads as 3
    (repo / "config.json").write_text(json.dumps(config))
    assert Repository.open(str(repo)).config.zstd_level == 3
