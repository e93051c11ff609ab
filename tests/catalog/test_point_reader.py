"""A point's reader (``Repository.reader``, catalog.read.point.PointSource): random reads of a
recovery point equal the image that was backed up; reads into a caller's buffer fill it whole,
zeros included."""

from __future__ import annotations

from pathlib import Path

import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    MiB,
    api_backup,
    assert_one_line_error,
    flip_byte,
    repo_files,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import CorruptionError
from catalog.read.point import PointSource
from catalog.repo import Repository

SIZE = 6 * MiB + 777


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, bytes, str]:
    tmp = tmp_path_factory.mktemp("src")
    img = Image(tmp / "d.img", SIZE)
    img.random(100_000, 2 * MiB, seed=4)
    img.compressible(5 * MiB, MiB + 777, seed=5)
    repo = Repository.init(str(tmp / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path)
    return repo, img.path.read_bytes(), point.id


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(offset=st.integers(0, SIZE + 10), length=st.integers(0, 3 * MiB))
def test_any_read_equals_the_image(setup, offset: int, length: int) -> None:  # type: ignore[no-untyped-def]
    repo, data, pid = setup
    src = PointSource(repo.storage, next(p for p in repo.points() if p.id == pid), cache_chunks=4)
    assert src.read(offset, length) == data[offset : offset + length]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(offset=st.integers(0, SIZE), length=st.integers(1, 3 * MiB))
def test_read_into_fills_a_used_buffer_whole(setup, offset: int, length: int) -> None:  # type: ignore[no-untyped-def]
    """Holes are written as zeros: a backup of an overlay reads into a reused buffer."""
    repo, data, pid = setup
    length = min(length, SIZE - offset)
    src = repo.reader(next(p for p in repo.points() if p.id == pid), cache_chunks=4)
    buf = bytearray(b"\xaa" * length)
    src.read_into(memoryview(buf), offset)
    assert bytes(buf) == data[offset : offset + length]


def test_read_into_refuses_bytes_past_the_end(setup) -> None:  # type: ignore[no-untyped-def]
    repo, _data, pid = setup
    src = repo.reader(next(p for p in repo.points() if p.id == pid))
    with pytest.raises(ValueError, match="not all on the disk"):
        src.read_into(memoryview(bytearray(10)), SIZE - 5)


def test_extents_cover_all_data(setup) -> None:  # type: ignore[no-untyped-def]
    repo, data, pid = setup
    src = repo.reader(next(p for p in repo.points() if p.id == pid))
    covered = bytearray(len(data))
    for off, n in src.extents():
        assert off % src.granularity == 0 and off + n <= src.size
        covered[off : off + n] = data[off : off + n]
    assert bytes(covered) == data


def test_a_damaged_chunk_is_an_error_naming_the_point(cli: CliRunner, tmp_path: Path) -> None:
    img = Image(tmp_path / "d.img", 2 * MiB)
    img.random(0, 2 * MiB, seed=6)
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path)
    flip_byte(repo_files(Path(repo.location), "packs")[0], 100)
    with pytest.raises(CorruptionError, match=point.id):
        repo.reader(point).read(0, 2 * MiB)
    res = cli("-r", repo.location, "export", point.id, tmp_path / "o.img")
    assert_one_line_error(res, point.id, code=7)
    assert not (tmp_path / "o.img").exists()
