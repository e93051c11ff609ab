"""Hostile and damaged guest filesystems (real ext4 images made with mkfs.ext4 -d, then damaged
with debugfs or by patching a byte the way corruption would): comb's file view gives one line
or skips the entry, never writes outside the target, never hangs; a filesystem reader that
dies, stalls or runs out of memory costs one request, and the next one works."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from combtest import TEST_PASSWORD, CliRunner, api_backup, need_tool
from drivetest import FileSource

from catalog.errors import FileSystemError
from catalog.repo import Repository
from drive.files import listing, sandbox
from drive.files.entries import answers_from_json, entries_from_json
from drive.files.extract import extract
from drive.files.view import Node, PointFiles


def ext4(tmp_path: Path, *mkfs: str) -> Path:
    """A small real ext4 image: /etc/fstab, /etc/sub/, /data/big (1 MiB), /data/Q7, /data/a_b."""
    need_tool("mkfs.ext4")
    tree = tmp_path / "tree"
    (tree / "etc" / "sub").mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (tree / "data").mkdir()
    (tree / "data" / "big").write_bytes(os.urandom(1 << 20))
    (tree / "data" / "Q7").write_text("q7\n")
    (tree / "data" / "a_b").write_text("ab\n")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", *mkfs, "-d", tree, image],
        check=True,
        capture_output=True,
    )
    return image


def debugfs(image: Path, request: str) -> None:
    need_tool("debugfs")
    subprocess.run(["debugfs", "-w", "-R", request, image], check=True, capture_output=True)


def patch(image: Path, old: bytes, new: bytes) -> None:
    data = bytearray(image.read_bytes())
    at = data.find(old)
    assert at >= 0 and data.find(old, at + 1) < 0, old
    data[at : at + len(new)] = new
    image.write_bytes(bytes(data))


@pytest.fixture
def files_of(tmp_path: Path) -> Iterator[object]:
    opened: list[PointFiles] = []

    def make(image: Path, **kwargs: object) -> PointFiles:
        pf = PointFiles(FileSource(str(image)), **kwargs)  # type: ignore[arg-type]
        opened.append(pf)
        return pf

    yield make
    for pf in opened:
        pf.close()


def test_a_damaged_superblock_is_one_line_exit_13(cli: CliRunner, tmp_path: Path) -> None:
    image = ext4(tmp_path)
    with open(image, "r+b") as f:  # s_log_block_size: 2**(10+200) bytes per block
        f.seek(1024 + 24)
        f.write((200).to_bytes(4, "little"))
    repo = tmp_path / "repo"
    Repository.init(str(repo), password=TEST_PASSWORD)
    point = api_backup(repo, image, name="bad").id
    got = cli("-r", repo, "ls", point, "/disk")
    assert got.code == 13, got
    assert got.err.startswith("comb: error: volume disk (ext4 at offset 0): ")
    assert len(got.err.strip().splitlines()) == 1
    assert cli("-r", repo, "ls", point).code == 0  # the volume list still shows it


def test_a_directory_loop_is_walked_once(files_of: object, tmp_path: Path) -> None:
    image = ext4(tmp_path)
    debugfs(image, "ln /etc /etc/sub/loop")  # /etc/sub/loop is /etc again
    pf = files_of(image)  # type: ignore[operator]
    paths = [n.path for n in pf.walk(pf.lookup("/disk"))]
    assert b"/disk/etc/sub/loop" in paths
    assert not [p for p in paths if p.startswith(b"/disk/etc/sub/loop/")]
    out = tmp_path / "out"
    done = extract(pf, pf.lookup("/disk/etc"), str(out))
    assert (out / "etc" / "fstab").is_file() and not done.skipped


def test_names_that_are_paths_are_left_out_and_nothing_leaves_the_target(
    files_of: object, tmp_path: Path
) -> None:
    image = ext4(tmp_path, "-O", "^metadata_csum")
    patch(image, b"\x02\x01Q7", b"\x02\x01..")  # a second ".." in /data, a regular file
    patch(image, b"\x03\x01a_b", b"\x03\x01a/b")
    pf = files_of(image)  # type: ignore[operator]
    names = [n.entry.name for n in pf.listdir(pf.lookup("/disk/data"))]
    assert sorted(names) == [b"big"]
    # A second ".." reads as the directory's own ".." entry (dropped like it); "a/b" is said.
    assert pf.skipped == ["/disk/data: left out an entry named 'a/b'"]
    target = tmp_path / "inside" / "out"
    done = extract(pf, pf.lookup("/disk/data"), str(target))
    assert done.files == 1
    assert sorted(os.listdir(tmp_path / "inside")) == ["out"]
    assert sorted(os.listdir(target / "data")) == ["big"]


def test_a_file_whose_data_lies_past_the_disk_is_skipped_with_one_line(
    files_of: object, tmp_path: Path
) -> None:
    image = ext4(tmp_path, "-t", "ext3")  # block maps: a block number debugfs can set
    debugfs(image, "sif /data/big block[0] 99999999")
    pf = files_of(image)  # type: ignore[operator]
    warned: list[str] = []
    out = tmp_path / "out"
    done = extract(pf, pf.lookup("/disk/data"), str(out), warn=warned.append)
    assert [s.split(":")[0] for s in done.skipped] == ["data/big"]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert sorted(os.listdir(out / "data")) == ["Q7", "a_b"]


def test_a_stalled_reader_is_stopped_and_the_next_request_works(
    files_of: object, tmp_path: Path
) -> None:
    pf = files_of(ext4(tmp_path), timeout=1.0)  # type: ignore[operator]
    assert pf.lookup("/disk/etc").entry.is_dir  # the worker is up
    proc = pf.worker._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # a parser stuck in a loop, as far as comb can tell
    with pytest.raises(FileSystemError, match="did not answer within 1 s"):
        pf.listdir(pf.lookup("/disk/data"))
    assert proc.poll() is not None  # killed, not left behind
    assert [n.entry.name for n in pf.listdir(pf.lookup("/disk/etc"))] != []
    assert sorted(n.entry.name for n in pf.listdir(pf.lookup("/disk/data"))) == [
        b"Q7",
        b"a_b",
        b"big",
    ]


def test_a_reader_that_dies_is_one_line_and_is_restarted(files_of: object, tmp_path: Path) -> None:
    image = ext4(tmp_path)
    starved = files_of(image, memory=24 << 20)  # type: ignore[operator]  # (Python, TSK, no room)
    with pytest.raises(FileSystemError) as err:
        starved.lookup("/disk/etc")
    assert str(err.value).startswith("volume disk (ext4 at offset 0): ")  # TSK's own words
    assert "\n" not in str(err.value)
    pf = files_of(image)  # type: ignore[operator]
    pf.lookup("/disk/etc")
    proc = pf.worker._proc
    assert proc is not None
    proc.kill()
    proc.wait()
    assert pf.lookup("/disk/data/big").entry.size == 1 << 20  # a new worker answers


def test_a_walk_in_many_batches_is_the_walk_in_one(files_of: object, tmp_path: Path) -> None:
    """Batches of one row each, the last one empty (it still carries the last folder's deps):
    the same entries, folders' deps included."""
    pf = files_of(ext4(tmp_path))  # type: ignore[operator]
    top = pf.lookup("/disk")

    def walked(batch_rows: int | None) -> tuple[list[bytes], dict[int, object]]:
        paths: list[bytes] = []
        deps: dict[int, object] = {}
        for table, found, more in pf.walk_tables(top, batch_rows):
            assert table.num_rows == len(found)
            paths += found.to_pylist()
            deps.update(more)
        return paths, deps

    one, many = walked(None), walked(1)
    assert sorted(one[0]) == sorted(many[0]) and len(one[0]) == 8
    assert one[1] == many[1] and all(v for v in one[1].values())


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b'{"a": 1}',
        b'[["n", "file", 1, 2, 3, 4, 5, 6, 7, 8, 9]]',  # a field short
        b'[["n", "bomb", 1, 2, 3, 4, 5, 6, 7, 8, 9, null]]',
        b'[["n", "file", "1", 2, 3, 4, 5, 6, 7, 8, 9, null]]',
        b'[["n", "file", 1.5, 2, 3, 4, 5, 6, 7, 8, 9, null]]',
        b'[[7, "file", 1, 2, 3, 4, 5, 6, 7, 8, 9, null]]',
        b'[["\\u0100", "file", 1, 2, 3, 4, 5, 6, 7, 8, 9, null]]',  # not one byte
        b'[["n", "symlink", 1, 2, 3, 4, 5, 6, 7, 8, 9, 5]]',
        b"[5]",
    ],
)
def test_a_lying_worker_listing_is_refused(payload: bytes) -> None:
    """A listing from the worker is checked field by field (the worker is not trusted)."""
    with pytest.raises(ValueError):
        entries_from_json(payload)


def test_listing_json_keeps_every_byte() -> None:
    raw = b'[["a\\u00ff\\u0000", "symlink", 1, 2, 3, 4, 5, 6, 7, 8, 9, "/\\u00fe"]]'
    (entry,) = entries_from_json(raw)
    assert (entry.name, entry.kind, entry.nlink, entry.target) == (
        b"a\xff\0",
        "symlink",
        9,
        b"/\xfe",
    )


def test_a_worker_of_other_code_refuses_in_one_line(
    files_of: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """comb upgraded in place while a command runs: the worker it starts holds other code than
    the command, says so and answers nothing else (their frames may not agree)."""
    monkeypatch.setattr(sandbox, "code_stamp", lambda: "0" * 16)
    pf = files_of(ext4(tmp_path))  # type: ignore[operator]
    with pytest.raises(FileSystemError) as err:
        pf.lookup("/disk/etc")
    assert "comb's code changed on disk since this command started" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"[[[], [0, 4611686018427387904], true]]",  # deps far past the volume: a huge set
        b"[[[], [0], true]]",  # not pairs
        b"[[[], [-5, 10], true]]",
        b'[[[], "all", true]]',
        b"[[[], null, 1]]",  # whole is not a boolean
        b"[[[], null, true], [[], null, true]]",  # two answers for one directory
        b'[[[["n", "file", -1, 2, 3, 4, 5, 6, 7, 8, 9, null]], null, true]]',  # inode -1
        b'[[[["n", "file", 1, 2, 3, 4, 5, 6, 7, 8, 1099511627776, null]], null, true]]',
        b'[[[["n", "file", 1, 2, 65535, 4, 5, 6, 7, 8, 9, null]], null, true]]',  # mode
    ],
)
def test_a_lying_worker_batch_is_refused(payload: bytes) -> None:
    """Every answer of a ``lists`` request is checked: deps inside the volume, numbers in their
    columns' ranges (a lie is one line, never a huge allocation or a traceback)."""
    with pytest.raises(ValueError):
        answers_from_json(payload, 1, 1 << 30)


@pytest.mark.parametrize("hostile", ["", "ln /etc /etc/sub/loop", "names", "root name", "wide"])
def test_a_walk_on_two_workers_is_the_walk_on_one(
    files_of: object, tmp_path: Path, hostile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``walk_whole`` (the folders below the root, or below its folders when it has few, walked
    on two workers at once) gives the rows and the lines of one walk (``subtree``): with a
    folder reached twice (a loop: one walk lists it once), and names that cannot be paths
    (said, in both)."""
    image = ext4(tmp_path, "-O", "^metadata_csum")
    for i in range(6):  # (folders at the level shared out among the workers)
        debugfs(image, f"mkdir /etc/d{i}")
        debugfs(image, f"write {tmp_path / 'tree' / 'etc' / 'fstab'} /etc/d{i}/f")
    if hostile == "names":
        patch(image, b"\x03\x01a_b", b"\x03\x01a/b")
    elif hostile == "wide":  # (as many folders in the root as are shared out at once)
        for i in range(listing.WALK_UNITS):
            debugfs(image, f"mkdir /w{i:02d}")
    elif hostile == "root name":
        patch(image, b"\x04\x02data", b"\x04\x02d/ta")  # (/data: a folder of the root)
    elif hostile:
        debugfs(image, hostile)
    walks, walked = [], []
    one_walk = listing.subtree

    def spy(files: PointFiles, node: Node) -> pa.Table:
        walked.append(node.path)
        return one_walk(files, node)

    for walk in (one_walk, listing.walk_whole):
        pf = files_of(image)  # type: ignore[operator]
        table = walk(pf, pf.volume_node(pf.volumes()[0]))
        walks.append((table.sort_by([("path", "ascending")]).to_pylist(), pf.skipped))
        monkeypatch.setattr(listing, "subtree", spy)
    assert walks[0] == walks[1]
    # Shared out (several subtrees, never the volume itself) but where a folder came twice.
    looped = hostile.startswith("ln ")
    assert (b"/disk" in walked) == looped and len(set(walked) - {b"/disk"}) >= 3
    counts = {"": 21, "names": 20, "root name": 17, "wide": 21 + listing.WALK_UNITS}
    assert len(walks[0][0]) == counts.get(hostile, 22)
    # (a walk whose batch held the folder and its bad name left it out unsaid, before)
    said = {"names": "/data: left out an entry named 'a/b'"}
    said["root name"] = "/: left out an entry named 'd/ta'"
    assert walks[0][1] == ([said[hostile]] if hostile in said else [])
