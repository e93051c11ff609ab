"""The stage contract, and fusing several stages into one (as Ray Data fuses operators).

A stage has plain picklable configuration, declared input and output schemas, and
``setup / process / flush / teardown``. ``process`` and ``flush`` return ports: the main port
``"out"`` feeds the next stage; other ports (``"index"``) are side outputs collected for the
driver. ``Fused`` refuses to connect stages whose schemas differ and wraps any failure into a
one-line ``StageError`` naming the stage and the extent. It also keeps its own profile: CPU and
wall seconds per stage, and (``tracing``) each stage's span per batch for a timeline, at most
``MAX_SPANS`` of them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import ClassVar

import pyarrow as pa

from catalog.errors import CombError, SourceError, SourceReadError, StageError, describe_os_error
from stages.schemas import MAIN_PORT

Ports = dict[str, pa.Table]
Span = tuple[str, float, float]  # (stage, start in seconds since the epoch, seconds)
MAX_SPANS = 200_000  # per worker: about 20 MB; a longer run's timeline shows its beginning


class Stage:
    """Base class of every stage. Subclasses set the schemas and implement ``process``."""

    name: ClassVar[str] = "stage"
    input_schema: ClassVar[pa.Schema]
    output_schema: ClassVar[pa.Schema]
    side_schemas: ClassVar[dict[str, pa.Schema]] = {}

    def setup(self) -> None:
        """Acquire resources (files, buffers); called once in the hosting process."""

    def process(self, batch: pa.Table) -> Ports:
        raise NotImplementedError

    def flush(self) -> Ports:
        """Emit whatever is buffered at the end of the job."""
        return {}

    def teardown(self) -> None:
        """Release resources; after a failure, discard unfinished output."""

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds of named parts of this stage's work (``Fused.cpu_by_stage``: whatever
        is not in a part counts under the stage's own name); none unless a stage splits."""
        return {}


def _extent(batch: pa.Table | None) -> str:
    if batch is None or batch.num_rows == 0 or "offset" not in batch.schema.names:
        return "at end of job"
    offs = batch.column("offset")
    first = offs[0].as_py()
    if "length" in batch.schema.names:
        last = offs[-1].as_py() + batch.column("length")[-1].as_py()
    else:
        last = offs[-1].as_py()
    return f"on extent {first}+{last - first}"


def _describe(err: BaseException) -> str:
    if isinstance(err, CombError):
        return err.message
    if isinstance(err, OSError):
        return describe_os_error(err)
    return f"{type(err).__name__}: {err}"


class Fused(Stage):
    """Several stages run back to back in one thread: bulk bytes never leave the process."""

    name = "fused"

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ValueError("Fused needs at least one stage")
        for up, down in zip(stages, stages[1:], strict=False):
            if not up.output_schema.equals(down.input_schema):
                raise TypeError(
                    f"cannot connect stage {up.name} to {down.name}: output schema "
                    f"{up.output_schema.names} differs from input {down.input_schema.names}"
                )
        self.stages = stages
        self.name = "+".join(s.name for s in stages)  # type: ignore[misc]
        self.input_schema = stages[0].input_schema  # type: ignore[misc]
        self.output_schema = stages[-1].output_schema  # type: ignore[misc]
        sides: dict[str, pa.Schema] = {}
        for s in stages:
            sides.update(s.side_schemas)
        self.side_schemas = sides  # type: ignore[misc]
        self._cpu: defaultdict[int, float] = defaultdict(float)
        self._wall: defaultdict[int, float] = defaultdict(float)
        self.tracing = False  # (set before the worker starts: its spans are kept)
        self._spans: list[Span] = []

    def wall_by_stage(self) -> dict[str, float]:
        """Wall seconds of this worker per stage (waits included: reading, the index's answer,
        writing)."""
        out: dict[str, float] = {}
        for i, s in enumerate(self.stages):
            out[s.name] = out.get(s.name, 0.0) + self._wall[i]
        return out

    def spans(self) -> list[Span]:
        """Each stage's span per batch, when ``tracing``."""
        return list(self._spans)

    def _timed(self, i: int, fn):  # type: ignore[no-untyped-def]
        t0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn()
        finally:
            wall = time.perf_counter() - w0
            self._cpu[i] += time.thread_time() - t0
            self._wall[i] += wall
            if self.tracing and len(self._spans) < MAX_SPANS:
                self._spans.append((self.stages[i].name, time.time() - wall, wall))

    def cpu_by_stage(self) -> dict[str, float]:
        """CPU seconds of this worker's thread per stage, and per part of the stages that split
        their work (``Stage.cpu_parts``): the pipeline's own profile (bench/README.md)."""
        out: dict[str, float] = {}
        for i, s in enumerate(self.stages):
            parts = s.cpu_parts()
            for name, secs in parts.items():
                out[name] = out.get(name, 0.0) + secs
            rest = self._cpu[i] - sum(parts.values())
            out[s.name] = out.get(s.name, 0.0) + max(0.0, rest)
        return out

    def setup(self) -> None:
        for s in self.stages:
            self._guard(s, None, s.setup)

    def process(self, batch: pa.Table) -> Ports:
        return self._run(0, batch, {})

    def _run(self, start: int, batch: pa.Table | None, sides: dict[str, list[pa.Table]]) -> Ports:
        for i in range(start, len(self.stages)):
            s = self.stages[i]
            if batch is None:
                break
            out = self._timed(i, lambda s=s, b=batch: self._guard(s, b, lambda: s.process(b)))
            batch = out.pop(MAIN_PORT, None)
            for port, table in out.items():
                sides.setdefault(port, []).append(table)
        result: Ports = {p: pa.concat_tables(ts) for p, ts in sides.items()}
        if batch is not None:
            result[MAIN_PORT] = batch
        return result

    def flush(self) -> Ports:
        sides: dict[str, list[pa.Table]] = {}
        mains: list[pa.Table] = []
        for i, s in enumerate(self.stages):
            out = self._timed(i, lambda s=s: self._guard(s, None, s.flush))
            main = out.pop(MAIN_PORT, None)
            for port, table in out.items():
                sides.setdefault(port, []).append(table)
            if main is not None:
                rest = self._run(i + 1, main, sides)
                sides = {p: [t] for p, t in rest.items() if p != MAIN_PORT}
                if MAIN_PORT in rest:
                    mains.append(rest[MAIN_PORT])
        result: Ports = {p: pa.concat_tables(ts) for p, ts in sides.items()}
        if mains:
            result[MAIN_PORT] = pa.concat_tables(mains)
        return result

    def teardown(self) -> None:
        for s in reversed(self.stages):
            try:
                s.teardown()
            except Exception:  # noqa: BLE001 - teardown must release every stage
                pass

    @staticmethod
    def _guard(stage: Stage, batch: pa.Table | None, fn):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except StageError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes one named line
            kind = SourceReadError if isinstance(err, SourceError) else StageError
            raise kind(f"stage {stage.name} failed {_extent(batch)}: {_describe(err)}") from err
