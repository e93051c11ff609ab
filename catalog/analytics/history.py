"""The backup history as columns: every committed point in per-source order, and every row of
every change table, with the arithmetic that needs the order of points (what a point alone
holds, what forgetting points frees).

Built from point documents and change tables only (never from manifests), so its cost grows
with the history's change, not with points x disk size: 1,000 points of a 256 GiB disk with
0.5 % change each are about 23 million rows. Change tables are checked against their names,
then read by DuckDB's parallel Parquet reader in one pass.

Positions are lane-major (``catalog.analytics.lanes``): a source's points are cut into lanes, runs
in which each point's parent is the point before it (a source that never branched is one lane),
and the lanes of the first source come first, so one integer range names a run of one lane's
points. The content a change row put at its offset is held by the points of its lane from the
row's point up to, not including, the next point that changed that offset again, and by the
branches that start from those points until they change it.

This module prints nothing; reports (``catalog.analytics.reports``) build on it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.analytics import walk
from catalog.analytics.lanes import Lane, lane_columns, lanes_of
from catalog.analytics.lives import cache as lives_cache
from catalog.analytics.lives import model as lv_
from catalog.analytics.lives.build import build
from catalog.errors import CombError, QueryError, RepositoryError
from catalog.store.changes import changes_name, read_changes
from catalog.store.format import CONFIG_NAME, parse_config
from catalog.store.parquet_io import read_verified, unreadable, verified_path
from catalog.store.points import RecoveryPoint
from catalog.store.storage import Storage


@dataclass
class History:
    """Points in lane-major order, with what is known about each source's chain."""

    points: list[RecoveryPoint]  # lane-major: by source, by lane, then down the parent chain
    sources: list[str]
    source_of: np.ndarray  # int32 per point: index into sources
    lanes: list[Lane]
    lane_of: np.ndarray  # int32 per point: index into lanes
    seq: np.ndarray  # int32 per point: position within its lane (0 = the lane's first)
    base: np.ndarray  # int64 per lane: position of its first point
    count: np.ndarray  # int64 per lane: number of points
    complete: np.ndarray  # bool per source: every point has a change table of its parent
    storage: Storage
    damaged: list[str] = field(default_factory=list)
    _files: list[tuple[int, str, int]] | None = field(default=None, repr=False)
    _cols: walk.Columns | None = field(default=None, repr=False)
    _lane_cols: walk.Columns | None = field(default=None, repr=False)
    _lives: lv_.Lives | None = field(default=None, repr=False)
    # With forgotten points: the history of live and forgotten points together, where each
    # live point is (``_live_at``) and which points are forgotten (``_gone``).
    _full: History | None = field(default=None, repr=False)
    _live_at: np.ndarray | None = field(default=None, repr=False)
    _gone: np.ndarray | None = field(default=None, repr=False)
    _alone: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        storage: Storage,
        points: list[RecoveryPoint],
        forgotten: list[RecoveryPoint] | tuple[RecoveryPoint, ...] = (),
    ) -> History:
        """The history of the live ``points``. The ``forgotten`` points' change tables keep
        each source's chain whole (FORMAT.md 9.1): they take part in the arithmetic but hold
        nothing, and no position is theirs."""
        h = cls._of(storage, points)
        if forgotten:
            full = cls._of(storage, [*points, *forgotten])
            at = {p.id: i for i, p in enumerate(full.points)}
            h._full = full
            h._live_at = np.array([at[p.id] for p in h.points], np.int64)
            h._gone = np.ones(len(full.points), bool)
            h._gone[h._live_at] = False
            h._sync_complete()
        return h

    @property
    def chain_points(self) -> list[RecoveryPoint]:
        """Every point of the arithmetic (live and forgotten), in the order of ``freed_by``."""
        return self._full.points if self._full is not None else self.points

    def _sync_complete(self) -> None:
        """A source is complete only if its chain through forgotten points is."""
        full = self._full
        assert full is not None
        for s, name in enumerate(self.sources):
            self.complete[s] = bool(full.complete[full.sources.index(name)])

    @classmethod
    def _of(cls, storage: Storage, points: list[RecoveryPoint]) -> History:
        sources = sorted({p.source for p in points})
        lanes: list[Lane] = []
        complete = np.ones(len(sources), bool)
        for s, name in enumerate(sources):
            mine = lanes_of(name, [p for p in points if p.source == name])
            lanes += mine
            complete[s] = all(ln.whole and all(p.changes for p in ln.points) for ln in mine)
        ordered = [p for ln in lanes for p in ln.points]
        index = {s: i for i, s in enumerate(sources)}
        source_of = np.array([index[p.source] for p in ordered], np.int32)
        count = np.array([len(ln.points) for ln in lanes], np.int64)
        lane_of = np.repeat(np.arange(len(lanes), dtype=np.int32), count)
        base = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        seq = (np.arange(len(ordered)) - base[lane_of]).astype(np.int32)
        return cls(ordered, sources, source_of, lanes, lane_of, seq, base, count, complete, storage)

    def times(self) -> np.ndarray:
        """Commit times as datetime64[us] (UTC) per point."""
        stamps = [
            datetime.fromisoformat(p.time).astimezone(UTC).replace(tzinfo=None) for p in self.points
        ]
        return np.array(stamps, "datetime64[us]")

    def change_files(self) -> list[tuple[int, str, int]]:
        """(position, local path, rows) of every change table, each checked against its name
        (once: damage is caught before any parser sees the file). A missing or damaged table
        is left out, with a message in ``damaged``, and its source counts as incomplete."""
        if self._files is None and self._full is not None:
            assert self._live_at is not None
            pos = {int(f): i for i, f in enumerate(self._live_at)}
            full_files = self._full.change_files()
            self._files = [(pos[i], path, n) for i, path, n in full_files if i in pos]
            self.damaged += self._full.damaged
            self._sync_complete()
        if self._files is None:
            files = []
            for i, p in enumerate(self.points):
                if p.changes is None:
                    continue
                name = changes_name(p.changes)
                try:
                    path = verified_path(self.storage, name)  # (object storage: a local copy)
                    try:
                        with open(path, "rb") as fh:
                            data = fh.read()
                    except OSError as err:
                        raise RepositoryError(f"cannot read {path}: {err.strerror}") from None
                    rows = _row_count(data, path, self.storage.sealer.parquet_decryption())
                    files.append((i, path, rows))
                except CombError as err:
                    self._left_out(i, err)
            self._files = files
        return self._files

    def each_change_table(
        self, positions: list[int], work: Callable[[int, bytes], Any]
    ) -> list[Any]:
        """``work(position, bytes)`` for the change table of each position that has one, on a
        few threads, with bytes checked against the table's name first (hashing and parsing
        release the GIL). Damaged tables are left out as by ``change_files``."""
        todo = [i for i in positions if self.points[i].changes is not None]

        def one(i: int) -> Any:
            try:
                return work(
                    i, read_verified(self.storage, changes_name(str(self.points[i].changes)))
                )
            except CombError as err:
                return err

        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            done = list(pool.map(one, todo))
        out = []
        for i, got in zip(todo, done, strict=True):
            if isinstance(got, CombError):
                self._left_out(i, got)
            else:
                out.append(got)
        return out

    def _left_out(self, i: int, err: CombError) -> None:
        """Position ``i``'s change table is damaged: said, and its source is incomplete."""
        self.damaged.append(f"point {self.points[i].id}: change table: {err.message}")
        self.complete[self.source_of[i]] = False

    def _columns(self) -> walk.Columns:
        """Every change row as arrays (read once, by DuckDB's parallel Parquet reader)."""
        if self._cols is None:
            self._cols = self._read()
        return self._cols

    def _read(self) -> walk.Columns:
        sizes = {p.chunk_size for p in self.points}
        if len(sizes) > 1:
            raise QueryError("points of several chunk sizes cannot be analysed together yet")
        chunk = sizes.pop() if sizes else 1
        return walk.read_columns(self.change_files(), len(self.points), chunk, self.storage.sealer)

    def _lane_columns(self) -> walk.Columns:
        """The change rows as the arithmetic sees them: a branch's first point holds its
        parent's content as well (``catalog.analytics.lanes.branch_rows``); the same as ``_columns``
        when no source branched."""
        if self._lane_cols is None:
            self._lane_cols = lane_columns(self._columns(), self.lanes, self.points)
        return self._lane_cols

    def lives(self) -> lv_.Lives | None:
        """The chunk lives of the whole history (``catalog.analytics.lives.model``): from the local
        cache when it covers the history (extended by the points it lacks), else built from every
        row. None when a source is incomplete: then the rows are walked as they are."""
        files = self.change_files()
        if not self.complete.all() or len({p.chunk_size for p in self.points}) > 1:
            return None
        if self._lives is None:
            chunk = self.points[0].chunk_size if self.points else 1
            big = sum(f[2] for f in files) >= lives_cache.CACHE_MIN_ROWS
            path = lives_cache.cache_path(self._repo_id()) if big else None
            lives = self._cached(path, chunk) if path is not None else None
            if lives is None:
                c = self._lane_columns()
                chains = [self._entry(i) for i in range(len(self.points))]
                lives = build(chunk, chains, c.chunk_no, c.key, c.kind, c.stored, c.starts)
                self._save(lives, path)
            self._lives = lives
        return self._lives

    def _cached(self, path: str, chunk: int) -> lv_.Lives | None:
        """The cached lives if they are of this history's chains (a prefix of each), extended
        by the missing points; None when there is no usable cache."""
        chains = {ln.name: [] for ln in self.lanes}  # type: dict[str, list[str]]
        for i in range(len(self.points)):
            name, entry = self._entry(i)
            chains[name].append(entry)
        try:
            cache = lives_cache.CacheFile(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        try:
            if cache.chunk_size != chunk or any(
                name not in chains or chains[name][: len(mine)] != mine
                for name, mine in zip(cache.sources, cache.chains, strict=True)
            ):
                return None
            done = dict(zip(cache.sources, cache.chains, strict=True))
            todo = [
                self._entry(i)
                for i in range(len(self.points))
                if len(done.get(self.lanes[self.lane_of[i]].name, [])) <= self.seq[i]
            ]
            if any("<" in entry for _, entry in todo):
                return None  # a new branch starts from its parent's content: built anew
            lives = cache.lives(with_state=bool(todo))
            if todo:
                batch = [(s, c, self._rows_of(c)) for s, c in todo]
                lives.extend(batch)
                self._save(lives, path)
            return lives
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, lv_.Rebuild):
            return None
        finally:
            cache.close()

    def _entry(self, i: int) -> tuple[str, str]:
        """Position ``i`` in the lives: its lane's name and its chain entry (the change table
        id; for a branch's first point also the point it starts from, as ``<id``)."""
        lane = self.lanes[self.lane_of[i]]
        branch = f"<{lane.parent}" if self.seq[i] == 0 and lane.parent is not None else ""
        return lane.name, f"{self.points[i].changes}{branch}"

    def _rows_of(self, changes_id: str) -> lv_.Rows:
        return walk.rows_of(read_changes(self.storage, changes_id), self.points[0].chunk_size)

    def _save(self, lives: lv_.Lives, path: str | None) -> None:
        if path is None:
            return
        try:
            lives_cache.save(lives, path)
        except OSError:
            pass  # a cache that cannot be written is only slower next time

    def _repo_id(self) -> str:
        return parse_config(self.storage.read(CONFIG_NAME), CONFIG_NAME).id

    def _layout(self, lives: lv_.Lives) -> lv_.Layout:
        at = {ln.name: s for s, ln in enumerate(self.lanes)}
        idx = np.array([at[name] for name in lives.sources], np.int64)
        return lv_.Layout(self.base[idx], self.count[idx], len(self.points))

    def _sources(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Per lane: its first position, its point count, and a cleared bitmap over its
        chunk numbers (one bit per chunk, for "changed again later" questions)."""
        cols = self._lane_columns()
        for s in range(len(self.lanes)):
            first, k = int(self.base[s]), int(self.count[s])
            r0, r1 = int(cols.starts[first]), int(cols.starts[first + k])
            top = int(cols.chunk_no[r0:r1].max()) + 1 if r1 > r0 else 0
            yield first, k, np.zeros(top, bool)

    def _full_lives(self) -> tuple[History, lv_.Lives] | None:
        """With forgotten points: the whole chain and its lives, when it is complete."""
        if self._full is None or self._gone is None:
            return None
        self.change_files()
        lives = self._full.lives() if self.complete.all() else None
        if lives is None:
            # The row walk sees only live points: it cannot follow a chain through forgotten
            # ones, so such sources are not exact any more.
            gone = {p.source for p, g in zip(self._full.points, self._gone, strict=True) if g}
            for s, name in enumerate(self.sources):
                self.complete[s] &= name not in gone
            return None
        return self._full, lives

    def lone_bytes(self) -> np.ndarray:
        """Per point: stored bytes of the chunks no other point holds (deleting it alone
        frees them)."""
        full = self._full_lives()
        if full is not None:
            h, every = full
            return lv_.lone_bytes(every, h._layout(every), self._gone)[self._live_at]
        lives = self.lives() if self._full is None else None
        if lives is not None:
            return lv_.lone_bytes(lives, self._layout(lives))
        return walk.lone(self._lane_columns(), self._sources())

    def held_stored(self) -> np.ndarray | None:
        """Per point of ``chain_points``: stored bytes of the chunks its backup stored that a
        live point still holds (for a live point, all it stored). None when that cannot be
        exact: a source with forgotten points whose chain is incomplete."""
        stored = np.array([p.stats.bytes_stored for p in self.chain_points], np.int64)
        if self._full is None:
            return stored
        full = self._full_lives()
        if full is None:
            return None
        return np.maximum(stored - self._gone_alone(*full), 0)

    def _gone_alone(self, h: History, every: lv_.Lives) -> np.ndarray:
        """Per point of ``chain_points``: stored bytes that only forgotten points hold (what
        prune frees, or freed), computed once for stored bytes and every retention question."""
        if self._alone is None:
            assert self._gone is not None
            self._alone = lv_.freed_bytes(every, h._layout(every), self._gone)
        return self._alone

    @property
    def gone(self) -> np.ndarray:
        """Per point of ``chain_points``: is it forgotten?"""
        return self._gone if self._gone is not None else np.zeros(len(self.points), bool)

    def freed_by(self, forget: np.ndarray) -> np.ndarray:
        """Per point of ``chain_points``: stored bytes freed by forgetting the points marked in
        ``forget`` (bool per position), counted at the point whose backup stored each chunk
        (which may be a forgotten one: what forgotten points alone held is not counted)."""
        full = self._full_lives()
        if full is not None:
            h, every = full
            assert self._gone is not None and self._live_at is not None
            lay = h._layout(every)
            more = self._gone.copy()
            more[self._live_at] |= forget
            return lv_.freed_bytes(every, lay, more) - self._gone_alone(h, every)
        lives = self.lives() if self._full is None else None
        if lives is not None:
            return lv_.freed_bytes(lives, self._layout(lives), forget)
        walked = walk.freed(self._lane_columns(), self._sources(), forget)
        if self._full is None:
            return walked
        out = np.zeros(len(self._full.points), np.int64)  # (incomplete: not exact anyway)
        out[self._live_at] = walked
        return out


def _row_count(data: bytes, path: str, dec: Any = None) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.read_metadata(pa.BufferReader(data), decryption_properties=dec).num_rows)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, err, dec is not None) from None
