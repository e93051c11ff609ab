"""The backup job through the library (local engine): planning, statistics, restore."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from combtest import (
    TEST_PASSWORD,
    Image,
    ImageFactory,
    KiB,
    MiB,
    api_backup,
    api_restore,
    cmp_files,
)

from catalog.errors import OutputError, SourceError
from catalog.repo import Repository
from pipeline.jobs.backup import plan_backup
from pipeline.jobs.restore import restore_point
from pipeline.jobs.runner import BackupOptions

C = 64 * KiB


def _mixed(make_image: ImageFactory, size: int = 4 * MiB + 3000) -> Image:
    img = make_image(size)
    img.random(0, 3 * C, seed=1)
    img.compressible(MiB, 2 * C, seed=2)
    img.zeros(2 * MiB, 2 * C)
    img.random(size - 3000, 3000, seed=3)
    return img


def test_full_backup_statistics_and_restore(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = _mixed(make_image)
    p = api_backup(repo_path, img.path)
    assert (p.mode, p.parent, p.size) == ("full", None, img.size)
    assert p.source == os.path.abspath(img.path)
    st = p.stats
    # Holes are never read; the last chunk is the 3,000-byte tail of the disk.
    assert st.bytes_read == 3 * C + 2 * C + 2 * C + 3000
    assert st.bytes_zero == 2 * C  # the written zeros
    assert (st.chunks, st.chunks_new) == (8, 6)
    assert st.bytes_new == 5 * C + 3000
    assert 3 * C < st.bytes_stored < st.bytes_new
    api_restore(repo_path, p.id, tmp_path / "out")
    cmp_files(img.path, tmp_path / "out")


def test_plan_modes(repo_path: Path, make_image: ImageFactory, tmp_path: Path) -> None:
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    img = _mixed(make_image)
    full = plan_backup(repo, str(img.path), BackupOptions(source_name="d"))
    assert full.mode == "full" and full.parent is None and full.changed is None
    assert full.read == [
        (0, 3 * C),
        (MiB, MiB + 2 * C),
        (2 * MiB, 2 * MiB + 2 * C),
        (4 * MiB, img.size),
    ]
    first = api_backup(repo_path, img.path, name="d")
    img.take_changes()
    img.random(MiB + 10, 100, seed=9)  # inside existing data
    img.random(3 * MiB, 10, seed=9)  # inside a hole
    changes = img.changes_file(tmp_path / "c.json")
    inc = plan_backup(
        repo, str(img.path), BackupOptions(source_name="d", changed_extents=str(changes))
    )
    assert inc.mode == "changed-extents" and inc.parent is not None and inc.parent.id == first.id
    assert inc.changed == [(MiB, MiB + C), (3 * MiB, 3 * MiB + C)]
    assert inc.read == [(MiB, MiB + C), (3 * MiB, 3 * MiB + C)]
    reread = plan_backup(repo, str(img.path), BackupOptions(source_name="d"))
    assert reread.mode == "full-reread" and reread.changed is None


def test_change_list_without_parent_reads_everything(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _mixed(make_image)
    changes = img.changes_file(tmp_path / "c.json", [(0, 1)])
    p = api_backup(repo_path, img.path, changed=changes)
    assert p.mode == "full"
    assert "ignoring --changed-extents" in capsys.readouterr().err
    api_restore(repo_path, p.id, tmp_path / "out")
    cmp_files(img.path, tmp_path / "out")


def test_incrementals_restore_every_point(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = _mixed(make_image)
    states: list[tuple[str, Path]] = []
    p = api_backup(repo_path, img.path)
    states.append((p.id, img.snapshot(tmp_path / "s0")))
    img.take_changes()
    img.random(C + 5, 10, seed=5)
    img.zeros(MiB, C)  # compressible data becomes zeros
    img.random(3 * MiB + 7, 2 * C, seed=6)  # new data in a hole, unaligned
    p = api_backup(repo_path, img.path, changed=img.changes_file(tmp_path / "c1.json"))
    assert p.mode == "changed-extents"
    assert p.stats.bytes_read == C + C + 3 * C
    states.append((p.id, img.snapshot(tmp_path / "s1")))
    img.random(2 * MiB, 100, seed=7)
    p = api_backup(repo_path, img.path)  # no change list
    assert p.mode == "full-reread"
    assert p.stats.bytes_new == C
    states.append((p.id, img.snapshot(tmp_path / "s2")))
    for i, (pid, snap) in enumerate(states):
        out = tmp_path / f"r{i}"
        api_restore(repo_path, pid, out)
        cmp_files(snap, out)


def test_growing_source_with_a_change_list(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = make_image(MiB + 100)
    img.random(0, MiB + 100, seed=1)
    api_backup(repo_path, img.path, name="g")
    img.take_changes()
    img.resize(2 * MiB + 5)
    img.take_changes()  # the change list below does not mention the growth
    with open(img.path, "r+b") as fh:
        fh.seek(MiB + 100)
        fh.write(b"\x07" * 5000)  # data right after the old end
        fh.seek(2 * MiB)
        fh.write(b"\x09" * 5)
    p = api_backup(repo_path, img.path, name="g", changed=img.changes_file(tmp_path / "c", []))
    assert p.size == 2 * MiB + 5
    api_restore(repo_path, p.id, tmp_path / "out")
    cmp_files(img.path, tmp_path / "out")


def test_shorter_source_is_refused(repo_path: Path, make_image: ImageFactory) -> None:
    img = _mixed(make_image)
    first = api_backup(repo_path, img.path, name="s")
    img.resize(MiB)
    with pytest.raises(SourceError, match=f"shorter than its parent recovery point {first.id}"):
        api_backup(repo_path, img.path, name="s")
    assert len(Repository.open(str(repo_path), password=TEST_PASSWORD).points()) == 1
    other = api_backup(repo_path, img.path, name="s-small")
    assert other.parent is None


@pytest.mark.parametrize("size", [0, 5 * MiB + 1])
def test_empty_and_all_hole_sources(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path, size: int
) -> None:
    img = make_image(size)
    p = api_backup(repo_path, img.path)
    assert p.stats.bytes_read == 0 and p.stats.bytes_stored == 0
    out = tmp_path / "out"
    api_restore(repo_path, p.id, out)
    assert out.stat().st_size == size
    cmp_files(img.path, out)
    assert out.stat().st_blocks == 0


def test_small_batches_and_packs(repo_path: Path, make_image: ImageFactory, tmp_path: Path) -> None:
    """Many work items in flight and many sealed packs: same bytes back."""
    img = make_image(6 * MiB + 12345)
    for i in range(0, 6 * MiB, 512 * KiB):
        img.random(i, 200 * KiB, seed=i)
    p = api_backup(repo_path, img.path, batch_bytes=C, pack_target_bytes=256 * KiB, workers=3)
    assert len(list((repo_path / "packs").rglob("*.pack"))) >= 8
    api_restore(repo_path, p.id, tmp_path / "out")
    cmp_files(img.path, tmp_path / "out")


def test_same_content_under_another_name_stores_nothing_new(
    repo_path: Path, make_image: ImageFactory
) -> None:
    img = _mixed(make_image)
    api_backup(repo_path, img.path, name="a")
    second = api_backup(repo_path, img.path, name="b")
    assert second.parent is None and second.mode == "full"
    assert second.stats.bytes_new == 0 and second.stats.bytes_stored == 0


def test_two_sources_backed_up_at_the_same_time(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    imgs = [make_image(3 * MiB) for _ in range(2)]
    for k, img in enumerate(imgs):
        img.random(0, 2 * MiB, seed=10 + k)
        img.random(2 * MiB, MiB, seed=99)  # the same data in both
    ids: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(k: int) -> None:
        try:
            barrier.wait()
            ids[k] = api_backup(repo_path, imgs[k].path, batch_bytes=256 * KiB).id
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, img in enumerate(imgs):
        out = tmp_path / f"out{k}"
        api_restore(repo_path, ids[k], out)
        cmp_files(img.path, out)


def test_restore_refuses_existing_output_and_cleans_up_on_failure(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    img = _mixed(make_image)
    p = api_backup(repo_path, img.path)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        restore_point(repo, p, str(out))
    assert out.read_bytes() == b"precious"
    restore_point(repo, p, str(out), force=True)
    cmp_files(img.path, out)
    for pack in (repo_path / "packs").rglob("*.pack"):
        pack.unlink()
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="is missing"):
        restore_point(repo, p, str(fresh))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("fresh")]


def test_change_list_for_a_name_last_read_from_elsewhere(
    repo_path: Path, make_image: ImageFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A change list is only valid against the last point read from the same device: a name
    whose points all came from another path gets its source read whole (with a note)."""
    a = _mixed(make_image)
    first = api_backup(repo_path, a.path, name="v")
    b = make_image(a.size)
    b.random(0, 2 * MiB, seed=11)
    capsys.readouterr()
    p = api_backup(repo_path, b.path, changed=b.changes_file(tmp_path / "e.json", []), name="v")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("comb: note: ")
    assert first.id in err and str(a.path) in err and str(b.path) in err
    assert "ignoring --changed-extents" in err and "reading the whole source" in err
    assert p.mode == "full-reread" and p.parent == first.id and p.source_path == str(b.path)
    api_restore(repo_path, p.id, tmp_path / "out")
    cmp_files(b.path, tmp_path / "out")
    # From now on b's own last read is the parent: its change lists apply again.
    b.random(MiB, 10, seed=12)
    changes = b.changes_file(tmp_path / "c.json", [(MiB, 10)])
    q = api_backup(repo_path, b.path, changed=changes, name="v")
    assert q.mode == "changed-extents" and q.parent == p.id and q.stats.bytes_read == C
    assert capsys.readouterr().err == ""
    api_restore(repo_path, q.id, tmp_path / "out2")
    cmp_files(b.path, tmp_path / "out2")


def test_worker_processes_keep_freed_memory() -> None:
    """glibc accepts both settings (mallopt refuses an mmap threshold above its ceiling)."""
    from pipeline.malloc import keep_freed_memory

    assert keep_freed_memory()
