"""Raw export: the disk itself, holes kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from drivetest import CASES, export, make_case, qemu_compare

from drive.formats.image import raw_image


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_export_is_identical_and_sparse(tmp_path: Path, case: str) -> None:
    raw, src = make_case(tmp_path, case)
    out = export(raw_image(src), tmp_path / "out.img")
    qemu_compare(raw, out, "raw")
    assert os.stat(out).st_blocks * 512 <= os.stat(raw).st_blocks * 512 + (1 << 20)


def test_random_reads_match_the_disk(tmp_path: Path) -> None:
    raw, src = make_case(tmp_path, "odd-size")
    img = raw_image(src)
    data = raw.read_bytes()
    for off, n in [(0, 10), (MiB := 1 << 20, 4096), (len(data) - 100, 500), (12345, 3 * MiB)]:
        assert img.read(off, n) == data[off : off + n]
