"""Shared by the analytics tests (importable as ``catalogtest``): a short real backup
history with known changes."""

from __future__ import annotations

from pathlib import Path

from combtest import Image, MiB, api_backup

from catalog.points import RecoveryPoint
from catalog.repo import Repository

C = 64 * 1024


def make_history(
    tmp_path: Path, encryption: str = "aes-256-gcm"
) -> tuple[Repository, list[RecoveryPoint], list[int]]:
    """Four real backups of one disk: full, then three with known changes (two hot spots,
    one zeroed chunk, a rewrite with identical bytes, one copied chunk = a dedup hit)."""
    repo = Repository.init(str(tmp_path / "repo"), C, 3, encryption=encryption)
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
