"""``python -m bench batch``: work-item (batch) size and pack size of a full backup.

DEFAULT_BATCH_BYTES (pipeline/jobs/runner.py) and DEFAULT_PACK_TARGET_BYTES (catalog/store/packs.py)
cite this table. Each setting runs a full backup of the same mixed image on one engine, in
interleaved rounds (best wall kept, CPU-s/GB is the load-robust figure); peak PSS shows what
bigger batches cost in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from pipeline.engines import make_engine
from pipeline.jobs.backup import run_backup
from pipeline.jobs.runner import BackupOptions

from .image import MIB, generate_image, mixed_path, mixed_spec, parse_size, warm
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import mib, table
from .runs import fresh_repo
from .sampler import TreeSampler, load_average


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench batch", description=__doc__)
    ap.add_argument("--size", default="2G", help="mixed image size (default 2G)")
    ap.add_argument("--batches", default="4,16,64", help="work-item sizes, MiB")
    ap.add_argument("--packs", default="16,64,256", help="pack target sizes, MiB")
    ap.add_argument("--engine", default="local")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    return ap.parse_args(argv)


def _run(image: str, repo_dir: str, engine: str, batch: int, pack: int) -> dict[str, Any]:
    repo = fresh_repo(repo_dir)
    opts = BackupOptions(batch_bytes=batch * MIB, pack_target_bytes=pack * MIB)
    eng = make_engine(engine)
    with TreeSampler() as s:
        point = run_backup(repo, image, eng, opts)
    size = os.path.getsize(image)
    u = s.usage
    return {
        "batch_mib": batch,
        "pack_mib": pack,
        "wall_s": round(u.wall_s, 3),
        "work_s": round(point.stats.seconds - eng.startup_s, 3),
        "mbps": round(size / u.wall_s / 1e6, 1),
        "cpu_s_per_gb": round(u.cpu_s / (size / 1e9), 3),
        "peak_pss": u.peak_pss,
        "foreign_cores": round(u.foreign_cores, 2),
    }


def main(argv: list[str]) -> int:
    args = _parse(argv)
    env = describe()
    print("\n".join(header_lines(env)))
    size = parse_size(args.size)
    image = mixed_path(args.workdir, size)
    print(generate_image(mixed_spec(size), image).summary())
    warm(image)
    repo_dir = os.path.join(args.workdir, "repo-batch")
    default_pack = 64
    settings = [(int(b), default_pack) for b in args.batches.split(",") if b]
    settings += [(16, int(p)) for p in args.packs.split(",") if p and int(p) != default_pack]
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for _ in range(max(1, args.repeat)):
        for batch, pack in settings:
            r = _run(image, repo_dir, args.engine, batch, pack)
            if (batch, pack) not in best or r["wall_s"] < best[(batch, pack)]["wall_s"]:
                best[(batch, pack)] = r
    shutil.rmtree(repo_dir)
    rows = [
        [f"{b} MiB", f"{p} MiB", f"{r['wall_s']:.2f}", f"{r['mbps']:.0f}",
         f"{r['cpu_s_per_gb']:.2f}", mib(r["peak_pss"]), f"{r['foreign_cores']:.2f}"]
        for (b, p), r in best.items()
    ]  # fmt: skip
    title = f"batch and pack size, {size / 2**30:g} GiB image, engine {args.engine}, best of "
    header = ["batch", "pack", "wall s", "MB/s", "CPU-s/GB", "peak PSS MiB", "foreign cores"]
    print(table(title + str(args.repeat), header, rows, left=2))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_average())}")
    print(json.dumps({"bench": "batch", "env": env, "size": size, "results": list(best.values())}))
    return 0
