"""Memory: an idle local Ray as the baseline, and peak memory of full backups at several sizes.

``python -m bench memory --sizes 4G,16G`` answers "does comb's memory depend on the image
size?": peak PSS of the local engine's process, and of all processes of the Ray engine above an
idle local Ray started with the same settings. Must not: judge targets (report.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass

from .image import GIB, generate_image, mixed_path, mixed_spec, parse_size, warm
from .machine import DEFAULT_WORKDIR
from .runs import backup, fresh_repo, index_per_chunk
from .sampler import load_average, tree_pss

MIB = 1024 * 1024
IDLE_SETTLE_S = 3.0  # Ray prestarts workers after init; let them come up before sampling


@dataclass(frozen=True)
class IdleRay:
    """A local Ray started with comb's embedded settings and left idle."""

    import_s: float
    init_s: float
    shutdown_s: float
    driver_pss: int  # this process before ray.init
    idle_pss: int  # this process and all Ray processes, idle (median of samples)

    @property
    def ray_pss(self) -> int:
        return self.idle_pss - self.driver_pss


def idle_ray(settle_s: float = IDLE_SETTLE_S) -> IdleRay:
    t0 = time.perf_counter()
    import ray

    from pipeline.engines import ray_init_kwargs

    import_s = time.perf_counter() - t0
    driver = tree_pss()
    t0 = time.perf_counter()
    ray.init(**ray_init_kwargs(None))
    init_s = time.perf_counter() - t0
    try:
        time.sleep(settle_s)
        samples = []
        for _ in range(5):
            samples.append(tree_pss())
            time.sleep(0.2)
    finally:
        t0 = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t0
    time.sleep(1.0)  # let Ray's processes exit before the next measurement
    return IdleRay(import_s, init_s, shutdown_s, driver, int(statistics.median(samples)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__)
    ap.add_argument("--sizes", default="4G,16G", help="image sizes, comma-separated")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    os.makedirs(args.workdir, exist_ok=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_average())}")
    idle = idle_ray() if "ray" in engines else None
    if idle is not None:
        print(
            f"idle Ray: {idle.ray_pss / MIB:.0f} MiB PSS above the driver "
            f"(init {idle.init_s:.2f} s, shutdown {idle.shutdown_s:.2f} s)"
        )
    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        image = mixed_path(args.workdir, size)
        info = generate_image(mixed_spec(size), image)
        print(info.summary())
        warm(image)
        for engine in engines:
            repo_dir = os.path.join(args.workdir, f"repo-memory-{engine}")
            repo = fresh_repo(repo_dir)
            run = backup(repo, image, engine, f"full {engine}")
            resident, chunks = index_per_chunk(repo)
            u = run.usage
            above = u.peak_pss - (idle.idle_pss if engine == "ray" and idle else u.start_pss)
            row = {
                "size_gib": size / GIB,
                "engine": engine,
                "wall_s": round(run.wall_s, 2),
                "peak_pss_mib": round(u.peak_pss / MIB, 1),
                "peak_rss_mib": round(u.peak_rss / MIB, 1),
                "above_baseline_mib": round(above / MIB, 1),
                "baseline": "idle Ray" if engine == "ray" else "process before the run",
                "index_bytes_per_chunk": round(resident / max(1, chunks), 2),
                "foreign_cores": round(u.foreign_cores, 2),
            }
            rows.append(row)
            print(
                f"{size / GIB:5.0f} GiB {engine:6s} wall {run.wall_s:6.1f} s  peak PSS "
                f"{u.peak_pss / MIB:7.0f} MiB  above {row['baseline']}: "
                f"{above / MIB:6.0f} MiB  (foreign load {u.foreign_cores:.2f} cores)"
            )
            shutil.rmtree(repo_dir)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_average())}")
    print(json.dumps({"memory": rows, "idle_ray": asdict(idle) if idle else None}))
    return 0
