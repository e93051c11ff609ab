"""The Ray actors of an engine run (``pipeline.engines`` starts them): ``StageHost`` hosts a fused
worker stage, ``IndexHost`` one shard of the dedup index, and ``RayIndexClient`` (inside every
worker) asks the shards, each id the shard its prefix names (``catalog.store.index.shard_of``).

Only chunk ids reach the index shards; bulk bytes stay in the workers. A client with several
shards sends each its part at once and waits for all: a batch costs one round trip, whatever
the number of shards.

Owns the actors and the client. Must not: start Ray or choose where actors run
(``pipeline.engines``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.store.index import DedupIndex, shard_of
from catalog.store.locations import storage_at
from catalog.store.sealing import Sealer
from stages.base import Fused, Ports, Stage

from .malloc import keep_freed_memory
from .profile import trace_events

# Every ray.get waits at most this long: a hung actor must fail the job, not hang it.
RAY_CALL_TIMEOUT_S = 300.0


def ray_module():  # type: ignore[no-untyped-def]
    # Ray's crash-dump handler would take SIGTERM from comb's (read when Ray is imported).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray  # imported lazily: `--engine local` never pays Ray's import

    return ray


class StageHost:
    """The one generic actor: hosts any stage (here the fused worker stage)."""

    def __init__(self, stage: Stage, env: dict[str, str] | None = None) -> None:
        # comb's settings its workers read (a cluster's or a running Ray's workers do not
        # inherit the driver's environment; a job-wide runtime_env would cost new workers)
        os.environ.update(env or {})
        keep_freed_memory()
        self.stage = stage
        self.stage.setup()

    def ping(self) -> tuple[int, str, str]:
        """This worker's pid, node id and node address."""
        ray = ray_module()
        node = ray.get_runtime_context().get_node_id()
        return os.getpid(), node, ray.util.get_node_ip_address()

    def process(self, batch: pa.Table) -> Ports:
        return self.stage.process(batch)

    def flush(self) -> Ports:
        return self.stage.flush()

    def teardown(self) -> None:
        self.stage.teardown()

    def profile(self) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
        """CPU and wall seconds per stage, and the stage spans as timeline events."""
        stage = self.stage
        if not isinstance(stage, Fused):
            return {}, {}, []
        worker = f"worker {os.getpid()} on {ray_module().util.get_node_ip_address()}"
        return stage.cpu_by_stage(), stage.wall_by_stage(), trace_events(worker, stage.spans())


class IndexHost:
    """One shard of the dedup index (``shard`` of ``shards``): only chunk ids reach it."""

    def __init__(
        self, repo_path: str, sealer: Sealer, env: dict[str, str] | None = None,
        shard: int = 0, shards: int = 1,
    ) -> None:  # fmt: skip
        os.environ.update(env or {})  # (as StageHost: an S3 repository's settings)
        self.index = DedupIndex.load(storage_at(repo_path, sealer), shard, shards)
        self.cpu_s = 0.0
        self.ids = 0

    def ping(self) -> int:
        return len(self.index)

    def claim(self, ids: np.ndarray) -> np.ndarray:
        t0 = time.thread_time()
        try:
            return self.index.claim(ids)
        finally:
            self.cpu_s += time.thread_time() - t0
            self.ids += len(ids)

    def claim_stats(self) -> tuple[float, int]:
        """CPU seconds spent claiming, and ids asked about."""
        return self.cpu_s, self.ids


class RayIndexClient:
    """An IndexClient that asks the index shards (picklable: it holds only their handles)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def claim(self, ids: np.ndarray) -> np.ndarray:
        ray = ray_module()
        if len(self.handles) == 1:
            ref = self.handles[0].claim.remote(ids)
            return ray.get(ref, timeout=RAY_CALL_TIMEOUT_S)  # type: ignore[no-any-return]
        which = shard_of(ids, len(self.handles)) if len(ids) else np.zeros(0, np.int64)
        asked = [
            (mask, handle.claim.remote(ids[mask]))
            for i, handle in enumerate(self.handles)
            if (mask := which == i).any()
        ]
        out = np.zeros(len(ids), bool)
        for (mask, _), got in zip(
            asked, ray.get([r for _, r in asked], timeout=RAY_CALL_TIMEOUT_S), strict=True
        ):
            out[mask] = got
        return out
