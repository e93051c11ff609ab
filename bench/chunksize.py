"""``python -m bench chunksize``: which chunk size should be the default?

For each chunk size (16 to 256 KiB) on the same mixed image: full backup time and stored bytes,
then the two change patterns (1,000 scattered 4 KiB writes; 5 % of 64 KiB blocks rewritten) as
incrementals with their change lists: stored bytes, metadata bytes, time. Small chunks store less
per scattered change but cost per-chunk work and index/manifest rows; large chunks the opposite.
The figures chose DEFAULT_CHUNK_SIZE_BYTES (catalog/store/format.py); see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from .image import (
    GIB,
    KIB,
    change_block_rewrites,
    change_scattered_writes,
    generate_image,
    mixed_path,
    mixed_spec,
    parse_size,
    sparse_copy,
    warm,
)
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import MIB, mib, table
from .runs import BackupRun, backup, fresh_repo, index_per_chunk, repo_bytes
from .sampler import load_average

DEFAULT_CHUNK_KIB = (16, 32, 64, 128, 256)


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench chunksize", description=__doc__)
    ap.add_argument("--size", default="1G", help="mixed image size (default 1G)")
    ap.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNK_KIB)), help="KiB list")
    ap.add_argument("--engine", default="local")
    ap.add_argument("--repeat", type=int, default=2, help="full backups per size (best kept)")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--seed", type=int, default=1)
    return ap.parse_args(argv)


def _one(args: argparse.Namespace, base: str, chunk_kib: int) -> dict[str, Any]:
    work = os.path.join(args.workdir, "chunksize-work.img")
    repo_dir = os.path.join(args.workdir, "repo-chunksize")
    sparse_copy(base, work)
    warm(work)
    best: BackupRun | None = None
    for _ in range(max(1, args.repeat)):
        repo = fresh_repo(repo_dir, chunk_kib * KIB)
        run = backup(repo, work, args.engine, f"full {chunk_kib} KiB")
        best = run if best is None or run.wall_s < best.wall_s else best
    assert best is not None
    resident, chunks = index_per_chunk(repo)
    full_repo = repo_bytes(repo_dir)
    a = change_scattered_writes(work)
    inc_a = backup(repo, work, args.engine, "1000x4k", changed_extents=a.extents_path)
    b = change_block_rewrites(work)
    inc_b = backup(repo, work, args.engine, "5pct-64k", changed_extents=b.extents_path)
    shutil.rmtree(repo_dir)
    for path in (work, a.extents_path, b.extents_path):
        os.unlink(path)
    return {
        "chunk_kib": chunk_kib,
        "full": best.to_json(),
        "full_repo_bytes": full_repo,
        "index_resident_bytes": resident,
        "chunks_in_repo": chunks,
        "incr_1000x4k": inc_a.to_json(),
        "incr_5pct_64k": inc_b.to_json(),
        "change_5pct_compressed": b.compressed_bytes,
        "change_1000x4k_compressed": a.compressed_bytes,
    }


def _row(r: dict[str, Any]) -> list[str]:
    f, a, b = r["full"], r["incr_1000x4k"], r["incr_5pct_64k"]
    return [
        f"{r['chunk_kib']} KiB",
        f"{f['wall_s']:.2f}",
        f"{f['mbps']:.0f}",
        f"{f['cpu_s_per_gb']:.2f}",
        mib(f["stats"]["bytes_stored"]),
        f"{f['stats']['metadata_bytes'] / 1024:.0f}",
        mib(a["stats"]["bytes_stored"]),
        f"{a['stats']['metadata_bytes'] / 1024:.0f}",
        f"{a['wall_s']:.2f}",
        mib(b["stats"]["bytes_stored"]),
        f"{b['stats']['bytes_stored'] / max(1, r['change_5pct_compressed']):.2f}",
        f"{b['stats']['metadata_bytes'] / 1024:.0f}",
        f"{b['wall_s']:.2f}",
    ]


def main(argv: list[str]) -> int:
    args = _parse(argv)
    env = describe()
    print("\n".join(header_lines(env)))
    os.makedirs(args.workdir, exist_ok=True)
    size = parse_size(args.size)
    base = mixed_path(args.workdir, size, args.seed)
    print(generate_image(mixed_spec(size, args.seed), base).summary())
    results = []
    for kib in (int(x) for x in args.chunks.split(",") if x):
        results.append(_one(args, base, kib))
        print(f"  {kib} KiB done (load {load_average()[0]:.2f})")
    print(
        table(
            f"chunk size, {size / GIB:g} GiB mixed image, engine {args.engine}, full = best of "
            f"{args.repeat}; incrementals use the change list",
            [
                "chunk",
                "full s",
                "full MB/s",
                "CPU-s/GB",
                "full stored MiB",
                "full meta KiB",
                "1000x4k stored MiB",
                "meta KiB",
                "s",
                "5%x64K stored MiB",
                "/ compressed change",
                "meta KiB",
                "s",
            ],
            [_row(r) for r in results],
        )
    )
    print(
        f"5%x64K compressed change: {results[0]['change_5pct_compressed'] / MIB:.1f} MiB; "
        f"1000x4k compressed writes: {results[0]['change_1000x4k_compressed'] / MIB:.1f} MiB"
    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_average())}")
    print(json.dumps({"bench": "chunksize", "env": env, "size": size, "results": results}))
    return 0
