"""The dedup index in shards (``pipeline.ray_actors``): each shard an actor holding the chunk ids
its prefix names; dedup across sources read at once stays exact with 1 and with 4 shards (the
same data in two sources is stored once), and every point restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB


@pytest.mark.ray
def test_dedup_across_sources_is_exact_with_one_and_four_shards(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path
) -> None:
    a, b = make_image(6 * MiB, "a.img"), make_image(6 * MiB, "b.img")
    shared = a.random(0, 4 * MiB, seed=1)
    b.write(0, shared)
    a.random(4 * MiB, 2 * MiB, seed=2)
    b.random(4 * MiB, 2 * MiB, seed=3)
    for shards in ("1", "4"):
        repo = tmp_path / f"repo-{shards}"
        assert cli("-r", repo, "init").code == 0
        res = cli("-r", repo, "backup", a.path, b.path, "--engine", "ray", "--workers", "3",
                  "--index-shards", shards, "--batch-mib", "1", "--json")  # fmt: skip
        assert res.code == 0, res.err
        points = [json.loads(line) for line in res.out.splitlines()]
        # 4 MiB shared + 2 MiB each of their own: 8 MiB new, whichever worker read it first
        assert sum(p["bytes_new"] for p in points) == 8 * MiB
        for p, img in zip(points, (a, b), strict=True):
            out = tmp_path / f"out-{shards}-{img.path.name}"
            assert cli("-r", repo, "restore", p["id"], out).code == 0
            assert out.read_bytes() == img.path.read_bytes()
        assert cli("-r", repo, "verify", "--read-data").code == 0


def test_index_shards_are_checked(
    cli: CliRunner, make_image: ImageFactory, repo_path: Path
) -> None:
    img = make_image(MiB, "a.img")
    for value, what in (("0", "between 1 and 256"), ("257", "between 1 and 256")):
        res = cli("-r", repo_path, "backup", img.path, "--engine", "ray", "--index-shards", value)
        assert (res.code, res.err) == (2, f"comb: error: --index-shards must be {what}\n")
    res = cli("-r", repo_path, "backup", img.path, "--engine", "local", "--index-shards", "2")
    assert res.code == 2 and "applies to the ray engine" in res.err
