"""Checkpoints of a running backup or copy, so that one killed half-way resumes (FORMAT.md 7.2).

Every ``COMB_CHECKPOINT_SECONDS`` (default 300) a run commits the index rows of the packs it has
sealed since its last checkpoint as ``resume/<lock id>/<file id>.parquet`` (the format of an
index segment, named by its content, under the run's lock id). They are not index segments:
no reader, verify or prune looks at them. A later backup or copy *adopts* the checkpoints of runs
whose lock is gone or stale (dead runs, never a live one's): under its own session and before
its dedup index loads, it commits the rows whose pack exists and no prune condemned as an
ordinary index segment, then removes the files. The packs a killed run sealed are thus reused,
and the next run of the same data sends only the rest. A run that commits its points removes
its own checkpoints (its segment lists their rows). A pack a prune removed, or condemned, in
between is left out (the checks a dedup index makes; FORMAT.md 13).

Owns checkpoint files, their adoption and their removal. Must not: decide what a backup stores
or commit points (``pipeline.jobs.runner``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CombError, CorruptionError, RepositoryError, UsageError
from catalog.store.condemned import condemned_packs
from catalog.store.index import INDEX_SCHEMA, IndexSegmentWriter
from catalog.store.locks import read_locks
from catalog.store.packs import pack_name
from catalog.store.parquet_io import ParquetStreamWriter, read_parquet
from catalog.store.storage import Storage

CHECKPOINT_ENV = "COMB_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_S = 300.0
RESUME_PREFIX = "resume"


def checkpoint_seconds() -> float | None:
    """Seconds between checkpoints (``COMB_CHECKPOINT_SECONDS``; 0: whenever packs were
    sealed; ``off``: none)."""
    raw = os.environ.get(CHECKPOINT_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_S
    if raw.lower() == "off":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{CHECKPOINT_ENV} must be a number of seconds >= 0 or off, not {raw!r}")
    return value


class Checkpoints:
    """The checkpoint files of one run (``run_id``: its lock's id; None: none are written)."""

    def __init__(self, storage: Storage, every_s: float | None, run_id: str | None) -> None:
        self._storage = storage
        self._every = every_s if run_id is not None else None
        self._folder = f"{RESUME_PREFIX}/{run_id}"
        self._open: ParquetStreamWriter | None = None
        self._since = time.monotonic()
        self.committed: list[str] = []  # names

    def add(self, rows: pa.Table) -> None:
        """Index rows of packs just sealed (durable); commits a checkpoint when one is due."""
        if self._every is None or not rows.num_rows:
            return
        if self._open is None:
            self._open = ParquetStreamWriter(self._storage, INDEX_SCHEMA)
        self._open.write(rows.cast(INDEX_SCHEMA))
        if time.monotonic() - self._since >= self._every:
            file_id, _bytes = self._open.commit(self._folder)
            self._open = None
            self._since = time.monotonic()
            self.committed.append(f"{self._folder}/{file_id}.parquet")

    def abort(self) -> None:
        """A failed run: the open checkpoint goes, the committed ones stay (to resume from)."""
        if self._open is not None:
            self._open.abort()
            self._open = None

    def discard(self) -> None:
        """The run's points are committed and its segment lists every row: its checkpoints go
        (one left by a failed removal is adopted later, its rows listed twice: harmless)."""
        self.abort()
        _remove(self._storage, self.committed, {self._folder})
        self.committed = []


def adopt(storage: Storage, held: Callable[[], None]) -> int:
    """Commit the usable rows of dead runs' checkpoints as an index segment, then remove the
    files read; the rows adopted. Call it in the caller's own session, before its index loads;
    ``held`` (``Lock.held``) raises when that session was lost (then nothing is committed)."""
    names = [n for n in storage.list(RESUME_PREFIX) if n.endswith(".parquet")]
    if not names:
        return 0
    live = {lk.id for lk in read_locks(storage) if lk.stale() is None}
    dead = [n for n in names if n.split("/")[1] not in live]
    if not dead:
        return 0
    doomed = condemned_packs(storage)  # (first: a record goes only after its packs)
    present: dict[str, bool] = {}
    segment = IndexSegmentWriter(storage)
    done = []
    try:
        for name in dead:  # (one file at a time: memory holds one checkpoint's rows)
            try:
                rows = read_parquet(storage, name, INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
            except CorruptionError:
                done.append(name)  # damaged: of no use, ever
                continue
            except RepositoryError:
                continue  # gone meanwhile, or unreadable now: left for a later run
            for pack in set(pc.unique(rows.column("pack")).to_pylist()) - present.keys():
                present[pack] = pack not in doomed and storage.exists(pack_name(pack))
            usable = [p for p, ok in present.items() if ok]
            segment.add(rows.filter(pc.is_in(rows.column("pack"), pa.array(usable, pa.string()))))
            done.append(name)
        held()
        segment.commit()  # (durable before the files it replaces go; none when no rows)
    except BaseException:
        segment.abort()
        raise
    _remove(storage, done, {n.rsplit("/", 1)[0] for n in done})
    return segment.rows


def _remove(storage: Storage, names: list[str], folders: set[str]) -> None:
    for name in names:
        try:
            storage.remove(name)
        except (OSError, CombError):
            pass
    for folder in folders:
        try:
            storage.remove_dir(folder)
        except (OSError, CombError):
            pass
