"""The two executors of one stage graph: threads in this process (``engine_local``), or Ray
actors (here), and the choice between them (``make_engine``).

Both host the same fused worker stage (read -> chunk -> hash -> dedup -> compress -> write) and
the same dedup index. Only extents go in and small result tables come out; bulk bytes never cross
a process boundary. The driver keeps at most ``window`` work items in flight (backpressure).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

import pyarrow as pa

from catalog import errors
from catalog.errors import CombError, StageError
from catalog.store.sealing import PLAIN, Sealer
from stages.backup import IndexClient
from stages.base import Fused, Ports, Stage

from . import ray_processes
from .engine_local import LocalEngine as LocalEngine  # (re-exported: make_engine makes it)
from .profile import ray_events_of, summed
from .ray_actors import RAY_CALL_TIMEOUT_S, IndexHost, RayIndexClient, StageHost
from .ray_actors import ray_module as _ray
from .ray_local import running_local_ray
from .ray_placement import matching_nodes, unplaced_reason

RAY_PING_TIMEOUT_S = 60.0
# The embedded Ray's object store: only small tables travel, so a small store suffices.
RAY_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# After ray.shutdown(), how long the embedded Ray's processes get to exit before being killed.
RAY_SHUTDOWN_GRACE_S = 5.0
# Index shards when none is asked for: one per this many workers, at most MAX_AUTO_SHARDS
# (one shard answers ~100k ids a second on one core: bench/README.md "Bulk jobs").
WORKERS_PER_SHARD = 8
MAX_AUTO_SHARDS = 16
MAX_INDEX_SHARDS = 256  # (--index-shards)
RAY_TASK_EVENTS_S = 1.0  # with --timeline: how often Ray's workers report their task events

MakeStage = Callable[[IndexClient], Stage]
# Variables the workers read themselves (README "Tuning and environment"), handed to actors,
# and every AWS_* variable: an S3 repository's endpoint, region and credentials.
WORKER_ENV = ("COMB_DIRECT_IO", "COMB_PARITY_ENCODER", "COMB_S3_MAX_REQUESTS_PER_S")
WORKER_ENV_PREFIXES = ("AWS_",)


def worker_env() -> dict[str, str]:
    """What the driver's environment hands to every actor (a cluster's or a running Ray's
    workers do not inherit it)."""
    return {
        k: v for k, v in os.environ.items() if k in WORKER_ENV or k.startswith(WORKER_ENV_PREFIXES)
    }


class Engine(Protocol):
    name: str
    workers: int
    startup_s: float
    keep_warm: bool  # close() keeps what start() started for the next run (``job serve``)
    cpu_by_stage: dict[str, float]  # after finish: CPU seconds per stage (``Fused.cpu_by_stage``)
    wall_by_stage: dict[str, float]  # ... and wall seconds (``pipeline.profile``)
    trace: bool  # set before start: ``timeline`` holds the run's events after finish
    timeline: list[dict[str, Any]]
    placements: tuple[str | None, ...]  # set before start: each disk's node (None: anywhere)
    unplaced: dict[str, str]  # after start: the placements that name no node, and why

    def start(self, repo_path: str, make_stage: MakeStage, sealer: Sealer = PLAIN) -> None: ...

    @property
    def width(self) -> int: ...

    def submit(self, item: pa.Table, node: str | None = None) -> Any: ...

    def node_of(self, handle: Any) -> tuple[str, str] | None: ...

    def result(self, handle: Any) -> Ports: ...

    def finish(self) -> list[Ports]: ...

    def close(self, failed: bool) -> None: ...

    def shutdown(self) -> None: ...


def _token_auth_as_ray_start() -> None:
    """A client of a Ray that `ray start` started: token authentication when RAY_AUTH_MODE is
    unset and a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as
    `ray start` decided for the cluster; a client that does not ask for it is refused. Ray's
    own function (its configuration is read at import, so the variable alone is too late)."""
    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # another Ray version: RAY_AUTH_MODE as the user set it
        return
    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # noqa: BLE001 - then ray.init says what is wrong, in one line
        pass
    finally:
        quiet.setLevel(level)


def ray_init_kwargs(address: str | None, trace: bool = False) -> dict[str, Any]:
    """Settings of the embedded local Ray (a small machine) or of a connection to a cluster;
    ``trace``: with the task events ``ray.timeline`` reads."""
    if address:
        return {"address": address, "logging_level": logging.ERROR, "log_to_driver": False}
    return {
        "address": "local",
        "num_cpus": os.cpu_count() or 2,
        "object_store_memory": RAY_OBJECT_STORE_BYTES,
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "_node_ip_address": "127.0.0.1",
        "_system_config": {
            "enable_metrics_collection": False,
            "metrics_report_interval_ms": 0,
            "task_events_report_interval_ms": int(RAY_TASK_EVENTS_S * 1000) if trace else 0,
        },
    }


def translate_ray_error(err: BaseException) -> CombError:
    """A one-line CombError for anything Ray raised."""
    ray = _ray()
    if isinstance(err, ray.exceptions.RayTaskError):
        # Ray re-raises a task's exception as a subclass of both RayTaskError and the original
        # class; the original (picklable) error is its cause.
        cause = getattr(err, "cause", None)
        if isinstance(cause, CombError):
            return type(cause)(cause.message)
        if cause is not None:
            return StageError(f"worker failed: {type(cause).__name__}: {cause}")
    if isinstance(err, CombError):
        return type(err)(err.message)
    if isinstance(err, ray.exceptions.GetTimeoutError):
        return StageError(f"a worker did not answer within {RAY_CALL_TIMEOUT_S:.0f} s")
    if isinstance(err, ray.exceptions.RayActorError):
        if getattr(err, "actor_init_failed", False):  # its __init__ raised: say what
            return _creation_error(str(err))
        return StageError("a worker actor died (killed or out of memory)")
    return StageError(f"ray: {_first_line(err)}")


_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def _creation_error(text: str) -> CombError:
    """An actor's failed ``__init__`` (Ray keeps only its traceback's text): comb's own error
    from its last line, the exception (a repository a worker cannot reach, say)."""
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
    found = _RAISED.match(last)
    cls = getattr(errors, found.group(1), None) if found else None
    if found and isinstance(cls, type) and issubclass(cls, CombError):
        return cls(found.group(2))
    return StageError(f"a worker could not start: {last or 'no reason given'}")


class RayEngine:
    """Fused worker actors plus the dedup index's shard actors on a local Ray or a cluster."""

    name = "ray"

    def __init__(
        self, address: str | None = None, workers: int | None = None, index_shards: int = 0
    ) -> None:
        # None: a Ray that `ray start` runs on this machine, else an embedded one; "local":
        # always an embedded one.
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.attached: str | None = None  # the running local Ray used (none was named)
        self.attach_failed = ""  # why the running local Ray found could not be used
        self.workers = workers or 0
        self.index_shards = index_shards  # 0: one per WORKERS_PER_SHARD workers
        self.index_stats: list[tuple[float, int]] = []  # per shard: CPU seconds, ids asked
        self.startup_s = 0.0
        self.keep_warm = False
        self.cpu_by_stage: dict[str, float] = {}
        self.wall_by_stage: dict[str, float] = {}
        self.trace = False
        self.timeline: list[dict[str, Any]] = []
        self._began = 0.0
        self._started_ray = False  # ray.init was ours: so is ray.shutdown
        self._embedded = False  # ... and the Ray it started is ours too (not a cluster's)
        self._actors: list[Any] = []
        self._index: list[Any] = []
        self._turns: dict[str | None, int] = {}
        self.placements: tuple[str | None, ...] = ()  # set before start: each disk's ``node``
        self.unplaced: dict[str, str] = {}  # after start: placements naming no node, and why
        self._pools: dict[str | None, list[int]] = {}
        self._nodes: list[tuple[str, str]] = []  # each worker's node id and address
        self._ran: dict[Any, int] = {}
        self._other_children: set[ray_processes.Key] = set()

    def start(self, repo_path: str, make_stage: MakeStage, sealer: Sealer = PLAIN) -> None:
        ray = _ray()
        t0 = time.perf_counter()
        self._began = time.time()  # (a warm Ray's earlier events are not this run's)
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            # Children this process had before Ray: never Ray's to clean up (see close).
            self._other_children = ray_processes.children()
            self._connect(ray)
        # A running local Ray may have other nodes: comb's actors stay on this one.
        pin, node_cpus = _this_node(ray) if self.attached else ({}, 0)
        if not self.workers:
            cpus = max(1, int(node_cpus or ray.cluster_resources().get("CPU", 1)))
            # As on threads: one worker more than cores on a single-node Ray of this machine.
            self.workers = cpus + 1 if self._embedded or self.attached else cpus
        try:
            opts = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0}
            spread = {} if pin or self._embedded else {"scheduling_strategy": "SPREAD"}
            index_cls = ray.remote(**opts, **(pin or spread))(IndexHost)
            host_cls = ray.remote(**opts)(StageHost)
            env = worker_env()
            n = self.index_shards or max(1, min(MAX_AUTO_SHARDS, self.workers // WORKERS_PER_SHARD))
            self._index = [index_cls.remote(repo_path, sealer, env, i, n) for i in range(n)]
            ray.get([i.ping.remote() for i in self._index], timeout=RAY_PING_TIMEOUT_S)
            client = RayIndexClient(self._index)
            where = self._placed(ray, pin)
            self._actors = [host_cls.options(**o).remote(self._traced(make_stage(client)), env)
                            for _, o in where]  # fmt: skip
            pinged = ray.get([a.ping.remote() for a in self._actors], timeout=RAY_PING_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001
            raise translate_ray_error(err) from None
        self._nodes = [(node, address) for _, node, address in pinged]
        self._pools = {}
        for i, (placement, _) in enumerate(where):
            self._pools.setdefault(placement, []).append(i)
        self.startup_s = time.perf_counter() - t0

    def _placed(self, ray: Any, pin: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
        """Each worker's placement and actor options: ``workers`` anywhere (spread over a
        cluster's nodes; on the driver's node of a running local Ray), and for each placement
        one worker per CPU of every node it names (``unplaced``: those naming none)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as OnNode

        wanted = list(dict.fromkeys(self.placements or (None,)))
        cluster = not (pin or self._embedded)
        nodes = ray.nodes() if any(wanted) or cluster else []
        self.unplaced = {}
        out: list[tuple[str | None, dict[str, Any]]] = []
        for placement in wanted:
            if placement is None:  # (a cluster's nodes by their CPUs: 0-CPU actors ignore them)
                spread = [{"scheduling_strategy": OnNode(node_id=n, soft=False)}
                          for n in _by_cpus(nodes)] if cluster else []  # fmt: skip
                out += [
                    (None, spread[i % len(spread)] if spread else pin) for i in range(self.workers)
                ]
                continue
            found = matching_nodes(nodes, placement)
            if not found:
                self.unplaced[placement] = unplaced_reason(nodes, placement)
            for node in found:
                on = {"scheduling_strategy": OnNode(node_id=node["NodeID"], soft=False)}
                out += [(placement, on)] * max(1, int(node["Resources"].get("CPU", 1)))
        return out

    def _traced(self, stage: Stage) -> Stage:
        if isinstance(stage, Fused):
            stage.tracing = self.trace
        return stage

    def _connect(self, ray: Any) -> None:
        """ray.init: the named cluster, else this user's running local Ray (falling back to an
        embedded one when it cannot be used: ``attach_failed`` says why), else embedded."""
        address = self.address
        if address is None:
            address = self.attached = running_local_ray()
            if address is not None:
                _token_auth_as_ray_start()
        elif address == "local":
            address = None
        self._started_ray = True  # (from now on: a start cut short is cleaned up too)
        try:
            with ray_processes.ray_starting():
                ray.init(**ray_init_kwargs(address, self.trace))
        except Exception as err:  # noqa: BLE001 - any start failure is one line
            why = _first_line(err)
            if not self.attached:
                raise StageError(f"cannot start or reach Ray: {why}") from None
            self.attach_failed, self.attached, address = why, None, None
            ray.shutdown()
            self._connect_embedded(ray)
        self._embedded = address is None

    def _connect_embedded(self, ray: Any) -> None:
        try:
            with ray_processes.ray_starting():
                ray.init(**ray_init_kwargs(None, self.trace))
        except Exception as err:  # noqa: BLE001
            raise StageError(
                f"cannot start Ray: {_first_line(err)} (after the Ray running here could not be "
                f"used: {self.attach_failed})"
            ) from None

    @property
    def width(self) -> int:
        """Workers running (those of every placement): items in flight scale with it."""
        return len(self._actors) or self.workers

    def submit(self, item: pa.Table, node: str | None = None) -> Any:
        pool = self._pools[node]
        turn = self._turns.get(node, 0)  # (each pool its own turns: all its workers busy)
        self._turns[node] = turn + 1
        i = pool[turn % len(pool)]
        ref = self._actors[i].process.remote(item)
        self._ran[ref] = i
        return ref

    def node_of(self, handle: Any) -> tuple[str, str] | None:
        """The node id and address of the worker that ran ``handle`` (asked once)."""
        i = self._ran.pop(handle, None)
        return None if i is None else self._nodes[i]

    def result(self, handle: Any) -> Ports:
        ray = _ray()
        try:
            return ray.get(handle, timeout=RAY_CALL_TIMEOUT_S)  # type: ignore[no-any-return]
        except Exception as err:  # noqa: BLE001
            raise translate_ray_error(err) from None

    def finish(self) -> list[Ports]:
        ray = _ray()
        try:
            out = ray.get([a.flush.remote() for a in self._actors], timeout=RAY_CALL_TIMEOUT_S)
            got = ray.get([a.profile.remote() for a in self._actors], timeout=RAY_CALL_TIMEOUT_S)
            claims = [i.claim_stats.remote() for i in self._index]
            self.cpu_by_stage = summed(cpu for cpu, _, _ in got)
            self.wall_by_stage = summed(wall for _, wall, _ in got)
            if self.trace:  # Ray's own events (reported each second), then the stages'
                time.sleep(RAY_TASK_EVENTS_S + 0.2)
                job = ray.get_runtime_context().get_job_id()
                mine = ray_events_of(ray.timeline(), job, self._began)
                self.timeline = [*mine, *(e for _, _, events in got for e in events)]
            # The index's own CPU, beside what asking it cost the workers.
            self.index_stats = ray.get(claims, timeout=RAY_CALL_TIMEOUT_S)
            self.cpu_by_stage["index actor"] = sum(cpu for cpu, _ in self.index_stats)
        except Exception as err:  # noqa: BLE001
            raise translate_ray_error(err) from None
        return out  # type: ignore[no-any-return]

    def close(self, failed: bool) -> None:
        ray = _ray()
        if ray.is_initialized():
            with suppress(Exception):  # (the actors are killed next anyway)
                ray.get([a.teardown.remote() for a in self._actors], timeout=30)
            for a in [*self._actors, *self._index]:
                with suppress(Exception):  # (gone already)
                    ray.kill(a)
        self._actors, self._index, self._ran = [], [], {}
        if not self.keep_warm or failed:  # (after a failure the next run starts afresh)
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the Ray this engine started, a start cut short included (its processes are
        this one's children; a cluster's or a running local Ray's are not, and are left)."""
        if self._started_ray:
            ours = ray_processes.descendants_since(self._other_children)
            with suppress(Exception):  # (a start cut short: what it started is reaped)
                _ray().shutdown()
            ray_processes.reap(ours, RAY_SHUTDOWN_GRACE_S)
        self._started_ray = self._embedded = False


def _by_cpus(nodes: list[dict[str, Any]]) -> list[str]:
    """Alive nodes' ids, each as many times as it has CPUs, interleaved (A B A B B B for 2 and
    4 CPUs): workers taken in this order go to the nodes in proportion to their CPUs."""
    cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in nodes if n.get("Alive")}
    return [node for r in range(max(cpus.values(), default=0)) for node, c in cpus.items() if c > r]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _this_node(ray: Any) -> tuple[dict[str, Any], float]:
    """Actor options that keep actors on the driver's node, and that node's CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return {"scheduling_strategy": strategy}, cpus


def make_engine(
    name: str, ray_address: str | None = None, workers: int | None = None, index_shards: int = 0
) -> Engine:
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(ray_address, workers, index_shards)
    raise CombError(f"unknown engine {name!r} (use ray or local)")
