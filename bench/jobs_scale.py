"""What ``python -m bench jobs`` adds about scale: the dedup index's claims per second per shard
(real ``IndexHost`` actors over the job's repository, 1 and 4 shards, asked by several callers
at once through the workers' own client), and a projection of a job to 10 and 100 nodes from
the measured MB/s of this node's workers, per-shard claims/s and the driver's CPU per GB.

The projection is arithmetic on those measurements (nodes like this one: its cores, its
workers' rate, start-up left out); it says which part stops scaling first and at what size.
Must not: judge anything but the figures it prints.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import numpy as np

CHUNK = 64 * 1024
BATCH_IDS = 256  # a 16 MiB work item of 64 KiB chunks
CALLERS = 4


def claims_per_second(repo: str, password: str, shards: int, seconds: float = 4.0) -> float:
    """Ids claimed per second by ``shards`` index actors over ``repo``'s index, asked by
    ``CALLERS`` threads at once, each a batch of ``BATCH_IDS`` new random ids at a time."""
    import ray  # (the bench that measures Ray may import it)

    from catalog.repo import Repository
    from pipeline.engines import ray_init_kwargs
    from pipeline.ray_actors import IndexHost, RayIndexClient

    sealer = Repository.open(repo, password=password).sealer.for_workers()
    ray.init(**ray_init_kwargs(None))
    try:
        host = ray.remote(num_cpus=0)(IndexHost)
        handles = [host.remote(repo, sealer, {}, i, shards) for i in range(shards)]
        ray.get([h.ping.remote() for h in handles])  # type: ignore[attr-defined]
        client = RayIndexClient(handles)
        counts = [0] * CALLERS
        stop = time.perf_counter() + seconds

        def call(k: int) -> None:
            rng = np.random.default_rng(k)
            while time.perf_counter() < stop:
                client.claim(rng.integers(0, 256, (BATCH_IDS, 32), dtype=np.uint8))
                counts[k] += BATCH_IDS

        t0 = time.perf_counter()
        threads = [threading.Thread(target=call, args=(k,)) for k in range(CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


def projection(node_mb_s: float, shard_ids_s: float, driver_cpu_s_per_gb: float,
               cores: int) -> list[list[str]]:  # fmt: skip
    """Rows for 1, 10 and 100 nodes like this one."""
    rows = []
    for nodes in (1, 10, 100):
        workers = nodes * cores
        mb_s = nodes * node_mb_s
        ids_s = mb_s * 1e6 / CHUNK
        shards = max(1, math.ceil(ids_s / shard_ids_s))
        driver_cores = mb_s / 1000 * driver_cpu_s_per_gb  # CPU seconds per second
        rows.append([str(nodes), str(workers), f"{mb_s:,.0f}", f"{ids_s:,.0f}", str(shards),
                     f"{driver_cores:.2f}"])  # fmt: skip
    return rows


def scale_figures(job: dict[str, Any], claims: dict[int, float]) -> dict[str, Any]:
    """This node's rate and the driver's cost in a Ray job run (``bench.jobs``), and the
    limits of one driver and one shard."""
    run_s = max(1e-9, job["seconds"] - job["startup_seconds"])
    node_mb_s = job["data_bytes"] / run_s / 1e6
    driver_per_gb = job["driver_cpu_seconds"] / (job["data_bytes"] / 1e9)
    # A shard's capacity is the one-shard run's: a shard alone on its core, as on a cluster
    # (more shards than cores here share them with their callers).
    per_shard = claims[min(claims)] / min(claims)
    return {
        "node_mb_s": node_mb_s,
        "driver_cpu_s_per_gb": driver_per_gb,
        "claims_per_s_per_shard": per_shard,
        # what one driver and one shard can feed, in MB/s of data
        "driver_limit_mb_s": 1000 / driver_per_gb if driver_per_gb else float("inf"),
        "shard_limit_mb_s": per_shard * CHUNK / 1e6,
        "cores": os.cpu_count() or 2,
    }
