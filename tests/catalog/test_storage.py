"""LocalStorage: invisible until commit, atomic rename, names confined to the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.errors import RepositoryError
from catalog.store.storage import TMP_DIR, LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def test_new_file_is_invisible_until_commit(storage: LocalStorage, tmp_path: Path) -> None:
    new = storage.create()
    assert new.write(b"hello ") == 6
    new.write(memoryview(b"world"))
    assert new.tell() == 11
    assert not storage.exists("a/b/c.bin")
    assert storage.list("a") == []
    assert len(storage.tmp_files()) == 1
    new.commit("a/b/c.bin")
    assert storage.exists("a/b/c.bin")
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"hello world"
    assert storage.tmp_files() == []
    assert storage.list("a") == ["a/b/c.bin"]
    assert storage.size("a/b/c.bin") == 11


def test_abort_removes_the_temporary_file(storage: LocalStorage) -> None:
    new = storage.create()
    new.write(b"x" * 100)
    new.abort()
    assert storage.tmp_files() == []
    assert storage.list("") == []


def test_read_ranges(storage: LocalStorage) -> None:
    storage.write_atomic("f", bytes(range(256)))
    assert storage.read("f") == bytes(range(256))
    assert storage.read("f", 10, 5) == bytes(range(10, 15))
    assert storage.read("f", 250) == bytes(range(250, 256))
    assert storage.read("f", 300, 10) == b""


def test_write_atomic_replaces(storage: LocalStorage) -> None:
    storage.write_atomic("points/p.json", b"one")
    storage.write_atomic("points/p.json", b"two")
    assert storage.read("points/p.json") == b"two"
    assert storage.list("points") == ["points/p.json"]


def test_list_is_sorted_recursive_and_skips_tmp(storage: LocalStorage, tmp_path: Path) -> None:
    for name in ["packs/bb/2.pack", "packs/aa/1.pack", "packs/aa/0.pack"]:
        storage.write_atomic(name, b"x")
    (tmp_path / "packs" / "aa" / "junk.tmp").write_bytes(b"")
    assert storage.list("packs") == ["packs/aa/0.pack", "packs/aa/1.pack", "packs/bb/2.pack"]
    assert storage.list("nothing-here") == []


def test_missing_objects_raise_repository_errors(storage: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="cannot read .*missing"):
        storage.read("missing")
    with pytest.raises(RepositoryError, match="cannot stat .*missing"):
        storage.size("missing")
    storage.remove("missing")  # removing what is not there is fine
    assert not storage.exists("missing")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside", "a/../../outside"])
def test_names_cannot_leave_the_repository(storage: LocalStorage, name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid repository object name"):
        storage.path(name)
    with pytest.raises(RepositoryError):
        storage.write_atomic(name, b"x")


def test_commit_failure_is_translated_and_cleans_up(storage: LocalStorage, tmp_path: Path) -> None:
    (tmp_path / "blocked").write_bytes(b"a file where a directory should be")
    new = storage.create()
    new.write(b"data")
    with pytest.raises(RepositoryError, match="cannot commit blocked/x"):
        new.commit("blocked/x")
    assert storage.tmp_files() == []


def test_create_without_tmp_dir_is_a_repository_error(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "nowhere"))
    with pytest.raises(RepositoryError, match="cannot create"):
        storage.create()


def test_remove_and_local_path(storage: LocalStorage, tmp_path: Path) -> None:
    storage.write_atomic("x/y", b"1")
    assert storage.local_path("x/y") == os.path.join(str(tmp_path), "x", "y")
    storage.remove("x/y")
    assert not storage.exists("x/y")


def test_write_many_keeps_order_across_many_buffers(storage: LocalStorage) -> None:
    parts: list[bytes | memoryview] = [bytes([i % 251]) * (i % 7 + 1) for i in range(1500)]
    parts[10] = memoryview(b"view")
    new = storage.create()
    new.write(b"head")
    assert new.write_many(parts) == sum(len(p) for p in parts)
    assert new.tell() == 4 + sum(len(p) for p in parts)
    new.commit("m")
    assert storage.read("m") == b"head" + b"".join(bytes(p) for p in parts)


def test_a_missing_tmp_dir_is_recreated(storage: LocalStorage, tmp_path: Path) -> None:
    os.rmdir(tmp_path / TMP_DIR)
    storage.write_atomic("x", b"1")
    assert storage.read("x") == b"1"
