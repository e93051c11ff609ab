"""Errors that name the way out: a damaged index segment names ``comb repair index``."""

from __future__ import annotations

from pathlib import Path

from combtest import CliRunner, ImageFactory, MiB, assert_one_line_error, flip_byte, repo_files

CORRUPTION = 7


def test_a_damaged_index_segment_names_the_repair(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(4 * MiB)
    img.random(0, 2 * MiB)
    assert cli("-r", repo_path, "backup", img.path, "--source-name", "d").code == 0
    (segment,) = repo_files(repo_path, "index")
    flip_byte(segment, segment.stat().st_size // 2)
    hint = "`comb repair index` rebuilds the index from the packs"
    for args in (
        ["backup", img.path, "--source-name", "d"],
        ["restore", "d@latest", tmp_path / "out"],
    ):
        res = cli("-r", repo_path, *args)
        assert_one_line_error(res, hint, code=CORRUPTION)
        assert "index/" in res.err  # it names the damaged file
    assert cli("-r", repo_path, "repair", "index").code == 0
    assert cli("-r", repo_path, "restore", "d@latest", tmp_path / "out").code == 0
    assert (tmp_path / "out").read_bytes() == img.path.read_bytes()


def test_a_damaged_point_document_is_damage_not_a_missing_point(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(2 * MiB)
    img.random(0, MiB)
    for _ in range(2):
        assert cli("-r", repo_path, "backup", img.path, "--source-name", "d").code == 0
    docs = sorted((repo_path / "points").glob("*.json"), key=lambda p: p.stat().st_mtime)
    flip_byte(docs[-1], 40)
    damaged = docs[-1].stem
    for spec in (damaged, damaged[:8], f"d@{damaged[:8]}"):
        res = cli("-r", repo_path, "restore", spec, tmp_path / "out")
        assert_one_line_error(
            res, f"the document of recovery point {damaged} is damaged", code=CORRUPTION
        )
    assert (
        cli("-r", repo_path, "restore", "nosuchid", tmp_path / "out").code == 4
    )  # still not found
    assert cli("-r", repo_path, "restore", docs[0].stem, tmp_path / "out").code == 0
