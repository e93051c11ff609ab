"""Block lists (catalog.store.blocks, FORMAT.md 7.1): a served point's first read checks only the
blocks of its leaves file and index segment it reads, not the whole files, for a full backup
and for an incremental whose chunks sit in the full backup's segment; a damaged block is
reported by the read that needs it; a damaged or missing block list only costs a whole-file
check (verify warns); prune removes block lists with their files.

Blocks here are 4 KiB, ranges 512 rows, row groups of leaves 512 rows and packs 1 MiB (block
and range sizes are the list's own, FORMAT.md 7.1; the others writer policy), so a small disk
has files of many blocks and row groups."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from combtest import TEST_PASSWORD, CliRunner, Image, MiB, api_backup, flip_byte

from catalog.errors import CorruptionError
from catalog.read import lookup
from catalog.read.lookup import SegmentCache, segment_name
from catalog.read.point import PointSource
from catalog.read.spans import MapOptions
from catalog.repo import Repository
from catalog.store import blocks, manifest, parquet_io
from catalog.store.blocks import VerifiedFile, block_list_name
from catalog.store.leaves import leaves_name
from catalog.store.points import RecoveryPoint

C = 4096  # chunk size: many rows on a small disk
SIZE = 160 * MiB
DEDUP_AT = 100 * MiB


@dataclass
class History:
    repo: Repository
    full: RecoveryPoint
    incr: RecoveryPoint
    images: dict[str, bytes]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    mp = pytest.MonkeyPatch()
    mp.setattr(blocks, "BLOCK_BYTES", 4096)
    mp.setattr(blocks, "RANGE_ROWS", 512)
    mp.setattr(manifest, "LEAF_ROW_GROUP_ROWS", 512)  # (writer policies: many row groups)
    tmp = tmp_path_factory.mktemp("blocks")
    repo = Repository.init(str(tmp / "repo"), C, 3, password=TEST_PASSWORD)
    img = Image(tmp / "disk.img", SIZE)
    img.random(0, SIZE, seed=1)
    full = api_backup(repo.location, img.path, pack_target_bytes=MiB)
    images = {full.id: img.path.read_bytes()}
    img.take_changes()
    img.random(20 * MiB, 64 * 1024, seed=2)
    img.write(DEDUP_AT, images[full.id][:C])  # a chunk the full backup stored at offset 0
    incr = api_backup(
        repo.location, img.path, img.changes_file(tmp / "c.json"), pack_target_bytes=MiB
    )
    images[incr.id] = img.path.read_bytes()
    mp.undo()
    yield History(repo, full, incr, images)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Blocks read through block lists, per file, and files read whole; tables are not built
    in the background (that reads a segment whole, after the first read)."""
    seen: dict[str, Any] = {"blocks": {}, "whole": []}
    block = VerifiedFile._block

    def counting(self: VerifiedFile, b: int) -> bytes:
        seen["blocks"].setdefault(self._name, set()).add(b)
        return block(self, b)

    whole = parquet_io.read_verified

    def recording(storage: Any, name: str) -> bytes:
        seen["whole"].append(name)
        return whole(storage, name)

    monkeypatch.setattr(VerifiedFile, "_block", counting)
    monkeypatch.setattr(parquet_io, "read_verified", recording)
    monkeypatch.setattr(lookup, "read_verified", recording)
    monkeypatch.setattr(lookup, "_FILTERED_BYTES", 0)
    monkeypatch.setattr(SegmentCache, "_build", lambda self, scan: None)
    return seen


def _copy(history: History, tmp_path: Path) -> tuple[Path, Repository]:
    """A copy of the history's repository, to damage."""
    shutil.copytree(history.repo.location, tmp_path / "repo")
    return tmp_path / "repo", Repository.open(str(tmp_path / "repo"), password=TEST_PASSWORD)


def _blocks_of(repo: Repository, name: str) -> int:
    return -(-repo.storage.size(name) // 4096)


@pytest.mark.parametrize("which", ["full", "incr"])
def test_a_first_read_checks_only_the_blocks_it_reads(
    history: History, counted: dict[str, Any], which: str
) -> None:
    point = getattr(history, which)
    src = PointSource(history.repo.storage, point, maps=MapOptions(segments=SegmentCache()))
    at = 90 * MiB + 123
    assert src.read(at, 4096) == history.images[point.id][at : at + 4096]
    assert not [n for n in counted["whole"] if n.startswith(("index/", "manifests/leaves"))]
    full_leaves = leaves_name(history.full.leaves or "")
    full_segment = segment_name(history.full.index_segment or "")
    for name in (full_leaves, full_segment):  # the big files: the full backup's
        read, total = len(counted["blocks"].get(name, ())), _blocks_of(history.repo, name)
        assert total > 300 and 0 < read <= total // 8, (name, read, total)


def test_a_chunk_stored_where_other_data_was_read_is_found(
    history: History, counted: dict[str, Any]
) -> None:
    """Near the wanted stretch no segment holds it (the full backup stored it while reading
    offset 0): the search goes on through whole segments."""
    src = PointSource(history.repo.storage, history.incr, maps=MapOptions(segments=SegmentCache()))
    image = history.images[history.incr.id]
    assert src.read(DEDUP_AT, C) == image[DEDUP_AT : DEDUP_AT + C] == image[:C]
    assert segment_name(history.full.index_segment or "") in counted["whole"]


def test_a_damaged_segment_block_is_reported(history: History, tmp_path: Path) -> None:
    root, repo = _copy(history, tmp_path)
    seg = root / segment_name(history.full.index_segment or "")
    for at in range(0, seg.stat().st_size * 9 // 10, 4096):  # every block but the footer's
        flip_byte(seg, at + 7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lookup, "_FILTERED_BYTES", 0)
        mp.setattr(SegmentCache, "_build", lambda self, scan: None)
        src = PointSource(repo.storage, history.full, maps=MapOptions(segments=SegmentCache()))
        with pytest.raises(CorruptionError, match="does not match its block list"):
            src.read(SIZE // 2, 4096)


def test_a_file_damaged_with_its_list_or_resized_is_refused(
    history: History, tmp_path: Path
) -> None:
    root, repo = _copy(history, tmp_path)
    leaves = root / leaves_name(history.full.leaves or "")
    flip_byte(root / block_list_name(leaves_name(history.full.leaves or "")), 30)
    flip_byte(leaves, leaves.stat().st_size // 2)
    src = PointSource(repo.storage, history.full, maps=MapOptions(segments=SegmentCache()))
    with pytest.raises(CorruptionError, match="does not match its name"):  # checked whole
        src.read(SIZE // 2, 4096)
    root2, repo2 = _copy(history, tmp_path / "b")
    with open(root2 / leaves_name(history.full.leaves or ""), "ab") as fh:
        fh.write(b"\0")
    src = PointSource(repo2.storage, history.full, maps=MapOptions(segments=SegmentCache()))
    with pytest.raises(CorruptionError, match="not the size its block list gives"):
        src.read(SIZE // 2, 4096)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"short", "too short"),
        (bytes(36), "bad trailer"),
        (blocks.encode([b"h" * 32], 2 * MiB, MiB), "block count"),
        (b"x" + blocks.encode([b"h" * 32], 5, MiB), "do not add up"),
    ],
)
def test_malformed_block_lists_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(CorruptionError, match=message):
        blocks.BlockList.parse(data, "a list")


def test_a_damaged_block_is_reported_by_the_read_that_needs_it(
    history: History, tmp_path: Path
) -> None:
    root, repo = _copy(history, tmp_path)
    leaves = root / leaves_name(history.full.leaves or "")
    flip_byte(leaves, leaves.stat().st_size // 2)  # a block in the middle of the disk's leaves
    src = PointSource(repo.storage, history.full, maps=MapOptions(segments=SegmentCache()))
    assert src.read(0, 4096) == history.images[history.full.id][:4096]  # its blocks are intact
    with pytest.raises(CorruptionError, match="does not match its block list"):
        src.read(SIZE // 2, 4096)


def test_a_damaged_block_list_costs_a_whole_check_and_a_warning(
    history: History, tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, repo = _copy(history, tmp_path)
    flip_byte(root / block_list_name(leaves_name(history.full.leaves or "")), 10)
    (root / block_list_name(segment_name(history.full.index_segment or ""))).unlink()
    monkeypatch.setattr(lookup, "_FILTERED_BYTES", 0)
    src = PointSource(repo.storage, history.full, maps=MapOptions(segments=SegmentCache()))
    at = SIZE // 2
    assert src.read(at, 4096) == history.images[history.full.id][at : at + 4096]
    res = cli("-r", str(root), "verify", "--json")
    doc = json.loads(res.out)
    assert res.code == 0, res.err
    warned = [w for w in doc["warnings"] if "block list" in w and history.full.id in w]
    assert len(warned) == 2, doc  # the damaged one and the missing one


def test_prune_removes_block_lists_whose_file_is_gone(
    history: History, tmp_path: Path, cli: CliRunner
) -> None:
    root, _repo = _copy(history, tmp_path)
    r = str(root)
    orphan = root / "index" / ("ab" * 32 + ".blocks")
    orphan.write_bytes(b"left by a crash between a segment's removal and its list's")
    res = cli("-r", r, "prune", "--json")
    assert res.code == 0, res.err
    assert not orphan.exists()
    listed = sorted(p.name for p in root.rglob("*.blocks"))
    made = [history.full.leaves, history.full.index_segment, history.incr.leaves]
    made += [history.incr.index_segment]
    assert listed == sorted(f"{f}.blocks" for f in made)
    res = cli("-r", r, "verify", "--json")
    assert res.code == 0 and not json.loads(res.out)["warnings"], res.out
