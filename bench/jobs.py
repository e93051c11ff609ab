"""``python -m bench jobs``: N sources backed up as one job (``comb backup SRC ...``: one engine
run, one dedup index) against N separate ``comb backup`` commands, on Ray (comb's own, which
every command starts) and on the local engine (threads, the baseline), in one run.

"best single" is the fastest separate command's data rate without its engine's start-up (the
pipeline's own rate), which the job, start-up included, should come near (the machine is then
saturated). The sources are mixed images of ``--size`` with seeds 1..N (different data, as
separate VMs have). Every command is a real ``comb`` process, so each pays its own start-up
(Ray's above all) in its wall time; each way starts from a new repository. Must not: judge
anything but the targets it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from pipeline.profile import STAGE_SECONDS

from .image import GIB, generate_image, mixed_path, mixed_spec, parse_size, warm
from .jobs_scale import BATCH_IDS, claims_per_second, projection, scale_figures
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import Target, table, targets_table
from .runs import BENCH_PASSWORD


def _comb(repo: str, *args: str) -> tuple[float, list[dict[str, Any]]]:
    """One ``comb`` process: its wall seconds and the JSON lines it printed."""
    env = dict(os.environ, COMB_PASSWORD=BENCH_PASSWORD, RAY_ADDRESS="local")
    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-r", repo, *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"bench jobs: comb {' '.join(args[:2])} failed: {run.stderr.strip()}")
    return seconds, [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


def _ways(images: list[str], engine: str, workdir: str) -> dict[str, Any]:
    """The separate commands, then the job, each into a new repository."""
    repo = os.path.join(workdir, "jobs-repo")
    out: dict[str, Any] = {}
    for way in ("separate", "job"):
        shutil.rmtree(repo, ignore_errors=True)
        _comb(repo, "init", "--json")
        for image in images:
            warm(image)
        if way == "separate":
            runs = [
                _comb(repo, "backup", image, "--engine", engine, "--json", "--no-files")
                for image in images
            ]
            walls = [w for w, _ in runs]
            data = [sum(d["bytes_read"] for d in docs) for _, docs in runs]
            # The pipeline's own rate: the command's wall less its engine's start-up.
            starts = [docs[0]["engine_startup_seconds"] for _, docs in runs]
            best = max(d / (w - s) / 1e6 for d, w, s in zip(data, walls, starts, strict=True))
            out[way] = {"seconds": sum(walls), "data_bytes": sum(data), "each_seconds": walls,
                        "best_mb_s": best}  # fmt: skip
        else:
            wall, docs = _comb(repo, "backup", *images, "--engine", engine, "--json", "--no-files")
            out[way] = {"seconds": wall, "data_bytes": sum(d["bytes_read"] for d in docs),
                        "startup_seconds": docs[0]["engine_startup_seconds"],
                        "stage_seconds": docs[0]["stage_seconds"],
                        "driver_cpu_seconds": docs[0]["driver_cpu_seconds"]}  # fmt: skip
            if engine == "ray":  # the index shards over this job's index, 1 and 4 of them
                out["claims_per_s"] = {n: claims_per_second(repo, BENCH_PASSWORD, n)
                                       for n in (1, 4)}  # fmt: skip
    shutil.rmtree(repo, ignore_errors=True)
    return out


def _stage_rows(runs: dict[str, Any]) -> list[list[str]]:
    rows = []
    for engine, r in runs.items():
        stages = r["job"]["stage_seconds"]
        total = sum(stages.values()) or 1.0
        rows.append([engine, *(f"{stages[k]:.1f} ({stages[k] / total:.0%})" for k in STAGE_SECONDS),
                     f"{r['job']['driver_cpu_seconds']:.1f}"])  # fmt: skip
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench jobs", description=__doc__)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--size", default="1G", help="size of each source")
    ap.add_argument("--engines", default="ray,local")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    images = []
    for seed in range(1, args.sources + 1):
        path = mixed_path(args.workdir, size, seed)
        generate_image(mixed_spec(size, seed), path)
        images.append(path)
    env = describe()  # (the load before the runs)
    runs = {engine: _ways(images, engine, args.workdir) for engine in args.engines.split(",")}
    print("\n".join(header_lines(env)))
    rows, targets = [], []
    for engine, r in runs.items():
        sep, job = r["separate"], r["job"]
        job_mb_s = job["data_bytes"] / job["seconds"] / 1e6
        rows.append([engine, f"{sep['seconds']:.1f}", f"{job['seconds']:.1f}",
                     f"{sep['seconds'] / job['seconds']:.2f}x", f"{job_mb_s:.0f}",
                     f"{sep['best_mb_s']:.0f}", f"{job_mb_s / sep['best_mb_s']:.2f}x"])  # fmt: skip
        if engine == "ray":
            targets.append(Target("job vs separate commands, Ray: wall-time speed-up",
                                  sep["seconds"] / job["seconds"], ">=", 1.5, "x", ""))  # fmt: skip
            targets.append(Target("job MB/s / best single-source MB/s, Ray",
                                  job_mb_s / sep["best_mb_s"], ">=", 0.9, "x",
                                  "the machine saturated"))  # fmt: skip
    print(
        table(
            f"{args.sources} sources of {size / GIB:g} GiB: one job against separate commands",
            ["engine", "separate s", "job s", "speed-up", "job MB/s",
             "best single MB/s (no start-up)", "job / best single"],
            rows,
        )
    )  # fmt: skip
    print(targets_table(targets))
    print(table("where the job's worker-seconds went (stage_seconds), and the driver's CPU s",
                ["engine", *STAGE_SECONDS, "driver CPU s"], _stage_rows(runs)))  # fmt: skip
    doc = {"bench": "jobs", "sources": args.sources, "size": size, "runs": runs}
    if "ray" in runs:
        claims = runs["ray"]["claims_per_s"]
        print(table("dedup index claims per second (IndexHost actors over the job's index, "
                    f"{BATCH_IDS}-id batches from 4 callers)",
                    ["shards", "ids/s in all", "ids/s per shard", "MB/s of data it can feed"],
                    [[str(n), f"{c:,.0f}", f"{c / n:,.0f}", f"{c * 65536 / 1e6:,.0f}"]
                     for n, c in claims.items()]))  # fmt: skip
        scale = scale_figures(runs["ray"]["job"], claims)
        print(table(
            f"projection: nodes like this one ({scale['cores']} cores, "
            f"{scale['node_mb_s']:.0f} MB/s without start-up); a shard claims "
            f"{scale['claims_per_s_per_shard']:,.0f} ids/s; the driver spends "
            f"{scale['driver_cpu_s_per_gb']:.2f} CPU-s per GB",
            ["nodes", "workers", "MB/s", "ids/s to claim", "shards needed", "driver cores"],
            projection(scale["node_mb_s"], scale["claims_per_s_per_shard"],
                       scale["driver_cpu_s_per_gb"], scale["cores"]),
        ))  # fmt: skip
        print(
            f"one driver feeds at most {scale['driver_limit_mb_s']:,.0f} MB/s; one index shard "
            f"{scale['shard_limit_mb_s']:,.0f} MB/s of new data"
        )
        doc["scale"] = scale
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    print(json.dumps(doc))
    return 0
