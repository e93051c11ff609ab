"""The export conformance cases, shared by every format's tests (importable as ``drivetest``):
sparse raw images, a ``FileSource`` over each, and the independent judges (qemu-img check and
compare, dissect.hypervisor)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

from combtest import TEST_PASSWORD, Image, api_backup, need_tool

from catalog.repo import Repository
from drive.formats.export import export_image
from drive.formats.image import VirtualImage


class BytesSource:
    """Bytes in memory as a ``catalog.read.source.BlockSource`` (a damaged copy of an image)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytes(data)

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, buf: memoryview, offset: int) -> None:
        assert 0 <= offset and offset + len(buf) <= len(self.data)
        buf[:] = self.data[offset : offset + len(buf)]


class FileSource:
    """A raw image file as a ``catalog.read.source.MappedSource``: its extents are the file's data
    regions (SEEK_DATA / SEEK_HOLE), widened to ``granularity``."""

    def __init__(self, path: str, granularity: int = 65536) -> None:
        self.path = path
        self._size = os.path.getsize(path)
        self._granularity = granularity
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def size(self) -> int:
        return self._size

    @property
    def granularity(self) -> int:
        return self._granularity

    def extents(self) -> list[tuple[int, int]]:
        g, pos = self._granularity, 0
        out: list[tuple[int, int]] = []
        while pos < self._size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            lo, hi = start // g * g, min(self._size, -(-end // g) * g)
            if out and out[-1][0] + out[-1][1] >= lo:
                lo = out[-1][0]
                out.pop()
            out.append((lo, hi - lo))
            pos = end
        return out

    def read_into(self, buf: memoryview, offset: int) -> None:
        n = os.preadv(self._fd, [buf], offset)
        buf[n:] = bytes(len(buf) - n)

    def close(self) -> None:
        os.close(self._fd)


MiB = 1 << 20
GiB = 1 << 30


def _write(path: Path, size: int, runs: list[tuple[int, int]], seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off, n in runs:
            fh.seek(off)
            data = bytearray(rng.randbytes(n))
            data[: n // 4] = b"comb" * (n // 16)  # compressible too
            fh.write(data)
    return path


# name -> (size, data runs): every format is checked on each.
CASES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "empty": (64 * MiB, []),
    "sparse-mixed": (
        96 * MiB,
        [(0, 3 * MiB), (5 * MiB + 64 * 1024, 128 * 1024), (40 * MiB, 7 * MiB), (90 * MiB, MiB)],
    ),
    # Not a multiple of the chunk size, nor of 1 MiB or 2 MiB blocks; data in the last chunk.
    "odd-size": (33 * MiB + 12_800, [(MiB, 4096), (33 * MiB - 512, 13_312)]),
    "over-4g": (
        5 * GiB + 3 * MiB,
        [(0, MiB), (4 * GiB - 64 * 1024, 256 * 1024), (5 * GiB, 2 * MiB)],
    ),
}


def make_case(tmp: Path, name: str, seed: int = 1) -> tuple[Path, FileSource]:
    size, runs = CASES[name]
    raw = _write(tmp / f"{name}.raw", size, runs, seed)
    return raw, FileSource(str(raw))


def qemu_check(path: Path, fmt: str) -> None:
    """``qemu-img check`` must report no errors (formats qemu can check)."""
    qemu = need_tool("qemu-img")
    res = subprocess.run([qemu, "check", "-f", fmt, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def qemu_compare(raw: Path, image: Path, fmt: str) -> None:
    """``qemu-img compare`` says the images are identical, and ``qemu-img info`` gives the
    image exactly the raw disk's size (compare alone accepts a longer image ending in zeros;
    its strict mode also compares allocation, which a chunk-granular export rounds up)."""
    import json

    qemu = need_tool("qemu-img")
    res = subprocess.run(
        [qemu, "compare", "-f", "raw", "-F", fmt, str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr
    info = subprocess.run(
        [qemu, "info", "--output", "json", "-f", fmt, str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == raw.stat().st_size


def export(image: VirtualImage, out: Path) -> Path:
    export_image(image, str(out))
    return out


def same_through(reader_open: Callable[[object], object], raw: Path, image: Path) -> None:
    """An independent reader (e.g. dissect.hypervisor) reads the image back byte-identical:
    ``reader_open(file object)`` returns an object with ``read(n)`` and ``seek(off)``."""
    with open(raw, "rb") as want, open(image, "rb") as fh:
        disk = reader_open(fh)
        block = 4 * MiB
        size = raw.stat().st_size
        pos = 0
        while pos < size:
            disk.seek(pos)  # type: ignore[attr-defined]
            got = disk.read(min(block, size - pos))  # type: ignore[attr-defined]
            assert got == want.read(min(block, size - pos)), f"differs in [{pos}, +{block})"
            pos += block


OVERLAY_CHUNK = 64 * 1024
OVERLAY_SIZE = 4 << 20
OVERLAY_SOURCE = "vm1"


def overlay_disk(tmp_path: Path) -> tuple[Path, Image, str]:
    """A repository with one backup of a 4 MiB image (data at 0 and past 2 MiB) to put
    overlays on: (repository, image, point id)."""
    img = Image(tmp_path / "disk.img", OVERLAY_SIZE)
    img.random(0, 1 << 20, seed=1)
    img.random(2 * (1 << 20) + 4096, 300_000, seed=2)
    repo = Repository.init(str(tmp_path / "repo"), OVERLAY_CHUNK, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name=OVERLAY_SOURCE)
    return tmp_path / "repo", img, point.id
