"""LocalStorage: invisible until commit, atomic rename, names confined to the repository; the
rest of the protocol (tmp ages, prefixes, syncs, the ways in) and the in-place handles an
overlay uses (``catalog.store.inplace``): what each call promises, pinned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.errors import RepositoryError
from catalog.store.local import LocalStorage
from catalog.store.storage import TMP_DIR, Storage


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


# -- the rest of the protocol ------------------------------------------------------------------


def test_local_storage_is_a_storage(storage: LocalStorage) -> None:
    typed: Storage = storage  # mypy checks every protocol method's signature here
    assert typed.tmp_files() == []


def test_mtime_list_dirs_sync_and_remove_dir(storage: LocalStorage, tmp_path: Path) -> None:
    assert storage.mtime("nothing") is None
    storage.write_atomic("packs/bb/1.pack", b"x")
    storage.write_atomic("packs/aa/0.pack", b"x")
    storage.write_atomic("packs/file", b"x")
    written = storage.mtime("packs/aa/0.pack")
    assert written is not None and abs(written - os.stat(tmp_path / "packs/aa/0.pack").st_mtime) < 1
    assert storage.list_dirs("packs") == ["packs/aa", "packs/bb"]  # prefixes only, sorted
    assert storage.list_dirs("nothing") == []
    assert storage.list_dirs("") == ["packs", TMP_DIR]
    storage.sync("packs")
    storage.sync("nothing")  # a missing prefix: nothing to make durable
    with pytest.raises(RepositoryError, match="cannot remove .*packs.aa"):
        storage.remove_dir("packs/aa")  # something is still under it
    storage.remove("packs/aa/0.pack")
    storage.remove_dir("packs/aa")
    storage.remove_dir("packs/aa")  # already gone: fine
    assert storage.list_dirs("packs") == ["packs/bb"]


def test_new_refuses_what_is_not_a_missing_or_empty_directory(tmp_path: Path) -> None:
    fresh = LocalStorage.new(str(tmp_path / "r"), "config.json")
    assert not (tmp_path / "r").exists()  # nothing is created before make_root
    fresh.make_root(["packs", "manifests/leaves", TMP_DIR])
    assert sorted(os.listdir(tmp_path / "r")) == ["manifests", "packs", TMP_DIR]
    fresh.write_atomic("config.json", b"{}")
    with pytest.raises(RepositoryError, match="already holds a comb repository"):
        LocalStorage.new(str(tmp_path / "r"), "config.json")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    for where in ("busy", "file"):
        with pytest.raises(RepositoryError, match="exists and is not an empty directory"):
            LocalStorage.new(str(tmp_path / where), "config.json")
    (tmp_path / "empty").mkdir()
    assert LocalStorage.new(str(tmp_path / "empty"), "config.json").root == str(tmp_path / "empty")
    with pytest.raises(RepositoryError, match="cannot create .*under-a-file"):
        LocalStorage(str(tmp_path / "file" / "under-a-file")).make_root(["packs"])


def test_existing_needs_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    for where in ("nowhere", "file"):
        with pytest.raises(
            RepositoryError, match=rf"does not exist \(run `comb -r x/{where} init`"
        ):
            LocalStorage.existing(f"x/{where}")  # relative: the message names it as given
    assert LocalStorage.existing(str(tmp_path)).root == str(tmp_path)


# -- files written in place: an overlay's log files and lock --------------------------------


def test_log_appends_truncates_and_reads_back(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_sync_dir = LocalStorage.sync_dir

    def sync_dir(s: LocalStorage, path: str) -> None:
        synced.append(path)
        real_sync_dir(s, path)

    monkeypatch.setattr(LocalStorage, "sync_dir", sync_dir)
    (tmp_path / "ov").mkdir()
    log = storage.create_log("ov/log-0.dat")
    assert synced == [str(tmp_path / "ov")]  # its name is durable before it is used
    assert log.size() == 0
    log.pwrite([b"head", memoryview(b"-body"), b""], 0)
    log.pwrite((b"more",), 9)
    assert log.size() == 13 and log.pread(100, 4) == b"-bodymore"
    log.truncate(9)  # a torn tail cut away
    log.sync()
    log.close()
    with pytest.raises(FileExistsError):
        storage.create_log("ov/log-0.dat")  # never over an existing log
    again = storage.open_log("ov/log-0.dat", writable=True)
    assert again.size() == 9 and again.pread(9, 0) == b"head-body"
    again.pwrite([b"!"], 9)
    again.close()
    reader = storage.open_log("ov/log-0.dat")
    assert reader.pread(100, 0) == b"head-body!"
    with pytest.raises(OSError):
        reader.pwrite([b"x"], 0)  # read-only
    reader.close()
    with pytest.raises(FileNotFoundError):  # OSError, errno kept (ENOSPC stays ENOSPC)
        storage.open_log("ov/log-1.dat")


def test_log_pwrite_is_one_gathered_write(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    short = [False]
    real = os.pwritev

    def pwritev(fd: int, bufs: list[memoryview], at: int) -> int:
        calls.append(len(bufs))
        if short[0]:  # the system writes 3 bytes only, once
            short[0] = False
            return real(fd, [bufs[0][:3]], at)
        return real(fd, bufs, at)

    monkeypatch.setattr(os, "pwritev", pwritev)
    (tmp_path / "ov").mkdir()
    log = storage.create_log("ov/log-0.dat")
    log.pwrite([b"12345", b"678"], 0)
    assert calls == [2] and log.pread(8, 0) == b"12345678"  # one call for a record
    short[0] = True
    log.pwrite([b"abcde", b"fgh"], 8)  # a short write is finished, in order
    assert calls == [2, 2, 2] and log.pread(16, 0) == b"12345678abcdefgh"
    log.close()


def test_file_lock_refuses_a_second_holder(storage: LocalStorage, tmp_path: Path) -> None:
    (tmp_path / "ov").mkdir()
    first = storage.file_lock("ov/lock")
    assert (tmp_path / "ov" / "lock").read_bytes() == b""  # created empty
    assert first.try_acquire()
    second = storage.file_lock("ov/lock")
    assert not second.try_acquire()  # never waits
    first.release()
    assert second.try_acquire()
    second.release()
    with pytest.raises(FileNotFoundError):
        storage.file_lock("missing/lock")
