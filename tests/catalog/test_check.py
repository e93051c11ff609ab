"""check_repository: clean repositories pass; damage is an error naming path and offset;
leftovers of interrupted writes are warnings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, ImageFactory, KiB, api_backup, flip_byte, repo_files

from catalog.maint.check import check_repository, summary
from catalog.repo import Repository
from catalog.store.index import load_index
from catalog.store.packs import pack_name


@pytest.fixture
def backed_up(repo_path: Path, make_image: ImageFactory) -> Path:
    img = make_image(2 * 1024 * KiB + 5000)
    img.random(0, 200 * KiB, seed=1)
    img.compressible(700 * KiB, 300 * KiB, seed=2)
    img.zeros(1200 * KiB, 128 * KiB)
    img.random(2 * 1024 * KiB, 5000, seed=3)
    api_backup(repo_path, img.path)
    img.random(100 * KiB, 64 * KiB, seed=4)
    api_backup(repo_path, img.path)
    return repo_path


def _storage(repo: Path) -> Repository:
    return Repository.open(str(repo), password=TEST_PASSWORD)


def test_clean_repository(backed_up: Path) -> None:
    r = _storage(backed_up)
    report = check_repository(r.storage, read_data=True)
    assert report.ok, report.errors
    assert report.warnings == []
    assert report.points == 2
    index = load_index(r.storage)
    assert report.chunks == index.num_rows
    assert report.packs == len(set(index.column("pack").to_pylist()))
    packs = repo_files(backed_up, "packs")
    assert report.packs == len(packs)
    assert report.bytes_checked == sum(p.stat().st_size for p in packs)
    assert summary(report).endswith("clean")
    structure = check_repository(r.storage)
    assert structure.ok and structure.bytes_checked == 0 and structure.points == 2


def test_leftovers_are_warnings_not_errors(backed_up: Path) -> None:
    (backed_up / "tmp" / "123-abc.tmp").write_bytes(b"half a pack")
    orphan = backed_up / "packs" / "ee" / ("ee" * 32 + ".pack")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"not in any index")
    report = check_repository(_storage(backed_up).storage, read_data=True)
    assert report.ok, report.errors
    assert len(report.warnings) == 2
    assert any("temporary file" in w for w in report.warnings)
    assert any("ee" * 8 in w and "not in the index" in w for w in report.warnings)
    assert "2 warning(s)" in summary(report)


def _chunk_location(repo: Path) -> tuple[Path, int, int]:
    index = load_index(_storage(repo).storage).sort_by("stored_len")
    row = index.slice(index.num_rows - 1).to_pylist()[0]
    return repo / pack_name(row["pack"]), row["offset"], row["stored_len"]


def test_flipped_chunk_byte_names_pack_path_and_offset(backed_up: Path) -> None:
    path, offset, length = _chunk_location(backed_up)
    flip_byte(path, offset + length // 2)
    report = check_repository(_storage(backed_up).storage, read_data=True)
    assert not report.ok
    assert any(f"pack {path} offset {offset}:" in e for e in report.errors), report.errors
    assert any(f"pack {path} does not match its name" in e for e in report.errors)
    assert "error(s)" in summary(report)


def test_missing_and_truncated_packs(backed_up: Path) -> None:
    packs = repo_files(backed_up, "packs")
    assert len(packs) >= 2
    os.unlink(packs[0])
    with open(packs[1], "r+b") as fh:
        fh.truncate(packs[1].stat().st_size // 2)
    report = check_repository(_storage(backed_up).storage)
    assert any(f"pack {packs[0]} is missing" in e for e in report.errors), report.errors
    assert any(f"pack {packs[1]} is shorter than its index says" in e for e in report.errors)
    deep = check_repository(_storage(backed_up).storage, read_data=True)
    assert any(str(packs[1]) in e for e in deep.errors)


def test_point_whose_chunks_left_the_index(backed_up: Path) -> None:
    for seg in repo_files(backed_up, "index"):
        os.unlink(seg)
    report = check_repository(_storage(backed_up).storage)
    assert not report.ok
    assert sum("not in the index" in e for e in report.errors) == 2


def test_missing_manifest_file_is_an_error(backed_up: Path) -> None:
    roots = repo_files(backed_up, "manifests/roots")
    os.unlink(roots[0])
    report = check_repository(_storage(backed_up).storage)
    assert len(report.errors) == 1
    assert roots[0].stem in report.errors[0]
    assert report.points == 1


def test_progress_is_reported_per_pack(backed_up: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = check_repository(
        _storage(backed_up).storage, read_data=True, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i + 1, report.packs) for i in range(report.packs)]
