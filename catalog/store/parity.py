"""Parity files: erasure-coded parity of one pack each (FORMAT.md 15 "Parity").

A pack is cut into stripes of ``data_shards`` shards of ``shard_bytes`` (the last stripe of a
pack into ``data_shards`` equal, shorter shards); every stripe gets ``parity_shards`` parity
shards, Reed-Solomon over GF(2^8) as zfec computes them (encoded by ``parity_codec``: ISA-L
or zfec, the same bytes). The parity file holds the parity
shards, then a 128-bit BLAKE3 of every data and parity shard (so damage is located to the shard,
which turns it into erasures: any ``parity_shards`` damaged shards of a stripe are rebuilt), then
a trailer naming the pack. Footer last, like packs, so the writer streams it.

The writer is fed the bytes a PackWriter writes, as it writes them (one stripe buffered: 4 MiB
with the defaults); it never reads a pack. ``rebuild`` works on bytes a caller has read.
Must not: decide what to repair or write packs (catalog.maint.scrub does, under the lock).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import zfec

from catalog.errors import CorruptionError, UsageError
from catalog.store.parity_codec import Encoder
from catalog.store.storage import NewFile, Storage

PARITY_MAGIC = b"COMBPRTY"
PARITY_END_MAGIC = b"COMBPREN"
PARITY_VERSION = 1
PARITY_SCHEME_ZFEC = 1  # Reed-Solomon, GF(2^8), zfec's systematic Vandermonde matrix
# magic, version, scheme, flags, data shards, parity shards, shard bytes, reserved
PARITY_HEADER = struct.Struct("<8sHBBHHII")
# pack bytes, stripes, table bytes, pack id, meta hash, end magic
PARITY_TRAILER = struct.Struct("<QII32s16s8s")
PARITY_HEADER_BYTES = PARITY_HEADER.size
PARITY_TRAILER_BYTES = PARITY_TRAILER.size
PARITY_SHARD_HASH_BYTES = 16
PARITY_PREFIX = "parity"
# Default geometry: 16 data + 2 parity shards of 256 KiB (4 MiB stripes, 12.5 % overhead).
# ISA-L encodes 16+2 at ~8 GB/s per core here, zfec at ~0.8 GB/s (bench/README.md "parity");
# 256 KiB shards make any damaged range of up to 256 KiB per stripe healable.
DEFAULT_PARITY_DATA_SHARDS = 16
DEFAULT_PARITY_SHARDS = 2
DEFAULT_PARITY_SHARD_BYTES = 256 * 1024
MAX_PARITY_TOTAL_SHARDS = 256  # GF(2^8)
_META_BYTES = PARITY_TRAILER_BYTES - 24  # trailer bytes covered by the meta hash


def parity_name(pack_id: str) -> str:
    return f"{PARITY_PREFIX}/{pack_id[:2]}/{pack_id}.parity"


def _h(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data, max_threads=1).digest()[:PARITY_SHARD_HASH_BYTES]


@dataclass(frozen=True)
class ParityGeometry:
    """config.json ``parity``: how new packs get parity (writer policy; files carry their own)."""

    data_shards: int = DEFAULT_PARITY_DATA_SHARDS
    parity_shards: int = DEFAULT_PARITY_SHARDS
    shard_bytes: int = DEFAULT_PARITY_SHARD_BYTES

    def check(self, where: str) -> None:
        k, m, s = self.data_shards, self.parity_shards, self.shard_bytes
        if not (1 <= m <= k and k + m <= MAX_PARITY_TOTAL_SHARDS and 1 <= s <= 1 << 30):
            raise CorruptionError(f"{where}: invalid parity geometry {k}+{m} x {s} bytes")

    @property
    def stripe_bytes(self) -> int:
        return self.data_shards * self.shard_bytes

    @property
    def overhead(self) -> float:
        return self.parity_shards / self.data_shards

    @staticmethod
    def from_overhead(text: str) -> ParityGeometry | None:
        """``init --parity-overhead``: a percentage (rounded to whole parity shards of 16
        data shards), or 0/none for no parity."""
        if text.strip().lower() in ("0", "none", "off"):
            return None
        try:
            pct = float(text.rstrip("%"))
        except ValueError:
            pct = -1.0
        m = round(pct * DEFAULT_PARITY_DATA_SHARDS / 100)
        if not 1 <= m <= DEFAULT_PARITY_DATA_SHARDS:
            raise UsageError(
                f"--parity-overhead {text!r}: give 0 (none) or a percentage from "
                f"{100 / DEFAULT_PARITY_DATA_SHARDS / 2 + 0.01:.2f} to 100"
            )
        return ParityGeometry(parity_shards=m)


def stripe_shard_bytes(k: int, s: int, pack_bytes: int, stripe: int) -> int:
    """Shard size of ``stripe``: ``s`` except in the last, shorter stripe (ceil(rest / k))."""
    rest = pack_bytes - stripe * k * s
    return s if rest >= k * s else -(-rest // k)


class ParityWriter:
    """Streams one pack's bytes into stripes and the parity file (one stripe buffered)."""

    def __init__(self, storage: Storage, geometry: ParityGeometry) -> None:
        g = geometry
        self._g = g
        self._file: NewFile = storage.create(bulk=True)
        header = PARITY_HEADER.pack(
            PARITY_MAGIC,
            PARITY_VERSION,
            PARITY_SCHEME_ZFEC,
            0,
            g.data_shards,
            g.parity_shards,
            g.shard_bytes,
            0,
        )
        self._file.write(header)
        self._meta = blake3.blake3(header)
        self._buf = bytearray(g.stripe_bytes)
        self._fill = 0
        self._total = 0
        self._hashes: list[bytes] = []
        self._enc = Encoder(g.data_shards, g.parity_shards)

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            self._total += n
            view = view[n:]
            if self._fill == len(self._buf):
                self._stripe(self._g.shard_bytes)

    def _stripe(self, shard: int) -> None:
        k = self._g.data_shards
        mv = memoryview(self._buf)
        if self._fill < k * shard:
            mv[self._fill : k * shard] = bytes(k * shard - self._fill)
        blocks = tuple(mv[i * shard : (i + 1) * shard] for i in range(k))
        parity = self._enc.encode(blocks)
        self._hashes += [_h(b) for b in blocks] + [_h(p) for p in parity]
        self._file.write_many(list(parity))
        self._fill = 0

    def commit(self, pack_id: str) -> int:
        """Encode the last stripe, write table and trailer, commit; returns the file size."""
        g = self._g
        if self._fill:
            self._stripe(-(-self._fill // g.data_shards))
        table = b"".join(self._hashes)
        stripes = len(self._hashes) // (g.data_shards + g.parity_shards)
        pid = bytes.fromhex(pack_id)
        meta = PARITY_TRAILER.pack(self._total, stripes, len(table), pid, b"", b"")
        self._meta.update(table)
        self._meta.update(meta[:_META_BYTES])
        trailer = PARITY_TRAILER.pack(
            self._total, stripes, len(table), pid, self._meta.digest()[:16], PARITY_END_MAGIC
        )
        self._file.write(table)
        self._file.write(trailer)
        size = self._file.tell()
        self._file.commit(parity_name(pack_id))
        self._buf = bytearray()
        return size

    def abort(self) -> None:
        self._file.abort()


def write_parity(storage: Storage, geometry: ParityGeometry, pack: bytes, pack_id: str) -> int:
    """Parity for a whole pack in memory (scrub --repair; never the backup path)."""
    w = ParityWriter(storage, geometry)
    try:
        w.update(pack)
        return w.commit(pack_id)
    except BaseException:
        w.abort()
        raise


@dataclass
class ParityFile:
    """A parsed parity file (its metadata checked; parity shards not yet)."""

    geometry: ParityGeometry
    pack_bytes: int
    pack_id: str
    stripes: int
    hashes: list[bytes]
    data: bytes

    def shard_bytes(self, stripe: int) -> int:
        g = self.geometry
        return stripe_shard_bytes(g.data_shards, g.shard_bytes, self.pack_bytes, stripe)

    def parity_shards(self, stripe: int) -> list[memoryview]:
        g = self.geometry
        s = self.shard_bytes(stripe)
        pos = PARITY_HEADER_BYTES + stripe * g.parity_shards * g.shard_bytes
        mv = memoryview(self.data)
        return [mv[pos + j * s : pos + (j + 1) * s] for j in range(g.parity_shards)]

    def stripe_hashes(self, stripe: int) -> list[bytes]:
        n = self.geometry.data_shards + self.geometry.parity_shards
        return self.hashes[stripe * n : (stripe + 1) * n]

    def bad_parity_shards(self) -> int:
        """Parity shards that do not match their hash."""
        k = self.geometry.data_shards
        bad = 0
        for s in range(self.stripes):
            want = self.stripe_hashes(s)[k:]
            bad += sum(_h(p) != w for p, w in zip(self.parity_shards(s), want, strict=True))
        return bad


def parse_parity(data: bytes, where: str, pack_id: str) -> ParityFile:
    """Check a parity file's header, table and trailer (one hash covers them) and that it
    belongs to ``pack_id``; CorruptionError when it cannot be used."""
    if len(data) < PARITY_HEADER_BYTES + PARITY_TRAILER_BYTES:
        raise CorruptionError(f"parity {where} is truncated ({len(data)} bytes)")
    magic, version, scheme, flags, k, m, s, rsvd = PARITY_HEADER.unpack_from(data, 0)
    tpos = len(data) - PARITY_TRAILER_BYTES
    pack_bytes, stripes, table_len, pid, meta_hash, end = PARITY_TRAILER.unpack_from(data, tpos)
    if magic != PARITY_MAGIC or end != PARITY_END_MAGIC:
        raise CorruptionError(f"parity {where} has a bad magic")
    if version != PARITY_VERSION or scheme != PARITY_SCHEME_ZFEC or flags or rsvd:
        raise CorruptionError(f"parity {where}: unknown version, scheme or flags")
    geometry = ParityGeometry(k, m, s)
    geometry.check(f"parity {where}")
    n = k + m
    start = tpos - table_len
    if table_len != stripes * n * PARITY_SHARD_HASH_BYTES or start < PARITY_HEADER_BYTES:
        raise CorruptionError(f"parity {where} has an inconsistent shard table")
    meta = blake3.blake3(data[:PARITY_HEADER_BYTES])
    meta.update(data[start:tpos])
    meta.update(data[tpos : tpos + _META_BYTES])
    if meta.digest()[:16] != meta_hash:
        raise CorruptionError(f"parity {where} has damaged metadata (header, table or trailer)")
    if pid.hex() != pack_id:
        raise CorruptionError(f"parity {where} belongs to pack {pid.hex()[:16]}")
    if stripes != -(-pack_bytes // (k * s)):
        raise CorruptionError(f"parity {where}: {stripes} stripes for {pack_bytes} bytes")
    table = data[start:tpos]
    hashes = [table[i : i + PARITY_SHARD_HASH_BYTES] for i in range(0, table_len, 16)]
    pf = ParityFile(geometry, pack_bytes, pack_id, stripes, hashes, data)
    want = sum(m * pf.shard_bytes(i) for i in range(stripes))
    if start - PARITY_HEADER_BYTES != want:
        raise CorruptionError(f"parity {where}: parity shards take {start - 24}, not {want}")
    return pf


@dataclass
class Rebuilt:
    """What ``rebuild`` did to one pack's bytes."""

    data: bytes  # the pack's bytes, every rebuildable stripe rebuilt
    whole: bool  # every stripe rebuilt: ``data`` is the original pack (caller checks the name)
    shards_rebuilt: int = 0
    parity_bad: int = 0
    lost: list[tuple[int, int]] = field(default_factory=list)  # pack ranges beyond parity


def rebuild(pack: bytes, pf: ParityFile) -> Rebuilt:
    """Rebuild every damaged data shard of ``pack`` whose stripe has at most ``parity_shards``
    damaged shards (data or parity, found by their hashes). A truncated pack reads as zeros
    past its end (those shards are damaged); bytes past the original size are dropped."""
    g = pf.geometry
    k, m = g.data_shards, g.parity_shards
    out = bytearray(pack[: pf.pack_bytes].ljust(pf.pack_bytes, b"\0"))
    res = Rebuilt(b"", True)
    dec = zfec.Decoder(k, k + m)
    for st in range(pf.stripes):
        s = pf.shard_bytes(st)
        base = st * g.stripe_bytes
        end = min(base + k * s, pf.pack_bytes)
        area = bytes(out[base:end]).ljust(k * s, b"\0")
        data = [area[i * s : (i + 1) * s] for i in range(k)]
        parity = pf.parity_shards(st)
        want = pf.stripe_hashes(st)
        bad = [i for i in range(k) if _h(data[i]) != want[i]]
        bad_p = [j for j in range(m) if _h(parity[j]) != want[k + j]]
        res.parity_bad += len(bad_p)
        if not bad:
            continue
        if len(bad) + len(bad_p) > m:
            res.whole = False
            res.lost += [(base + i * s, min(base + (i + 1) * s, end)) for i in bad]
            continue
        good = [i for i in range(k) if i not in bad] + [k + j for j in range(m) if j not in bad_p]
        good = good[:k]
        blocks = [data[i] if i < k else parity[i - k] for i in good]
        fixed = dec.decode(tuple(blocks), tuple(good))
        if any(_h(fixed[i]) != want[i] for i in bad):  # pragma: no cover - 128-bit collision
            res.whole = False
            res.lost += [(base + i * s, min(base + (i + 1) * s, end)) for i in bad]
            continue
        for i in bad:
            lo, hi = base + i * s, min(base + (i + 1) * s, end)
            out[lo:hi] = bytes(fixed[i])[: hi - lo]
            res.shards_rebuilt += 1
    res.data = bytes(out)
    return res
