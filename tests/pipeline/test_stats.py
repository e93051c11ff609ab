"""``comb stats``: its figures against truth computed here from the images and the repository's
files (sizes on disk, distinct non-zero chunks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, points_json

from catalog.repo import Repository


def _chunks(path: Path, size: int) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + size] for i in range(0, len(data), size)]


def _dir_bytes(root: Path, *tops: str) -> int:
    total = 0
    for top in tops:
        for dirpath, _dirs, files in os.walk(root / top):
            total += sum(os.path.getsize(Path(dirpath) / f) for f in files)
    return total


def test_stats_figures_equal_independent_truth(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory, tmp_path: Path
) -> None:
    chunk = Repository.open(str(repo_path), password=TEST_PASSWORD).config.chunk_size
    a = make_image(4 * MiB, "a.img")
    a.random(0, MiB, seed=1)
    a.compressible(2 * MiB, MiB, seed=2)
    b = make_image(3 * MiB, "b.img")
    b.random(0, MiB, seed=1)  # the same data as a's first MiB: deduplicated
    b.zeros(MiB, MiB)
    held: list[list[bytes]] = []
    for img, name in ((a, "vm-a"), (b, "vm-b")):
        assert cli("-r", repo_path, "backup", img.path, "--source-name", name).code == 0
        held.append(_chunks(img.path, chunk))
    a.random(3 * MiB, 256 * 1024, seed=3)
    assert cli("-r", repo_path, "backup", a.path, "--source-name", "vm-a").code == 0
    held.append(_chunks(a.path, chunk))

    res = cli("-r", repo_path, "stats", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert set(doc) == {"repository", "totals", "sources"}

    d = doc["repository"]
    assert d["pack_bytes"] == _dir_bytes(repo_path, "packs")
    assert d["pack_files"] == sum(len(f) for _, _, f in os.walk(repo_path / "packs"))
    assert d["parity_bytes"] == _dir_bytes(repo_path, "parity") > 0
    meta = _dir_bytes(repo_path, "index", "manifests", "points", "keys", "locks")
    assert d["metadata_bytes"] == meta + os.path.getsize(repo_path / "config.json")
    assert d["total_bytes"] == d["pack_bytes"] + d["parity_bytes"] + d["metadata_bytes"]

    nonzero = [[c for c in point if c.count(0) != len(c)] for point in held]
    distinct = {c for point in nonzero for c in point}
    t = doc["totals"]
    assert t["points"] == 3
    assert t["disk_bytes"] == 4 * MiB + 3 * MiB + 4 * MiB
    assert t["data_bytes"] == sum(len(c) for point in nonzero for c in point)
    assert t["unique_bytes"] == sum(len(c) for c in distinct)
    pts = points_json(cli, repo_path)
    assert t["stored_bytes"] == sum(int(p["bytes_stored"]) for p in pts)  # type: ignore[call-overload]
    assert 0 < t["stored_bytes"] < d["pack_bytes"]
    assert t["dedup_ratio"] == round(t["data_bytes"] / t["unique_bytes"], 3) > 1
    assert t["compression_ratio"] == round(t["unique_bytes"] / t["stored_bytes"], 3) > 1

    by = {s["source"]: s for s in doc["sources"]}
    assert sorted(by) == ["vm-a", "vm-b"]
    assert by["vm-a"]["points"] == 2 and by["vm-a"]["disk_bytes"] == 8 * MiB
    a_data = sum(len(c) for i in (0, 2) for c in nonzero[i])
    assert by["vm-a"]["data_bytes"] == a_data
    assert by["vm-b"]["data_bytes"] == MiB
    # Each chunk counts for the source whose backup stored it first: b's data was a's.
    assert by["vm-b"]["unique_bytes"] == 0
    assert by["vm-a"]["unique_bytes"] == t["unique_bytes"]
    assert sum(s["stored_bytes"] for s in by.values()) == t["stored_bytes"]

    table = cli("-r", repo_path, "stats")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].startswith("repository on disk: ")
    assert lines[1].split()[:2] == ["SOURCE", "POINTS"]
    assert [ln.split()[0] for ln in lines[2:]] == ["vm-a", "vm-b", "(all)"]


def test_stats_of_an_empty_repository(cli: CliRunner, repo_path: Path) -> None:
    res = cli("-r", repo_path, "stats", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["sources"] == [] and doc["totals"]["points"] == 0
    assert doc["totals"]["dedup_ratio"] is None
    assert cli("-r", repo_path, "stats").code == 0
