"""``scrub`` sums damage up per pack: a truncated pack of a hundred damaged chunks is one line
(how many chunks, how many parity heals, the first one's damage), not a hundred;
``--verbose`` lists every chunk, and ``--json`` holds them all."""

from __future__ import annotations

import json
from pathlib import Path

from combtest import CliRunner, ImageFactory, MiB, assert_one_line_error

from catalog.errors import CorruptionError

CHUNKS = 96  # 6 MiB of 64 KiB chunks, in one pack


def _truncated(cli: CliRunner, repo_path: Path, make_image: ImageFactory) -> Path:
    img = make_image(8 * MiB)
    img.random(0, CHUNKS * 64 * 1024, seed=1)
    assert cli("-r", repo_path, "backup", img.path).code == 0
    (pack,) = sorted((repo_path / "packs").rglob("*.pack"))
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 4])  # the last three quarters of its chunks are gone
    return pack


def test_one_line_per_damaged_pack(
    cli: CliRunner, repo_path: Path, make_image: ImageFactory
) -> None:
    pack = _truncated(cli, repo_path, make_image)
    pid = pack.name[: -len(".pack")]
    res = cli("-r", repo_path, "scrub")
    assert_one_line_error(res, "damaged chunk(s) in 1 pack(s)", code=CorruptionError.exit_code)
    damaged = [ln for ln in res.err.splitlines() if ln.startswith("damaged:")]
    assert len(damaged) == 1, res.err
    (line,) = damaged
    n = int(line.split(": ")[2].split()[0])
    assert CHUNKS // 2 < n < CHUNKS and line.startswith(f"damaged: pack {pid[:16]}: {n} damaged")
    assert "; first: pack " in line and "beyond the end" in line
    assert len(res.err.splitlines()) < 10, res.err  # and the affected point, and the error
    assert f"{n} damaged chunk(s) in 1 pack(s)" in res.out

    res = cli("-r", repo_path, "scrub", "--verbose")
    each = [ln for ln in res.err.splitlines() if ln.startswith("  pack ")]
    assert len(each) == n and all("beyond the end" in ln for ln in each)

    res = cli("-r", repo_path, "scrub", "--json")
    assert res.code == CorruptionError.exit_code
    doc = json.loads(res.out)
    assert doc["damaged_packs"] == [{"pack": pid, "chunks": n, "healable": 0}]
    assert len(doc["damaged"]) == n and {d["pack"] for d in doc["damaged"]} == {pid}
