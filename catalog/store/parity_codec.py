"""The parity encoder: Reed-Solomon parity shards of one stripe, as FORMAT.md 20 specifies them
(GF(2^8) with the polynomial 0x11d, zfec's systematic Vandermonde matrix).

Two implementations give the same bytes: Intel's ISA-L (``libisal.so.2``, Debian ``libisal2``,
BSD-3-Clause; SIMD, several GB/s per core) through ctypes when the machine has it, otherwise
zfec (~0.5-1 GB/s per core). ISA-L is handed zfec's own coefficients (found by encoding unit
vectors with zfec), so the matrix is zfec's by construction and the parity files do not depend
on which library wrote them; the tests compare both on random stripes.

Owns the choice of encoder and its calls. Must not: frame, hash or write anything (parity.py
does), or decode (rebuilding is rare and stays with zfec).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from functools import cache

import zfec

# COMB_PARITY_ENCODER=zfec forces the portable encoder (the bench compares both).
ENV_ENCODER = "COMB_PARITY_ENCODER"


@cache
def _isal() -> ctypes.CDLL | None:
    """ISA-L's library, or None when this machine has none (or it lacks the two calls)."""
    if os.environ.get(ENV_ENCODER, "").lower() == "zfec":
        return None
    name = ctypes.util.find_library("isal") or "libisal.so.2"
    try:
        lib = ctypes.CDLL(name)
        init, encode = lib.ec_init_tables, lib.ec_encode_data
    except (OSError, AttributeError):
        return None
    init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
    init.restype = None
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ptrs, ptrs]
    encode.restype = None
    return lib


def encoder_name() -> str:
    """``isa-l`` or ``zfec``: what ``Encoder`` uses on this machine."""
    return "isa-l" if _isal() is not None else "zfec"


@cache
def coefficients(k: int, m: int) -> bytes:
    """zfec's parity rows for ``k`` data and ``m`` parity shards: ``m`` rows of ``k`` bytes,
    read off zfec by encoding each unit vector (parity is linear in the data)."""
    enc = zfec.Encoder(k, k + m)
    rows = bytearray(m * k)
    for i in range(k):
        unit = tuple(b"\x01" if j == i else b"\x00" for j in range(k))
        for j, shard in enumerate(enc.encode(unit, tuple(range(k, k + m)))):
            rows[j * k + i] = bytes(shard)[0]
    return bytes(rows)


class Encoder:
    """The ``m`` parity shards of ``k`` equal data shards (one stripe). Not for two threads at
    once: it reuses its buffers (each ParityWriter has its own)."""

    def __init__(self, k: int, m: int) -> None:
        self.k, self.m = k, m
        self._lib = _isal()
        if self._lib is None:
            self._zfec = zfec.Encoder(k, k + m)
            self._want = tuple(range(k, k + m))
            return
        self._tables = ctypes.create_string_buffer(32 * k * m)
        self._lib.ec_init_tables(k, m, coefficients(k, m), self._tables)
        self._out: list[bytearray] = []
        self._out_ptrs = (ctypes.c_void_p * m)()
        self._in_ptrs = (ctypes.c_void_p * k)()

    def encode(self, shards: Sequence[memoryview]) -> list[memoryview]:
        """Parity of ``shards`` (``k`` writable or read-only views of one size). The returned
        views are valid until the next call (the encoder reuses its output buffers)."""
        if len(shards) != self.k:
            raise ValueError(f"a stripe has {self.k} data shards, not {len(shards)}")
        shards = [memoryview(s).cast("B") for s in shards]
        size = len(shards[0])
        if size == 0 or any(len(s) != size for s in shards):
            raise ValueError("parity shards of one stripe must have one size, above zero")
        if self._lib is None:
            return [memoryview(p) for p in self._zfec.encode(tuple(shards), self._want)]
        if not self._out or len(self._out[0]) < size:
            self._out = [bytearray(size) for _ in range(self.m)]
            for j, buf in enumerate(self._out):
                self._out_ptrs[j] = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        keep = []  # the ctypes views pin the shards' buffers until the call returns
        for i, shard in enumerate(shards):
            if shard.readonly:
                shard = memoryview(bytearray(shard))
            view = ctypes.c_char.from_buffer(shard)
            keep.append(view)
            self._in_ptrs[i] = ctypes.addressof(view)
        self._lib.ec_encode_data(size, self.k, self.m, self._tables, self._in_ptrs, self._out_ptrs)
        del keep
        return [memoryview(buf)[:size] for buf in self._out]
