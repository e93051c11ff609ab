"""Image sources: holes found with SEEK_DATA are never read; short reads are errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from combtest import ImageFactory, KiB, MiB

from catalog.errors import SourceError
from stages.sources.image import ImageSource, OpenSource


def test_data_extents_skip_holes(make_image: ImageFactory) -> None:
    img = make_image(10 * MiB + 123)
    img.random(3 * MiB, 5000, seed=1)  # one 8 KiB block pair on a 4 KiB-block filesystem
    img.zeros(7 * MiB, 70000)  # written zeros are data as far as the file system knows
    src = ImageSource(str(img.path)).open()
    try:
        assert src.size == 10 * MiB + 123
        ext = src.data_extents(0, src.size)
        assert len(ext) == 2
        (a, alen), (b, blen) = ext
        assert a <= 3 * MiB and a + alen >= 3 * MiB + 5000 and alen <= 64 * KiB
        assert b <= 7 * MiB and b + blen >= 7 * MiB + 70000 and blen <= 128 * KiB
        # A window: only what lies inside [start, end).
        assert src.data_extents(4 * MiB, 8 * MiB) == [(b, blen)]
        assert src.data_extents(0, 2 * MiB) == []
        assert src.data_extents(3 * MiB + 4096, 7 * MiB + 4096) == [
            (3 * MiB + 4096, a + alen - 3 * MiB - 4096),
            (b, 4096),
        ]
    finally:
        src.close()


def test_all_hole_and_empty_sources(make_image: ImageFactory) -> None:
    for size in (0, 5 * MiB):
        src = OpenSource(str(make_image(size).path))
        assert src.size == size
        assert src.data_extents(0, size) == []
        src.close()


def test_data_at_the_unaligned_end(make_image: ImageFactory) -> None:
    img = make_image(MiB + 100)
    img.random(MiB + 10, 90)
    src = OpenSource(str(img.path))
    (ext,) = src.data_extents(0, src.size)
    assert ext[0] <= MiB + 10 and ext[0] + ext[1] == MiB + 100
    src.close()


def test_read_into_reads_exact_bytes(make_image: ImageFactory) -> None:
    img = make_image(MiB)
    data = img.random(1000, 300_000, seed=2)
    src = OpenSource(str(img.path))
    buf = bytearray(300_000)
    src.read_into(memoryview(buf), 1000)
    assert bytes(buf) == data
    src.close()


def test_short_read_is_a_source_error(make_image: ImageFactory) -> None:
    img = make_image(MiB)
    src = OpenSource(str(img.path))
    img.resize(MiB // 2)
    with pytest.raises(SourceError, match=f"ended at offset {MiB // 2}"):
        src.read_into(memoryview(bytearray(MiB)), 0)
    src.close()


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open source .*missing"):
        OpenSource(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="is a directory"):
        OpenSource(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file or block device"):
        OpenSource(str(fifo))


def test_image_source_is_plain_configuration(tmp_path: Path) -> None:
    import pickle

    s = ImageSource("/some/where.img")
    assert pickle.loads(pickle.dumps(s)) == s
    assert s.describe() == "/some/where.img"
