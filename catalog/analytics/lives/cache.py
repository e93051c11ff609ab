"""The chunk lives' local cache file (``catalog.analytics.lives.model``): where it is, writing it,
and reading it back checked. Outside the repository, never part of it; prints nothing.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import zipfile

import blake3
import numpy as np

from catalog.analytics.lives.model import Lives, _Held
from catalog.store.cachedir import cache_dir

CACHE_FORMAT = "comb-lives"
CACHE_VERSION = 1
# Histories with fewer change rows are computed afresh (well under 0.1 s); only larger ones are
# worth a file (bench: ``python -m bench catalog``, 23 million rows).
CACHE_MIN_ROWS = 1 << 20


def cache_path(repo_id: str) -> str:
    return os.path.join(cache_dir(), repo_id, "lives.zip")


_REPORT_MEMBERS = ("pairs", "gnew", "ghit", "open")


def save(lv: Lives, path: str) -> None:
    """Write the cache: a new file renamed over the old one (a reader sees either whole)."""
    arrays: dict[str, np.ndarray] = {}
    for part, g in (("pairs", lv.pairs), ("gnew", lv.gnew), ("ghit", lv.ghit)):
        for name in g.names:
            arrays[f"{part}.{name}"] = g[name]
    arrays["open.src"], arrays["open.birth"] = lv.open_src, lv.open_birth
    arrays["open.bytes"] = lv.open_bytes
    arrays["state.group_keys"] = lv.group_keys["key"]
    for s, h in enumerate(lv.held):
        for name in ("birth", "key", "stored", "kind", "ref"):
            arrays[f"state.{s}.{name}"] = getattr(h, name)
    blobs = {name: _npy(a) for name, a in arrays.items()}
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "chunk_size": lv.chunk_size,
        "sources": lv.sources,
        "chains": lv.chains,
        "blake3": {name: blake3.blake3(b).hexdigest() for name, b in blobs.items()},
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(8)}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("meta.json", json.dumps(meta))
            for name, blob in blobs.items():
                zf.writestr(name + ".npy", blob)
        os.replace(tmp, path)  # no fsync: a torn file after a crash fails its check on load
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CacheFile:
    """An opened cache; members are read (and checked) on demand."""

    def __init__(self, path: str) -> None:
        self._zf = zipfile.ZipFile(path)
        meta = json.loads(self._zf.read("meta.json"))
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise ValueError("not a lives cache of this version")
        self.meta = meta
        self.sources: list[str] = list(meta["sources"])
        self.chains: list[list[str]] = [list(c) for c in meta["chains"]]
        self.chunk_size = int(meta["chunk_size"])

    def array(self, name: str) -> np.ndarray:
        blob = self._zf.read(name + ".npy")
        if blake3.blake3(blob).hexdigest() != self.meta["blake3"][name]:
            raise ValueError(f"cache member {name} is damaged")
        return np.load(io.BytesIO(blob), allow_pickle=False)

    def lives(self, with_state: bool) -> Lives:
        lv = Lives(self.chunk_size, list(self.sources), [list(c) for c in self.chains])
        for part, g in (("pairs", lv.pairs), ("gnew", lv.gnew), ("ghit", lv.ghit)):
            values = {name: self.array(f"{part}.{name}") for name in g.names}
            g.append(**values)
        lv.open_src = self.array("open.src")
        lv.open_birth = self.array("open.birth")
        lv.open_bytes = self.array("open.bytes")
        keys = self.array("state.group_keys")
        if with_state:
            lv.group_keys.append(key=keys)
            for s in range(len(self.sources)):
                parts = [
                    self.array(f"state.{s}.{n}") for n in ("birth", "key", "stored", "kind", "ref")
                ]
                lv.held.append(_Held(*parts))
        else:
            lv.group_keys.n = len(keys)  # reports need only the count
        return lv

    def close(self) -> None:
        self._zf.close()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()
