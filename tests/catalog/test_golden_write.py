"""A repository written by an earlier comb (the frozen golden repository, format version 1,
made before locks, parity, encryption and change tables) is not only read but written by this
one: a backup of its source, forget and prune, then every point still restores exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from combtest import CliRunner, Image, MiB

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden-v1"
EXPECTED: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "golden-v1.json").read_bytes())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_old_repository_takes_new_backups_forget_and_prune(
    cli: CliRunner, tmp_path: Path
) -> None:
    repo = tmp_path / "golden-v1"
    shutil.copytree(GOLDEN, repo)
    source = EXPECTED["source"]
    old = EXPECTED["points"]
    img = Image(tmp_path / "new.img", 4 * MiB + 128 * 1024)
    img.random(0, 2 * MiB, seed=7)
    res = cli("-r", repo, "backup", img.path, "--source-name", source, "--engine", "local")
    assert res.code == 0, res.err
    res = cli("-r", repo, "points", "--json")
    points = json.loads(res.out)["points"]
    assert len(points) == len(old) + 1
    new_id = points[-1]["id"]
    res = cli("-r", repo, "forget", old[0]["id"])
    assert res.code == 0, res.err
    res = cli("-r", repo, "prune")
    assert res.code == 0, res.err
    res = cli("-r", repo, "verify", "--read-data", "--json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True, res.out + res.err
    for p in old[1:]:
        out = tmp_path / f"{p['id']}.img"
        assert cli("-r", repo, "restore", p["id"], out).code == 0
        assert _sha256(out) == p["sha256"]
    out = tmp_path / "new-restored.img"
    assert cli("-r", repo, "restore", new_id, out).code == 0
    assert out.read_bytes() == img.path.read_bytes()
    res = cli("-r", repo, "report", "growth", "--format", "json")
    assert res.code == 0, res.err
