"""The local engine: the stage graph's fused workers on threads in this process (the baseline
of every benchmark, and the better choice on small machines), sharing one dedup index.

Owns the thread pool, the workers' lifetimes and the summing of their CPU profiles. Must not:
import Ray (``pipeline.engines`` holds the Ray engine and chooses between the two).
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from catalog.store.index import DedupIndex
from catalog.store.locations import storage_at
from catalog.store.sealing import PLAIN, Sealer
from stages.base import Fused, Ports

from .malloc import keep_freed_memory
from .profile import summed, trace_events

if TYPE_CHECKING:
    from .engines import MakeStage


class LocalEngine:
    """The same stages on threads in one process (the baseline, and small machines)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        # One worker more than cores covers the GIL hand-offs and fsync stalls of the others
        # (+8-18 % MB/s for +45 MiB, bench/README.md "Where the time goes").
        self.workers = workers or (os.cpu_count() or 2) + 1
        self.startup_s = 0.0
        self.keep_warm = False  # (threads: nothing to keep between runs)
        self.cpu_by_stage: dict[str, float] = {}
        self.wall_by_stage: dict[str, float] = {}
        self.trace = False  # keep each stage's spans for ``timeline``
        self.timeline: list[dict[str, object]] = []
        self.placements: tuple[str | None, ...] = ()
        self.unplaced: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._free: queue.Queue[Fused] = queue.Queue()
        self._stages: list[Fused] = []
        self.index: DedupIndex | None = None

    def start(self, repo_path: str, make_stage: MakeStage, sealer: Sealer = PLAIN) -> None:
        t0 = time.perf_counter()
        keep_freed_memory()
        self.index = DedupIndex.load(storage_at(repo_path, sealer))
        for _ in range(self.workers):
            made = make_stage(self.index)
            stage = made if isinstance(made, Fused) else Fused([made])
            stage.tracing = self.trace
            stage.setup()
            self._stages.append(stage)
            self._free.put(stage)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="comb-worker")
        self.startup_s = time.perf_counter() - t0

    def _run(self, item: pa.Table) -> Ports:
        stage = self._free.get()
        try:
            return stage.process(item)
        finally:
            self._free.put(stage)

    @property
    def width(self) -> int:
        return self.workers

    def submit(self, item: pa.Table, node: str | None = None) -> Future[Ports]:
        """``node``: threads have no placement (job files' ``node`` needs Ray)."""
        assert self._pool is not None
        return self._pool.submit(self._run, item)

    def node_of(self, handle: Future[Ports]) -> tuple[str, str] | None:
        return None

    def result(self, handle: Future[Ports]) -> Ports:
        return handle.result()

    def finish(self) -> list[Ports]:
        out = [s.flush() for s in self._stages]
        self.cpu_by_stage = summed(s.cpu_by_stage() for s in self._stages)
        self.wall_by_stage = summed(s.wall_by_stage() for s in self._stages)
        self.timeline = [
            e for i, s in enumerate(self._stages) for e in trace_events(f"thread {i}", s.spans())
        ]
        return out

    def close(self, failed: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for s in self._stages:
            s.teardown()
        self._stages = []
        self._free = queue.Queue()  # (a next run starts its own stages)
        self.index = None  # (a server between rounds holds no index)

    def shutdown(self) -> None:
        """Nothing outlives ``close``."""
