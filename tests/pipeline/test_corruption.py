"""Bit flips in every kind of repository file: reported precisely, in one line, never silent.

A flipped byte inside a stored chunk must make `verify --read-data` and `restore` fail naming
the pack path and the chunk's offset. A flipped byte in a point document, a root, a leaves file
or an index segment must give a one-line error (no traceback, no internal error), and must never
make a restore silently produce different bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from combtest import (
    PYTHON,
    TEST_PASSWORD,
    CliRunner,
    ImageFactory,
    KiB,
    MiB,
    assert_one_line_error,
    backup_json,
    cmp_files,
    flip_byte,
    repo_files,
)

from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store.format import CODEC_RAW, CODEC_ZSTD
from catalog.store.index import load_index
from catalog.store.packs import pack_name


@dataclass
class Backed:
    repo: Path
    image: Path
    point: str
    tmp: Path


@pytest.fixture
def backed(cli: CliRunner, make_image: ImageFactory, tmp_path: Path) -> Backed:
    """A plain repository: these tests flip bytes of the version-1 format's JSON and Parquet
    (an encrypted repository's tampering cases are in test_encryption.py)."""
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init", "--encryption", "none").code == 0
    img = make_image(3 * MiB + 100, "disk.img")
    img.random(0, 192 * KiB, seed=1)
    img.compressible(MiB, 192 * KiB, seed=2)
    img.random(3 * MiB, 100, seed=3)
    pid = str(backup_json(cli, repo, img.path, "--workers", "1")["id"])
    return Backed(repo, img.path, pid, tmp_path)


def _chunk(repo: Path, codec: int) -> tuple[Path, int, int]:
    index = load_index(Repository.open(str(repo), password=TEST_PASSWORD).storage).to_pylist()
    row = next(r for r in index if r["codec"] == codec and r["stored_len"] > 64)
    return repo / pack_name(row["pack"]), row["offset"], row["stored_len"]


@pytest.mark.parametrize("codec", [CODEC_ZSTD, CODEC_RAW], ids=["zstd", "raw"])
def test_flipped_chunk_byte_is_named_by_pack_path_and_offset(
    cli: CliRunner, backed: Backed, codec: int
) -> None:
    pack, offset, length = _chunk(backed.repo, codec)
    flip_byte(pack, offset + length // 2)
    res = cli("-r", backed.repo, "verify", "--read-data")
    assert res.code == CorruptionError.exit_code
    assert "Traceback" not in res.err
    assert f"pack {pack} offset {offset}:" in res.err + res.out
    assert res.err.strip().splitlines()[-1].startswith("comb: error: verify found")
    out = backed.tmp / "out.img"
    res = cli("-r", backed.repo, "restore", backed.point, out)
    assert_one_line_error(res, f"pack {pack} offset {offset}", code=CorruptionError.exit_code)
    assert not out.exists()
    assert not [p for p in backed.tmp.iterdir() if p.name.startswith("out.img")]


def test_verify_json_lists_the_damage(cli: CliRunner, backed: Backed) -> None:
    pack, offset, length = _chunk(backed.repo, CODEC_RAW)
    flip_byte(pack, offset)
    res = cli("-r", backed.repo, "verify", "--read-data", "--json")
    assert res.code == CorruptionError.exit_code
    doc = json.loads(res.out)
    assert doc["ok"] is False
    assert any(f"pack {pack} offset {offset}:" in e for e in doc["errors"])


def test_structure_check_finds_a_truncated_pack(cli: CliRunner, backed: Backed) -> None:
    (pack,) = repo_files(backed.repo, "packs")
    with open(pack, "r+b") as fh:
        fh.truncate(pack.stat().st_size // 2)  # into the chunk data
    res = cli("-r", backed.repo, "verify")
    assert res.code == CorruptionError.exit_code
    assert f"pack {pack} is shorter than its index says" in res.err
    res = cli("-r", backed.repo, "restore", backed.point, backed.tmp / "o")
    assert_one_line_error(res, str(pack), code=CorruptionError.exit_code)


def test_flipped_pack_trailer(cli: CliRunner, backed: Backed) -> None:
    (pack,) = repo_files(backed.repo, "packs")
    flip_byte(pack, pack.stat().st_size - 3)
    res = cli("-r", backed.repo, "verify", "--read-data")
    assert res.code == CorruptionError.exit_code
    assert f"pack {pack} has a bad trailer" in res.err


def _verify_names(cli: CliRunner, b: Backed, needle: str) -> None:
    """verify fails with one `comb: error:` line; its report names the damaged file."""
    res = cli("-r", b.repo, "verify")
    assert_one_line_error(res, code=CorruptionError.exit_code)
    assert needle in res.err, res.err


def _restore_fails_cleanly_or_is_exact(cli: CliRunner, b: Backed) -> None:
    """A restore either fails in one line, or (the damage did not matter) gives the image."""
    out = b.tmp / "o.img"
    res = cli("-r", b.repo, "restore", b.point, out)
    if res.code == 0:
        cmp_files(b.image, out)
        out.unlink()
    else:
        assert_one_line_error(res)
        assert not out.exists()


def _flip_text(path: Path, text: bytes, delta: int = 0) -> None:
    raw = path.read_bytes()
    pos = raw.index(text) + delta
    flip_byte(path, pos)


@pytest.mark.parametrize(
    ("key", "delta"),
    [(b'"bytes_read": ', 14), (b'"stats"', 1), (b'"root"', 1), (b'"version"', 2), (b"{", 0)],
    ids=["value", "stats", "root", "version", "brace"],
)
def test_point_document_flip(cli: CliRunner, backed: Backed, key: bytes, delta: int) -> None:
    """A damaged point document is skipped with a warning naming it, never used."""
    (doc,) = repo_files(backed.repo, "points")
    _flip_text(doc, key, delta)
    res = cli("-r", backed.repo, "restore", backed.point, backed.tmp / "o.img")
    # Named as damage (exit 7), not as a point that does not exist.
    assert_one_line_error(res, f"the document of recovery point {backed.point} is damaged", code=7)
    assert f"comb: warning: skipping {doc}" in res.err
    assert not (backed.tmp / "o.img").exists()
    res = cli("-r", backed.repo, "points", "--json")
    assert res.code == 0 and json.loads(res.out)["points"] == []
    assert str(doc) in res.err and "Traceback" not in res.err
    _verify_names(cli, backed, str(doc))


@pytest.mark.parametrize("prefix", ["manifests/roots", "manifests/leaves", "index"])
@pytest.mark.parametrize("where", ["data", "middle", "footer"])
def test_parquet_byte_flip(cli: CliRunner, backed: Backed, prefix: str, where: str) -> None:
    (path,) = repo_files(backed.repo, prefix)
    size = path.stat().st_size
    pos = {"data": 12, "middle": size // 2, "footer": size - 40}[where]
    flip_byte(path, pos)
    _verify_names(cli, backed, str(path))
    _restore_fails_cleanly_or_is_exact(cli, backed)


def test_index_column_name_flip(cli: CliRunner, backed: Backed) -> None:
    """A damaged column name in the index footer: one line naming the segment."""
    (seg,) = repo_files(backed.repo, "index")
    raw = seg.read_bytes()
    for pos in [raw.index(b"chunk_id"), raw.rindex(b"chunk_id")]:
        flip_byte(seg, pos + 2)
        _verify_names(cli, backed, str(seg))
        _restore_fails_cleanly_or_is_exact(cli, backed)
        flip_byte(seg, pos + 2)


def test_missing_manifest_files(cli: CliRunner, backed: Backed) -> None:
    for prefix in ("manifests/leaves", "manifests/roots", "index"):
        (path,) = repo_files(backed.repo, prefix)
        data = path.read_bytes()
        path.unlink()
        res = cli("-r", backed.repo, "restore", backed.point, backed.tmp / "o.img")
        # A missing index segment cannot be named: its chunks are what is missing.
        assert_one_line_error(res, "not in the index" if prefix == "index" else path.stem[:16])
        res = cli("-r", backed.repo, "verify")
        assert_one_line_error(res, code=CorruptionError.exit_code)
        path.write_bytes(data)
    res = cli("-r", backed.repo, "restore", backed.point, backed.tmp / "ok.img")
    assert res.code == 0
    cmp_files(backed.image, backed.tmp / "ok.img")


# Flips every byte of one file in turn, in a child process (a crash must not take pytest down),
# and classifies each flip: verify must report it (every metadata file is named by its content),
# and a restore must fail with a CombError or give the exact image ("silent" otherwise).
# "escaped": a non-comb exception left the catalog.
SWEEP = textwrap.dedent(
    r"""
    import json, os, sys
    from catalog.maint.check import check_repository
    from catalog.errors import CombError
    from catalog.repo import Repository
    from pipeline.jobs.restore import restore_point

    repo, target, image, out, start, stride, password = sys.argv[1:8]
    expected = open(image, "rb").read()
    size = os.path.getsize(target)
    point = Repository.open(repo, password=password).points()[0]
    result = {"undetected": [], "silent": [], "escaped": []}
    for pos in range(int(start), size, int(stride)):
        print(f"pos {pos}", file=sys.stderr, flush=True)
        with open(target, "r+b") as fh:
            fh.seek(pos)
            old = fh.read(1)
            fh.seek(pos)
            fh.write(bytes([old[0] ^ 0x01]))
        try:
            r = Repository.open(repo, password=password)
            try:
                if check_repository(r.storage).ok:
                    result["undetected"].append(pos)
            except CombError:
                pass
            try:
                if os.path.exists(out):
                    os.unlink(out)
                restore_point(r, point, out)
                if open(out, "rb").read() != expected:
                    result["silent"].append(pos)
            except CombError:
                pass
        except Exception as err:
            result["escaped"].append([pos, type(err).__name__, str(err)[:100]])
        finally:
            with open(target, "r+b") as fh:
                fh.seek(pos)
                fh.write(old)
    print(json.dumps(result))
    """
)


def _sweep(b: Backed, target: Path, stride: int) -> tuple[dict[str, list[object]], list[str]]:
    """Run the sweep; after a crash, note where and go on from the next byte."""
    original = target.read_bytes()
    total: dict[str, list[object]] = {"undetected": [], "silent": [], "escaped": []}
    crashes: list[str] = []
    start = 0
    while start < len(original):
        target.write_bytes(original)
        proc = subprocess.run(
            [
                PYTHON, "-c", SWEEP, str(b.repo), str(target), str(b.image),
                str(b.tmp / "sweep.img"), str(start), str(stride), TEST_PASSWORD,
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "COMB_ENGINE": "local"},
        )  # fmt: skip
        if proc.returncode == 0:
            for key, values in json.loads(proc.stdout).items():
                total[key] += values
            break
        positions = [ln for ln in proc.stderr.splitlines() if ln.startswith("pos ")]
        assert positions, proc.stderr[-500:]
        crashed_at = int(positions[-1].split()[1])
        tail = [ln for ln in proc.stderr.splitlines() if not ln.startswith("pos ")]
        crashes.append(f"byte {crashed_at}: exit {proc.returncode}: {' | '.join(tail[-2:])}")
        start = crashed_at + stride
    target.write_bytes(original)
    return total, crashes


@pytest.mark.parametrize(
    ("prefix", "stride"),
    [("manifests/roots", 1), ("manifests/leaves", 1), ("index", 5), ("points", 16)],
)
def test_no_flipped_byte_goes_unnoticed_or_crashes(
    backed: Backed, prefix: str, stride: int
) -> None:
    (target,) = repo_files(backed.repo, prefix)
    result, crashes = _sweep(backed, target, stride)
    name = f"{prefix}/{target.name}"
    assert crashes == [], f"{name}: the process died on a flipped byte: {crashes}"
    assert result["escaped"] == [], f"{name}: untranslated exceptions {result['escaped'][:3]}"
    assert result["silent"] == [], (
        f"{name}: restore gave wrong bytes for flips at {result['silent']}"
    )
    assert result["undetected"] == [], f"{name}: verify missed flips at {result['undetected'][:20]}"
