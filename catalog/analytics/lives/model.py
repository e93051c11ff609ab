"""Chunk lives: what the stored chunks of a complete history are held by, kept small enough to
answer "what would forgetting these points free" without reading every change row again.

A change row of point P puts content at its offset; the content lives until the next point of
the source with a row at that offset (its end), or is still live. A chunk stored once and never
a dedup hit has one life, so all that matters of it is (source, birth, end, stored bytes), and
chunks are summed per such tuple: a few hundred thousand sums for a long history instead of
tens of millions of rows. Chunks with dedup hits (any row of their key that is not ``new``)
keep every life explicitly, grouped by key.

Built once from every change row, then extended point by point: the content each source holds
at its latest point is kept (per chunk number: birth, key, stored bytes, which life), so a new
point costs its own change rows. A dedup hit of a chunk whose only life has ended cannot be
placed that way (its life was summed away): the lives are then built again from scratch.

Persisted as a local cache outside the repository (``catalog.analytics.lives.cache``), never as
part of it: a zip of NumPy arrays with the BLAKE3 of each member in its metadata, replaced by
rename, checked on every load and rebuilt when it is damaged, written for another history or for a
different history (a point removed or reordered). Relies on ``new`` meaning "no earlier chunk had
this id" (FORMAT.md 8.5): at most one ``new`` row per key.

This module prints nothing and never writes to the repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# What a chunk number of a source holds at its latest point.
_NONE, _SIMPLE, _GROUP_NEW, _GROUP_HIT = 0, 1, 2, 3
_KEY_FILTER_BITS = 1 << 27
_BLOCK = 1 << 20  # rows per block of work over all rows


class Rebuild(Exception):
    """The lives cannot be extended by the given rows: build them again from every row."""


class _Grow:
    """Columns of int arrays appended to in batches (capacity doubles)."""

    def __init__(self, names: tuple[str, ...], dtypes: tuple[str, ...]) -> None:
        self.names = names
        self.cols = {n: np.zeros(0, d) for n, d in zip(names, dtypes, strict=True)}
        self.n = 0

    def append(self, **values: np.ndarray) -> np.ndarray:
        """Append rows; returns their indices."""
        k = len(next(iter(values.values())))
        need = self.n + k
        for name, col in self.cols.items():
            if need > len(col):
                grown = np.zeros(max(need, 2 * len(col), 1024), col.dtype)
                grown[: self.n] = col[: self.n]
                self.cols[name] = grown
            self.cols[name][self.n : need] = values[name]
        out = np.arange(self.n, need, dtype=np.int32)
        self.n = need
        return out

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name][: self.n]

    def set(self, name: str, rows: np.ndarray, values: np.ndarray | int) -> None:
        self.cols[name][rows] = values


@dataclass
class _Held:
    """One source's content at its latest point, per chunk number."""

    birth: np.ndarray  # int32: seq of the point that put it there, -1 for zeros
    key: np.ndarray  # int64
    stored: np.ndarray  # int32: stored bytes of a one-life chunk's life, else 0
    kind: np.ndarray  # int8: _NONE, _SIMPLE, _GROUP_NEW or _GROUP_HIT
    ref: np.ndarray  # int32: index of the life in the group lives (_GROUP_*)

    @classmethod
    def empty(cls) -> _Held:
        return cls(
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int8),
            np.zeros(0, np.int32),
        )

    def fit(self, chunks: int) -> None:
        if chunks <= len(self.kind):
            return
        extra = chunks - len(self.kind)
        self.birth = np.concatenate([self.birth, np.full(extra, -1, np.int32)])
        self.key = np.concatenate([self.key, np.zeros(extra, np.int64)])
        self.stored = np.concatenate([self.stored, np.zeros(extra, np.int32)])
        self.kind = np.concatenate([self.kind, np.zeros(extra, np.int8)])
        self.ref = np.concatenate([self.ref, np.zeros(extra, np.int32)])


_PAIR = (("src", "int32"), ("birth", "int32"), ("end", "int32"), ("bytes", "int64"))
_GNEW = (("src", "int32"), ("birth", "int32"), ("end", "int32"), ("stored", "int32"))
_GHIT = (("src", "int32"), ("birth", "int32"), ("end", "int32"))


def _grow(spec: tuple[tuple[str, str], ...], extra: tuple[tuple[str, str], ...] = ()) -> _Grow:
    cols = spec + extra
    return _Grow(tuple(c[0] for c in cols), tuple(c[1] for c in cols))


@dataclass
class Lives:
    """The lives of every stored chunk of some sources' histories (ends are seqs; -1: live)."""

    chunk_size: int
    sources: list[str] = field(default_factory=list)
    chains: list[list[str]] = field(default_factory=list)  # per source: change table ids
    pairs: _Grow = field(default_factory=lambda: _grow(_PAIR))  # ended one-life chunks, summed
    group_keys: _Grow = field(default_factory=lambda: _grow((("key", "int64"),)))
    gnew: _Grow = field(default_factory=lambda: _grow(_GNEW, (("group", "int32"),)))
    ghit: _Grow = field(default_factory=lambda: _grow(_GHIT, (("group", "int32"),)))
    held: list[_Held] = field(default_factory=list)
    # Live one-life chunks summed per (source, birth): all a report needs of ``held``.
    open_src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    open_birth: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    open_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def source_index(self, name: str) -> int:
        if name not in self.sources:
            self.sources.append(name)
            self.chains.append([])
            self.held.append(_Held.empty())
        return self.sources.index(name)

    def extend(self, batch: list[tuple[str, str, Rows]]) -> None:
        """Add points (source, change table id, rows), each source's in chain order after the
        points already here. Raises Rebuild when a dedup hit cannot be placed."""
        fresh = not any(self.chains)
        hit_keys = _sorted_unique([r.key[r.kind == _HIT] for _, _, r in batch])
        added = hit_keys[~_member(hit_keys, np.sort(self.group_keys["key"]))]
        if len(added):
            self.group_keys.append(key=added)
            placed = self._regroup_live(added)
            if not fresh:  # (a fresh build has every row: a group may lack its new row)
                news = _sorted_unique([r.key[r.kind == _NEW] for _, _, r in batch])
                if not (placed | _member(added, news)).all():
                    raise Rebuild("a dedup hit of a chunk whose life ended")
        lookup = KeyLookup(self.group_keys["key"])
        for name, changes_id, rows in batch:
            s = self.source_index(name)
            self._apply(s, len(self.chains[s]), rows, lookup)
            self.chains[s].append(changes_id)
        self._sum_open()

    def _regroup_live(self, added: np.ndarray) -> np.ndarray:
        """Live one-life chunks whose key just got a dedup hit become group lives; returns,
        per added key (sorted, the last groups), whether one was found."""
        found = np.zeros(len(added), bool)
        base = self.group_keys.n - len(added)
        for s, h in enumerate(self.held):
            c = np.flatnonzero(h.kind == _SIMPLE)
            c = c[_member(h.key[c], added)]
            if not len(c):
                continue
            at = np.searchsorted(added, h.key[c])
            rows = self.gnew.append(
                src=np.full(len(c), s, np.int32),
                birth=h.birth[c],
                end=np.full(len(c), -1, np.int32),
                stored=h.stored[c],
                group=(base + at).astype(np.int32),
            )
            h.kind[c], h.ref[c], h.stored[c] = _GROUP_NEW, rows, 0
            found[at] = True
        return found

    def _apply(self, s: int, seq: int, r: Rows, lookup: KeyLookup) -> None:
        h = self.held[s]
        if not len(r.chunk_no):
            return
        h.fit(int(r.chunk_no.max()) + 1)
        c = r.chunk_no
        was = h.kind[c]
        # Ends: what this point overwrote (or zeroed) stops being held here.
        one = c[was == _SIMPLE]
        if len(one):
            # (float sums of int32 sizes are exact far beyond any point's total)
            sums = np.bincount(h.birth[one], h.stored[one], seq).astype(np.int64)
            births = np.flatnonzero(sums).astype(np.int32)
            self.pairs.append(
                src=np.full(len(births), s, np.int32),
                birth=births,
                end=np.full(len(births), seq, np.int32),
                bytes=sums[births],
            )
        self.gnew.set("end", h.ref[c[was == _GROUP_NEW]], seq)
        self.ghit.set("end", h.ref[c[was == _GROUP_HIT]], seq)
        # Births: what this point put there.
        h.kind[c], h.birth[c], h.stored[c], h.key[c] = _NONE, -1, 0, r.key
        data = r.kind != _ZERO
        group = lookup.find(r.key)
        grouped = data & (group >= 0)
        h.birth[c[data]] = seq
        simple = data & ~grouped & (r.kind == _NEW)
        h.kind[c[simple]], h.stored[c[simple]] = _SIMPLE, r.stored[simple]
        for kind, lives, want in ((_GROUP_NEW, self.gnew, _NEW), (_GROUP_HIT, self.ghit, _HIT)):
            m = grouped & (r.kind == want)
            if not m.any():
                continue
            extra = {"stored": r.stored[m]} if lives is self.gnew else {}
            rows = lives.append(
                src=np.full(int(m.sum()), s, np.int32),
                birth=np.full(int(m.sum()), seq, np.int32),
                end=np.full(int(m.sum()), -1, np.int32),
                group=group[m],
                **extra,
            )
            h.kind[c[m]], h.ref[c[m]] = kind, rows
        if (~grouped & (r.kind == _HIT)).any():
            raise Rebuild("a dedup hit without its group")

    def _sum_open(self) -> None:
        src, births, sums = [], [], []
        for s, h in enumerate(self.held):
            c = np.flatnonzero(h.kind == _SIMPLE)
            total = np.bincount(h.birth[c], h.stored[c], len(self.chains[s])).astype(np.int64)
            b = np.flatnonzero(total)
            src.append(np.full(len(b), s, np.int32))
            births.append(b.astype(np.int32))
            sums.append(total[b])
        empty = [np.zeros(0, np.int32)]
        self.open_src = np.concatenate(empty + src)
        self.open_birth = np.concatenate(empty + births)
        self.open_bytes = np.concatenate([np.zeros(0, np.int64), *sums])


# Row kinds, as in catalog.analytics.walk: the region became zeros, a dedup hit, a chunk stored
# here.
_ZERO, _HIT, _NEW = 0, 1, 2


@dataclass(frozen=True)
class Rows:
    """One point's change rows."""

    chunk_no: np.ndarray  # int32
    key: np.ndarray  # int64
    kind: np.ndarray  # int8
    stored: np.ndarray  # int32


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    a = np.sort(np.concatenate([np.zeros(0, np.int64), *parts]))
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if len(a) else a


def _member(keys: np.ndarray, sorted_members: np.ndarray) -> np.ndarray:
    """Per key: is it in ``sorted_members``?"""
    return KeyLookup(sorted_members, is_sorted=True).find(keys) >= 0


class KeyLookup:
    """Index of each key in ``keys`` (or -1). A bit set over 2^27 hashes of the keys comes
    first, so most misses cost one probe into 16 MiB; the few candidates are sorted before the
    binary search, which then walks the sorted keys in order instead of jumping at random
    (2.6x faster for a million candidates)."""

    def __init__(self, keys: np.ndarray, is_sorted: bool = False) -> None:
        self.order = np.arange(len(keys)) if is_sorted else np.argsort(keys, kind="stable")
        self.keys = keys if is_sorted else keys[self.order]
        self.bits = np.zeros(_KEY_FILTER_BITS >> 3 if len(keys) else 0, np.uint8)
        if len(keys):
            b = (self.keys & (_KEY_FILTER_BITS - 1)).astype(np.uint32)
            np.bitwise_or.at(self.bits, b >> 3, np.left_shift(1, b & 7).astype(np.uint8))

    def find(self, keys: np.ndarray) -> np.ndarray:
        out = np.full(len(keys), -1, np.int32)
        at, index = self.members(keys)
        out[at] = index
        return out

    def members(
        self, keys: np.ndarray, only: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``keys`` of the known keys, ascending, among those ``only`` marks;
        their indices). Worked in blocks: row-sized temporaries cost more in page faults
        than the arithmetic."""
        found: list[tuple[np.ndarray, np.ndarray]] = []
        if not len(self.keys) or not len(keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        for lo in range(0, len(keys), _BLOCK):
            block = keys[lo : lo + _BLOCK]
            b = (block & (_KEY_FILTER_BITS - 1)).astype(np.uint32)
            maybe = ((self.bits[b >> 3] >> (b & 7).astype(np.uint8)) & 1).astype(bool)
            if only is not None:
                maybe &= only[lo : lo + _BLOCK]
            cand = np.flatnonzero(maybe)
            found.append((cand + lo, block[cand]))
        cand = np.concatenate([f[0] for f in found])
        wanted = np.concatenate([f[1] for f in found])
        by_key = np.argsort(wanted)
        at = np.minimum(np.searchsorted(self.keys, wanted[by_key]), len(self.keys) - 1)
        hit = self.keys[at] == wanted[by_key]
        rows = cand[by_key[hit]]
        in_order = np.argsort(rows)
        return rows[in_order], self.order[at[hit]][in_order].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# What reports ask: per position (source-major, as catalog.analytics.history), given each source's
# base.


@dataclass(frozen=True)
class Layout:
    """Where each source of the lives sits in a history: first position and point count."""

    base: np.ndarray  # int64 per lives source
    count: np.ndarray  # int64 per lives source
    points: int


def _lives(lv: Lives, lay: Layout, g: _Grow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(birth position, end position, last position of the source) of group lives; a live
    one ends one past its source's last point."""
    src = g["src"]
    birth = lay.base[src] + g["birth"]
    last = lay.base[src] + lay.count[src] - 1
    end = np.where(g["end"] < 0, last + 1, lay.base[src] + g["end"])
    return birth, end, last


def lone_bytes(lv: Lives, lay: Layout, gone: np.ndarray | None = None) -> np.ndarray:
    """Per position: stored bytes of the chunks only that point holds. Points marked ``gone``
    (forgotten, kept in the history for their change rows) hold nothing: a chunk is then
    credited to the one remaining point that holds it."""
    gone = np.zeros(lay.points, bool) if gone is None else gone
    kept = np.concatenate([[0], np.cumsum(~gone, dtype=np.int64)])  # kept points before each
    where = np.concatenate([np.flatnonzero(~gone), [0]])  # position of the k-th kept point
    out = np.zeros(lay.points, np.int64)

    def lone(b: np.ndarray, e: np.ndarray, size: np.ndarray) -> None:
        one = kept[e] - kept[b] == 1
        np.add.at(out, where[kept[b[one]]], size[one])

    p = lv.pairs
    lone(lay.base[p["src"]] + p["birth"], lay.base[p["src"]] + p["end"], p["bytes"])
    src = lv.open_src
    lone(lay.base[src] + lv.open_birth, lay.base[src] + lay.count[src], lv.open_bytes)
    # A chunk with dedup hits is only one point's when every life held by a kept point is
    # held by that one point alone.
    nb, ne, _ = _lives(lv, lay, lv.gnew)
    hb, he, _ = _lives(lv, lay, lv.ghit)
    b, e = np.concatenate([nb, hb]), np.concatenate([ne, he])
    grp = np.concatenate([lv.gnew["group"], lv.ghit["group"]])
    held = kept[e] - kept[b]
    groups = lv.group_keys.n
    bad = np.bincount(grp[held > 1], minlength=groups)
    holder = kept[b]
    lo = np.full(groups, np.iinfo(np.int64).max)
    hi = np.full(groups, -1, np.int64)
    one = held == 1
    np.minimum.at(lo, grp[one], holder[one])
    np.maximum.at(hi, grp[one], holder[one])
    g = lv.gnew["group"]
    ok = (bad[g] == 0) & (hi[g] >= 0) & (lo[g] == hi[g])
    np.add.at(out, where[lo[g][ok]], lv.gnew["stored"][ok].astype(np.int64))
    return out


def freed_bytes(lv: Lives, lay: Layout, forget: np.ndarray) -> np.ndarray:
    """Per position: stored bytes freed by forgetting the marked points, counted at the point
    that stored each chunk."""
    kept = np.concatenate([[0], np.cumsum(~forget, dtype=np.int64)])
    out = np.zeros(lay.points, np.int64)
    p = lv.pairs
    b = lay.base[p["src"]] + p["birth"]
    e = lay.base[p["src"]] + p["end"]
    free = kept[e] == kept[b]
    np.add.at(out, b[free], p["bytes"][free])
    b = lay.base[lv.open_src] + lv.open_birth
    e = lay.base[lv.open_src] + lay.count[lv.open_src]
    free = kept[e] == kept[b]
    np.add.at(out, b[free], lv.open_bytes[free])
    nb, ne, _ = _lives(lv, lay, lv.gnew)
    hb, he, _ = _lives(lv, lay, lv.ghit)
    bad = np.bincount(lv.ghit["group"][kept[he] != kept[hb]], minlength=lv.group_keys.n)
    ok = (kept[ne] == kept[nb]) & (bad[lv.gnew["group"]] == 0)
    np.add.at(out, nb[ok], lv.gnew["stored"][ok].astype(np.int64))
    return out
