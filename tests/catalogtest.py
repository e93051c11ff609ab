"""Shared by the analytics tests (importable as ``catalogtest``): a short real backup
history with known changes."""

from __future__ import annotations

from pathlib import Path

from combtest import TEST_PASSWORD, Image, MiB, api_backup

from catalog.repo import Repository
from catalog.store.index import load_index
from catalog.store.points import RecoveryPoint

C = 64 * 1024


def make_history(
    tmp_path: Path, encryption: str = "aes-256-gcm"
) -> tuple[Repository, list[RecoveryPoint], list[int]]:
    """Four real backups of one disk: full, then three with known changes (two hot spots,
    one zeroed chunk, a rewrite with identical bytes, one copied chunk = a dedup hit)."""
    repo = Repository.init(
        str(tmp_path / "repo"), C, 3, encryption=encryption, password=TEST_PASSWORD
    )
    img = Image(tmp_path / "disk.img", 16 * MiB)
    img.random(0, 4 * MiB, seed=1)
    img.compressible(8 * MiB, 2 * MiB, seed=2)
    points = [api_backup(repo.location, img.path)]
    changed = []
    for step in range(3):
        img.take_changes()
        img.random(1 * MiB, 2 * C, seed=10 + step)  # the hot spot: every point
        img.random(9 * MiB + step * C, C, seed=20 + step)  # a new place each time
        data = open(img.path, "rb").read(C)
        img.write(0, data)  # same bytes: not a change
        if step == 1:
            img.zeros(2 * MiB, C)  # data -> zeros
            img.write(12 * MiB, open(img.path, "rb").read(5 * C)[4 * C :])  # a dedup hit
        changes = img.changes_file(tmp_path / f"c{step}.json")
        points.append(api_backup(repo.location, img.path, changes))
        changed.append(3 * C + (2 * C if step == 1 else 0))
    return repo, points, changed


def gc_truth(repo: Repository) -> tuple[dict[str, set[bytes]], dict[bytes, int]]:
    """Per point the set of chunk ids its manifest holds, and the stored bytes of each chunk
    (summed over its stored copies): read from manifests and the index, not change tables."""
    held = {}
    for p in repo.points():
        m = repo.manifest(p)
        ids: set[bytes] = set()
        for ref in m.refs():
            ids.update(bytes(row) for row in m.leaf(ref).ids)
        held[p.id] = ids
    stored: dict[bytes, int] = {}
    index = load_index(repo.storage, ["chunk_id", "stored_len"]).to_pylist()
    for row in index:
        stored[row["chunk_id"]] = stored.get(row["chunk_id"], 0) + row["stored_len"]
    return held, stored


def gc_frees(held: dict[str, set[bytes]], stored: dict[bytes, int], gone: set[str]) -> int:
    kept: set[bytes] = set().union(*(ids for pid, ids in held.items() if pid not in gone))
    freed: set[bytes] = set().union(*(held[pid] for pid in gone)) - kept
    return sum(stored[c] for c in freed)
