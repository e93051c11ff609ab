"""The commit protocol as the operating system sees it (FORMAT.md 11): during a real backup
(in-process, local engine) every ``fsync``, rename and ``mkdir`` is recorded, and every file
the new point names (packs, parity files, index segment, leaves, root, change table, block
lists) must have had its data fsynced, been renamed into place and had its directory fsynced
(a new directory's parent too), all before the rename of the point document.

A kill -9 keeps the page cache, so no crash test can see a missing fsync: only the order of
the calls shows it. The wrappers call through to the real functions."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from combtest import TEST_PASSWORD, Image, MiB, api_backup

from catalog.repo import Repository
from catalog.store.index import INDEX_PREFIX
from catalog.store.leaves import leaves_name
from catalog.store.manifest import roots_name
from catalog.store.packs import pack_name
from catalog.store.parity import parity_name
from catalog.store.parquet_io import read_parquet
from catalog.store.points import RecoveryPoint, point_name

Event = tuple[str, str, str]  # (what, path, rename target)


class Syscalls:
    """Records fsync (of files and directories, by the path the descriptor is open on),
    rename/replace and mkdir, in the order they return, across threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        fsync, replace, rename, mkdir = os.fsync, os.replace, os.rename, os.mkdir

        def rec(what: str, path: Any, target: Any = "") -> None:
            with self._lock:
                self.events.append(
                    (what, os.path.abspath(path), str(target and os.path.abspath(target)))
                )

        def _fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            fsync(fd)
            rec("fsync", path)

        def _replace(src: Any, dst: Any, **kw: Any) -> None:
            replace(src, dst, **kw)
            rec("rename", src, dst)

        def _rename(src: Any, dst: Any, **kw: Any) -> None:
            rename(src, dst, **kw)
            rec("rename", src, dst)

        def _mkdir(path: Any, *args: Any, **kw: Any) -> None:
            mkdir(path, *args, **kw)
            rec("mkdir", path)

        monkeypatch.setattr(os, "fsync", _fsync)
        monkeypatch.setattr(os, "replace", _replace)
        monkeypatch.setattr(os, "rename", _rename)
        monkeypatch.setattr(os, "mkdir", _mkdir)

    def index(self, what: str, path: str, target: str = "", after: int = -1) -> int:
        """The first event (after position ``after``) matching; -1 if none."""
        for i in range(after + 1, len(self.events)):
            w, p, t = self.events[i]
            if w == what and p == path and (not target or t == target):
                return i
        return -1

    def renamed_to(self, final: str) -> tuple[int, str]:
        """The last rename onto ``final``: (its position, its source)."""
        hits = [(i, e[1]) for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == final]
        assert hits, f"{final} was never renamed into place"
        return hits[-1]


def _named_files(repo: Repository, point: RecoveryPoint) -> set[str]:
    """Every file the point document names, and the packs (with parity) its index segment
    lists: read from the point and its segment, not from the code that wrote them."""
    names = {roots_name(point.root)}
    if point.changes:
        names.add(f"manifests/changes/{point.changes}.parquet")
    if point.leaves:
        names |= {leaves_name(point.leaves), f"manifests/leaves/{point.leaves}.blocks"}
    if point.index_segment:
        seg = f"{INDEX_PREFIX}/{point.index_segment}.parquet"
        names |= {seg, f"{INDEX_PREFIX}/{point.index_segment}.blocks"}
        packs = set(read_parquet(repo.storage, seg, ["pack"]).column("pack").to_pylist())
        assert packs
        names |= {pack_name(p) for p in packs} | {parity_name(p) for p in packs}
    return names


def _files(root: Path) -> set[str]:
    skip = ("locks/", "tmp/", "points/")
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


def _assert_durable_before_commit(
    calls: Syscalls, root: Path, point_id: str, names: set[str]
) -> None:
    commit, _ = calls.renamed_to(str(root / point_name(point_id)))
    for name in sorted(names):
        final = str(root / name)
        folder = os.path.dirname(final)
        moved, tmp = calls.renamed_to(final)
        assert moved < commit, f"{name} renamed into place after the point's commit"
        data = calls.index("fsync", tmp)
        assert 0 <= data < moved, f"{name}: its data was not fsynced before its rename"
        synced = calls.index("fsync", folder, after=moved)
        assert 0 <= synced < commit, f"{name}: {folder} not fsynced after the rename, before commit"
        made = calls.index("mkdir", folder)
        if made >= 0:  # a new directory (packs/xx/): its entry made durable in its parent
            parent = calls.index("fsync", os.path.dirname(folder), after=made)
            assert 0 <= parent < commit, f"new directory {folder} not durable before the commit"
    # The point document itself: tmp + fsync + rename + fsync(points/).
    tmp = calls.events[commit][1]
    assert 0 <= calls.index("fsync", tmp) < commit
    assert calls.index("fsync", str(root / "points"), after=commit) > commit


def test_every_file_a_point_names_is_durable_before_its_commit(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    Repository.init(str(root), password=TEST_PASSWORD)  # encrypted, with parity: the defaults
    img = Image(tmp_path / "d.img", 12 * MiB)
    img.random(0, 5 * MiB, seed=1)
    img.random(8 * MiB, 3 * MiB, seed=2)
    changed = None
    for step in range(2):  # a full backup (new packs/xx/ directories), then one with a change list
        if step:
            img.take_changes()
            img.random(MiB, 2 * MiB, seed=3)
            img.random(11 * MiB, MiB, seed=4)
            changed = img.changes_file(tmp_path / "changes.json")
        before = _files(root)
        with pytest.MonkeyPatch.context() as mp:
            calls = Syscalls(mp)
            # Small packs and work items: several workers' packs, sealed full and at the end.
            point = api_backup(
                root, img.path, changed, workers=2, batch_bytes=MiB, pack_target_bytes=MiB
            )
        assert point.mode == ("changed-extents" if step else "full")
        names = _named_files(Repository.open(str(root), password=TEST_PASSWORD), point)
        new = _files(root) - before
        assert new == names and len([n for n in new if n.endswith(".pack")]) >= 3
        _assert_durable_before_commit(calls, root, point.id, names)


def test_repository_files_stay_private_under_umask_0(
    cli: Any, tmp_path: Path, make_image: Any
) -> None:
    """Whatever the umask (the CI machine's is 0), every file and directory a repository
    holds after init, two backups and a forget with prune is its owner's alone: keys, packs,
    parity, Parquet metadata, point documents."""
    repo = tmp_path / "repo"
    img = make_image(2 * MiB)
    img.random(0, MiB, seed=1)
    old = os.umask(0)
    try:
        assert cli("-r", repo, "init").code == 0
        assert cli("-r", repo, "backup", img.path).code == 0
        img.random(MiB, MiB, seed=2)
        assert cli("-r", repo, "backup", img.path).code == 0
        assert cli("-r", repo, "forget", "--keep-last", "1", "--prune").code == 0
    finally:
        os.umask(old)
    loose = [
        (str(p.relative_to(repo)), oct(p.stat().st_mode & 0o777))
        for p in [repo, *repo.rglob("*")]
        if p.stat().st_mode & 0o077
    ]
    assert not loose, loose
