"""Finding chunk locations for random reads of recovery points (``catalog.read.spans``): the
index segments are searched one by one, in an order the caller knows to be likely, and only
while some wanted id is still unfound (``catalog.read.lookup`` answers per segment).

Owns the search order and the pack names a read refers to. Must not: write anything (nothing
here is used by backups), or read point documents (the caller knows which backup wrote what).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from catalog.read.lookup import SHARED_SEGMENTS, SegmentCache
from catalog.store.index import id_keys, segment_names
from catalog.store.packs import pack_name
from catalog.store.storage import Storage


@dataclass(frozen=True)
class Found:
    """Locations of n chunk ids: ``pack`` is -1 where no index segment names the id."""

    pack: np.ndarray  # int32: an index into the locator's ``pack_names``
    offset: np.ndarray
    stored_len: np.ndarray
    raw_len: np.ndarray
    codec: np.ndarray


class Locator:
    """One location per chunk id, searched segment by segment in the caller's order of
    likelihood: a segment is read only while some wanted id is still unfound, so a lookup
    costs the segments that hold the ids, not the whole index. Like ``load_locations``, a copy
    whose pack exists is preferred. Not thread-safe (callers serialise)."""

    def __init__(
        self,
        storage: Storage,
        cache: SegmentCache = SHARED_SEGMENTS,
        block_lists: Mapping[str, str] | None = None,
    ) -> None:
        """``block_lists``: segment name -> its block list, where known; the caller's mapping
        may grow as it learns more (``catalog.read.provenance.Provenance.segment_blocks``)."""
        self._storage = storage
        self._cache = cache
        self._block_lists: Mapping[str, str] = {} if block_lists is None else block_lists
        self._listed: list[str] | None = None
        self._exists: dict[str, bool] = {}
        self.segments_used: set[str] = set()
        self.pack_names: list[str] = []  # what ``Found.pack`` codes mean; only grows
        self._pack_codes: dict[str, int] = {}

    def locate(
        self,
        ids: np.ndarray,
        first: list[str],
        rest: Callable[[], list[str]],
        near: tuple[int, int] | None = None,
    ) -> Found:
        """``first``: segment names to search before any other (e.g. the backup's own);
        ``rest()``: the order for the others, asked for only if ids remain unfound; segments
        in neither (and, at the end, any that appeared since) are searched last. ``near``:
        the disk bytes [lo, hi) the ids sit at: segments with a block list are first searched
        only where their backups read that stretch (``catalog.store.blocks``), then every segment
        in full for the ids still unfound."""
        keys, inverse = np.unique(id_keys(ids), return_inverse=True)
        uniq = keys.view(np.uint8).reshape(-1, 32)
        n = len(keys)
        out = Found(
            np.full(n, -1, np.int32),
            np.zeros(n, np.int64),
            np.zeros(n, np.int32),
            np.zeros(n, np.int32),
            np.zeros(n, np.int8),
        )
        state = np.zeros(n, np.int8)  # 0 unfound, 1 found in a missing pack, 2 found
        passes = [near, None] if near is not None and self._block_lists else [None]
        for where in passes:
            tried: set[str] = set()
            for name in self._order(first, rest, tried, lambda: bool(np.any(state < 2))):
                if where is None or name in self._block_lists:
                    self._search(name, uniq, state, out, where)
        inverse = inverse.ravel()
        return Found(*(getattr(out, f)[inverse] for f in Found.__annotations__))

    def _search(
        self,
        name: str,
        uniq: np.ndarray,
        state: np.ndarray,
        out: Found,
        near: tuple[int, int] | None,
    ) -> None:
        """Search one segment for the ids not found yet (``state`` < 2), filling ``out``."""
        if not self._segment_exists(name):
            return  # named by a point document, but merged or removed since
        todo = np.flatnonzero(state < 2)
        self.segments_used.add(name)
        hits = self._cache.lookup(
            self._storage, name, uniq[todo], self._block_lists.get(name), near
        )
        at = todo[hits.at]
        # Per pack, not per chunk: whether it exists, and its code.
        used = np.unique(hits.code).tolist()
        exists = np.zeros(len(hits.names), bool)
        codes = np.full(len(hits.names), -1, np.int32)
        for c in used:
            exists[c] = self._pack_exists(hits.names[c])
            codes[c] = self._pack_code(hits.names[c])
        ok = exists[hits.code]
        take = ok | (state[at] == 0)
        at = at[take]
        out.pack[at] = codes[hits.code[take]]
        for field in ("offset", "stored_len", "raw_len", "codec"):
            getattr(out, field)[at] = getattr(hits, field)[take]
        state[at] = np.where(ok[take], 2, 1)

    def _order(
        self,
        first: list[str],
        rest: Callable[[], list[str]],
        tried: set[str],
        wanted: Callable[[], bool],
    ) -> Iterator[str]:
        def fresh(names: Iterable[str]) -> Iterator[str]:
            for name in names:
                if name not in tried and wanted():
                    tried.add(name)
                    yield name

        yield from fresh(first)
        if not wanted():
            return
        yield from fresh(rest())
        if self._listed is None:
            self._listed = segment_names(self._storage)
        yield from fresh(self._listed)
        if wanted():  # a segment written since the listing (a backup finished meanwhile)
            self._listed = segment_names(self._storage)
            yield from fresh(self._listed)

    def _pack_code(self, pack: str) -> int:
        code = self._pack_codes.get(pack)
        if code is None:
            code = self._pack_codes[pack] = len(self.pack_names)
            self.pack_names.append(pack)
        return code

    def _segment_exists(self, name: str) -> bool:
        if self._listed is not None and name in self._listed:
            return True
        known = self._exists.get(name)
        if known is None:
            known = self._exists[name] = self._storage.exists(name)
        return known

    def _pack_exists(self, pack: str) -> bool:
        name = pack_name(pack)
        known = self._exists.get(name)
        if known is None:
            known = self._exists[name] = self._storage.exists(name)
        return known
