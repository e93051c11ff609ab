"""Deterministic synthetic disk images and their changes (with changed-extents files).

Owns: the mixed image (zeros as holes and as written zeros, compressible text and number tables,
random data, in 64 KiB-aligned regions of random sizes), the sparse 64 GiB image, and the two
change patterns (1,000 scattered 4 KiB writes; 5 % of 64 KiB blocks rewritten).

Everything is derived from the raw output of numpy's PCG64 bit generator (``random_raw``), whose
stream numpy keeps stable across versions and machines; no numpy distribution method and nothing
of the host (no /usr corpus) is used, so a seed gives the same bytes everywhere (little-endian).
Must not: import comb packages (an image is an input, not a backup).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import zstandard

GENERATOR_VERSION = 1
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
REGION_ALIGN_BYTES = 64 * KIB
PIECE_BYTES = 4 * MIB  # generated and written in pieces of this size (bounded memory)
TEXT_SHARE = 0.7  # compressible regions: 70 % Zipf text, 30 % number tables (per 256 KiB)
MIX_UNIT_BYTES = 256 * KIB
VOCAB_WORDS = 65536
ZIPF_EXPONENT = 1.0
ZIPF_TABLE_BITS = 20
_LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)


def parse_size(text: str) -> int:
    """'4G', '512M', '64K' or a byte count (binary units)."""
    units = {"K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


class Stream:
    """Uniform randomness from PCG64's raw 64-bit output only (version-stable)."""

    def __init__(self, *seed: int) -> None:
        self._bg = np.random.PCG64(list(seed))

    def raw(self, n: int) -> np.ndarray:
        return np.asarray(self._bg.random_raw(n), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        return (self.raw(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def below(self, n: int, hi: int) -> np.ndarray:
        """n integers in [0, hi) (hi < 2**32), multiply-shift, no modulo bias to speak of."""
        return ((self.raw(n) >> np.uint64(32)) * np.uint64(hi)) >> np.uint64(32)

    def bytes(self, n: int) -> np.ndarray:
        return self.raw(-(-n // 8)).view(np.uint8)[:n]

    def sample(self, population: int, k: int) -> np.ndarray:
        """k distinct integers in [0, population), in random order."""
        out: list[int] = []
        seen: set[int] = set()
        while len(out) < k:
            for v in self.below(2 * (k - len(out)) + 16, population).tolist():
                if v not in seen and len(out) < k:
                    seen.add(v)
                    out.append(v)
        return np.array(out, np.int64)


class Synth:
    """Compressible content: fixed-width Zipf word text and right-aligned number tables.

    One 8-byte cell per word or number, gathered as uint64 (a few hundred MB/s). zstd-3 on
    64 KiB chunks: text ≈ 3.0x, tables ≈ 2.8x (``describe_compressibility`` prints them).
    """

    def __init__(self, seed: int) -> None:
        s = Stream(seed, 0xC0FFEE)
        v = VOCAB_WORDS
        r = s.raw(v)
        lens = (1 + r % np.uint64(7)).astype(np.int64)  # 1..7 letters, then spaces
        picks = s.raw(v).view(np.uint8).reshape(v, 8).astype(np.uint32)
        cells = _LETTERS[((picks * picks * 26) >> 16).astype(np.int64)]  # skewed letter use
        cells[np.arange(8)[None, :] >= lens[:, None]] = ord(" ")
        punct = (r >> np.uint64(32)) % np.uint64(16)
        rows = np.arange(v)
        for code, ch in ((0, "\n"), (1, ","), (2, ".")):
            sel = punct == code
            cells[rows[sel], np.minimum(lens[sel], 7)] = ord(ch)
        self.words = np.ascontiguousarray(cells).view("<u8").ravel()
        p = 1.0 / np.arange(1, v + 1) ** ZIPF_EXPONENT
        cdf = np.cumsum(p / p.sum())
        t = 1 << ZIPF_TABLE_BITS
        grid = (np.arange(t) + 0.5) / t
        self.zipf = np.minimum(np.searchsorted(cdf, grid), v - 1).astype(np.int32)
        nr = s.raw(v)
        digits = 1 + (nr >> np.uint64(60)) % np.uint64(7)
        values = (nr & np.uint64(0xFFFFFFF)) % (np.uint64(10) ** digits)
        text = "".join(f"{int(x):>7d}," for x in values.tolist())
        self.numbers = np.frombuffer(text.encode(), "<u8").copy()

    def text(self, s: Stream, n: int) -> np.ndarray:
        cells = -(-n // 8)
        u = s.raw(-(-cells // 2)).view("<u4")[:cells] >> np.uint32(32 - ZIPF_TABLE_BITS)
        return self.words[self.zipf[u]].view(np.uint8)[:n]

    def table(self, s: Stream, n: int) -> np.ndarray:
        cells = -(-n // 8)
        u = s.raw(-(-cells // 4)).view("<u2")[:cells]
        return self.numbers[u].view(np.uint8)[:n]

    def compressible(self, s: Stream, n: int) -> np.ndarray:
        out = np.empty(n, np.uint8)
        for pos in range(0, n, MIX_UNIT_BYTES):
            m = min(MIX_UNIT_BYTES, n - pos)
            use_text = s.uniform(1)[0] < TEXT_SHARE
            out[pos : pos + m] = self.text(s, m) if use_text else self.table(s, m)
        return out

    def fill(self, kind: str, s: Stream, n: int) -> np.ndarray:
        if kind == "text":
            return self.compressible(s, n)
        if kind == "random":
            return s.bytes(n)
        return np.zeros(n, np.uint8)


def warm_tree(root: str) -> float:
    """Read every file under ``root`` once (a repository, into the page cache)."""
    t0 = time.perf_counter()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as fh:
                    while fh.read(16 * MIB):
                        pass
            except OSError:
                pass
    return time.perf_counter() - t0


@dataclass(frozen=True)
class ImageSpec:
    """What to generate. Fractions are of the logical size; zeros = holes + written zeros."""

    size: int
    seed: int = 1
    zero_frac: float = 0.40
    hole_share: float = 0.75  # of the zeros, this share are holes, the rest written zeros
    text_frac: float = 0.35
    random_frac: float = 0.25
    min_region_bytes: int = 256 * KIB
    max_region_bytes: int = 32 * MIB

    def targets(self) -> dict[str, float]:
        z = self.zero_frac
        return {
            "hole": z * self.hole_share,
            "zeros": z * (1 - self.hole_share),
            "text": self.text_frac,
            "random": self.random_frac,
        }


def mixed_spec(size: int, seed: int = 1) -> ImageSpec:
    return ImageSpec(size=size, seed=seed)


def mixed_path(workdir: str, size: int, seed: int = 1) -> str:
    """Where the (cached, never modified) mixed image of this size and seed lives."""
    tag = f"{size / GIB:g}g" if size >= GIB else f"{size // MIB}m"
    return os.path.join(workdir, f"mixed-{tag}-s{seed}.img")


def sparse_spec(size: int = 64 * GIB, data_bytes: int = 2 * GIB, seed: int = 3) -> ImageSpec:
    """Mostly holes: ``data_bytes`` of data scattered over ``size`` (the metadata case)."""
    d = data_bytes / size
    return ImageSpec(
        size=size, seed=seed, zero_frac=1 - d, hole_share=1.0, text_frac=d / 2, random_frac=d / 2
    )


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    kind: str


def plan_regions(spec: ImageSpec) -> list[Region]:
    """Regions of log-uniform size (64 KiB aligned); each takes the kind furthest behind target."""
    s = Stream(spec.seed, 1)
    targets = spec.targets()
    have = dict.fromkeys(targets, 0)
    out: list[Region] = []
    pos = 0
    lo, hi = np.log(spec.min_region_bytes), np.log(spec.max_region_bytes)
    while pos < spec.size:
        u, jitter = s.uniform(2).tolist()
        length = int(np.exp(lo + (hi - lo) * u)) // REGION_ALIGN_BYTES * REGION_ALIGN_BYTES
        length = min(max(length, REGION_ALIGN_BYTES), spec.size - pos)
        end = pos + length
        deficit = {k: targets[k] * end - have[k] for k in targets}
        # Mostly the largest deficit; sometimes the second, so the layout is not periodic.
        ranked = sorted(deficit, key=lambda k: -deficit[k])
        kind = ranked[1] if jitter < 0.2 and deficit[ranked[1]] > 0 else ranked[0]
        have[kind] += length
        if out and out[-1].kind == kind:
            out[-1] = Region(out[-1].offset, out[-1].length + length, kind)
        else:
            out.append(Region(pos, length, kind))
        pos = end
    return out


@dataclass(frozen=True)
class ImageInfo:
    path: str
    spec: ImageSpec
    bytes_by_kind: dict[str, int]
    regions: int
    seconds: float
    reused: bool

    def summary(self) -> str:
        parts = ", ".join(
            f"{k} {v / self.spec.size:.1%}" for k, v in self.bytes_by_kind.items() if v
        )
        how = "reused" if self.reused else f"generated in {self.seconds:.1f} s"
        return (
            f"{self.path}: {self.spec.size / GIB:.1f} GiB, {self.regions} regions ({parts}); {how}"
        )


def _sidecar(path: str) -> str:
    return path + ".json"


def generate_image(spec: ImageSpec, path: str) -> ImageInfo:
    """Write the image (holes left unwritten); reuse an existing one made from the same spec."""
    regions = plan_regions(spec)
    by_kind: dict[str, int] = dict.fromkeys(spec.targets(), 0)
    for r in regions:
        by_kind[r.kind] += r.length
    meta = {"version": GENERATOR_VERSION, "spec": asdict(spec)}
    try:
        with open(_sidecar(path)) as fh:
            same = json.load(fh) == meta and os.path.getsize(path) == spec.size
    except (OSError, ValueError):
        same = False
    if same:
        return ImageInfo(path, spec, by_kind, len(regions), 0.0, True)
    t0 = time.perf_counter()
    synth = Synth(spec.seed)
    if os.path.exists(_sidecar(path)):
        os.unlink(_sidecar(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, spec.size)
        for i, r in enumerate(regions):
            if r.kind == "hole":
                continue
            s = Stream(spec.seed, 2, i)
            for pos in range(0, r.length, PIECE_BYTES):
                n = min(PIECE_BYTES, r.length - pos)
                os.pwrite(fd, synth.fill(r.kind, s, n).data, r.offset + pos)
    finally:
        os.close(fd)
    with open(_sidecar(path), "w") as fh:
        json.dump(meta, fh)
    return ImageInfo(path, spec, by_kind, len(regions), time.perf_counter() - t0, False)


def data_extents(path: str) -> list[tuple[int, int]]:
    """(offset, length) of the allocated ranges (SEEK_DATA / SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


def sparse_copy(src: str, dst: str) -> None:
    """Copy keeping holes as holes and written zeros as written (copy_file_range per extent)."""
    size = os.path.getsize(src)
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fout, size)
        for off, length in data_extents(src):
            done = 0
            while done < length:
                n = os.copy_file_range(fin, fout, length - done, off + done, off + done)
                if n == 0:
                    raise OSError(f"copy_file_range stopped at {off + done} in {src}")
                done += n
    finally:
        os.close(fin)
        os.close(fout)


def warm(path: str) -> float:
    """Read the allocated ranges once (every tool then sees a page-cached, warm source). Needed
    before every measured run: borg drops what it read from the page cache (``fadvise``
    DONTNEED; after a borg backup of the 4 GiB image here 1.2 of its 2.9 GB stayed cached), so
    the run after it would read partly from the device."""
    t0 = time.perf_counter()
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, length in data_extents(path):
            for pos in range(off, off + length, len(buf)):
                os.preadv(fd, [view[: min(len(buf), off + length - pos)]], pos)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class ChangeSet:
    """One applied change: its changed-extents file and what it wrote."""

    name: str
    extents_path: str
    writes: int
    bytes_written: int
    extents: int
    compressed_bytes: int  # zstd-3 of each changed 64 KiB block alone (0 for zero blocks)


def _apply(
    path: str, name: str, offsets: np.ndarray, length: int, s: Stream, synth: Synth
) -> ChangeSet:
    """Write ``length`` bytes at each offset: 10 % zeros, 55 % compressible, 35 % random."""
    cctx = zstandard.ZstdCompressor(level=3)
    order = np.sort(offsets)
    kinds = s.uniform(len(order))
    compressed = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, k in zip(order.tolist(), kinds.tolist(), strict=True):
            kind = "zeros" if k < 0.10 else ("text" if k < 0.65 else "random")
            data = synth.fill(kind, s, length)
            os.pwrite(fd, data.data, off)
            if kind != "zeros":
                compressed += min(len(cctx.compress(data.tobytes())), length)
    finally:
        os.close(fd)
    merged: list[list[int]] = []
    for off in order.tolist():
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += length
        else:
            merged.append([off, length])
    ext_path = os.path.join(os.path.dirname(os.path.abspath(path)), f"changes-{name}.json")
    with open(ext_path, "w") as fh:
        json.dump([{"offset": o, "length": n} for o, n in merged], fh)
    return ChangeSet(name, ext_path, len(order), len(order) * length, len(merged), compressed)


def change_scattered_writes(
    path: str, count: int = 1000, write_bytes: int = 4 * KIB, seed: int = 11
) -> ChangeSet:
    """``count`` writes of ``write_bytes`` at distinct random aligned offsets anywhere."""
    size = os.path.getsize(path)
    s = Stream(seed, 4)
    offsets = s.sample(size // write_bytes, count) * write_bytes
    return _apply(path, f"{count}x{write_bytes // KIB}k", offsets, write_bytes, s, Synth(seed))


def change_block_rewrites(
    path: str, fraction: float = 0.05, block_bytes: int = 64 * KIB, seed: int = 12
) -> ChangeSet:
    """Rewrite ``fraction`` of the ``block_bytes`` blocks, chosen at random."""
    size = os.path.getsize(path)
    blocks = size // block_bytes
    s = Stream(seed, 5)
    offsets = s.sample(blocks, round(blocks * fraction)) * block_bytes
    name = f"{fraction * 100:g}pct-{block_bytes // KIB}k"
    return _apply(path, name, offsets, block_bytes, s, Synth(seed))


def describe_compressibility(seed: int = 1, sample_bytes: int = 16 * MIB) -> dict[str, float]:
    """zstd-3 ratio of the synthetic content, compressed in 64 KiB chunks like comb does."""
    synth = Synth(seed)
    cctx = zstandard.ZstdCompressor(level=3)
    out: dict[str, float] = {}
    for name in ("text", "table", "compressible"):
        data = getattr(synth, name)(Stream(seed, 9), sample_bytes).tobytes()
        stored = sum(
            len(cctx.compress(data[i : i + 64 * KIB])) for i in range(0, len(data), 64 * KIB)
        )
        out[name] = round(len(data) / stored, 2)
    return out
