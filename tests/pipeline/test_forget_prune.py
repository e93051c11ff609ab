"""``forget --prune``: forget, then prune, in one command (one JSON document with both)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from combtest import CliRunner, ImageFactory, MiB, point_ids


def _packs(repo: Path) -> set[str]:
    return {f for _, _, files in os.walk(repo / "packs") for f in files}


def _two_points(cli: CliRunner, repo: Path, make_image: ImageFactory) -> list[str]:
    img = make_image(2 * MiB)
    img.random(0, MiB, seed=1)
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    img.random(0, MiB, seed=2)  # all new data: the first point's packs become unused
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    return point_ids(cli, repo)


def test_forget_prune_json_dry_run_then_real(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    first, second = _two_points(cli, repo_path, make_image)
    packs = _packs(repo_path)
    res = cli("-r", repo_path, "forget", "--keep-last", "1", "--prune", "--dry-run", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert set(doc) == {"forget", "prune"}
    assert doc["forget"]["dry_run"] and doc["forget"]["forgotten"] == [first]
    assert doc["prune"]["dry_run"] and doc["prune"]["points_kept"] == 2
    assert point_ids(cli, repo_path) == [first, second] and _packs(repo_path) == packs

    res = cli("-r", repo_path, "forget", "--keep-last", "1", "--prune", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["forget"] == {
        "dry_run": False,
        "forgotten": [first],
        "kept": 1,
        "held_by_overlays": {},
        "held_by_object_lock": {},
    }
    assert doc["prune"]["points_kept"] == 1 and doc["prune"]["packs_removed"] >= 1
    assert doc["prune"]["pack_bytes_removed"] > 0
    assert point_ids(cli, repo_path) == [second]
    assert len(_packs(repo_path)) == len(packs) - doc["prune"]["packs_removed"]


def test_forget_prune_text_prints_forget_then_prune(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    first, _ = _two_points(cli, repo_path, make_image)
    res = cli("-r", repo_path, "forget", first, "--prune")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].startswith(f"forgot {first}")
    assert lines[1].startswith("forgot 1 recovery point(s), kept 1")
    assert "comb prune" not in res.out  # no hint to run what just ran
    assert lines[-1].startswith("removed ") and "pack(s)" in lines[-1]
    # The prune ran: nothing is left for another one.
    res = cli("-r", repo_path, "prune", "--json")
    assert json.loads(res.out)["packs_removed"] == 0
