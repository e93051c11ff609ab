"""The parity encoder: ISA-L gives zfec's bytes for every geometry and shard size, from
writable and read-only shards, and a parity file streamed through either is the same file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest
import zfec
from combtest import _unavailable

from catalog.store import parity_codec
from catalog.store.local import LocalStorage
from catalog.store.parity import ParityGeometry, parity_name, write_parity


@pytest.fixture
def isal() -> None:
    """ISA-L (Debian libisal2): a skip locally when missing, a failure in CI."""
    if parity_codec.encoder_name() != "isa-l":
        _unavailable("ISA-L (libisal.so.2, Debian package libisal2)")


def _zfec(shards: list[bytes], k: int, m: int) -> list[bytes]:
    out = zfec.Encoder(k, k + m).encode(tuple(shards), tuple(range(k, k + m)))
    return [bytes(p) for p in out]


@pytest.mark.parametrize(
    ("k", "m", "sizes"),
    [
        (16, 2, [256 * 1024, 4096, 1]),  # the default geometry, a short last stripe, one byte
        (4, 2, [1024, 777]),
        (1, 1, [64, 3]),
        (10, 3, [4097, 31]),
        (16, 16, [1000]),
        (200, 56, [65]),  # 256 shards in all: GF(2^8)'s limit
    ],
)
def test_isal_gives_zfecs_bytes(isal: None, k: int, m: int, sizes: list[int]) -> None:
    rng = random.Random(k * 1000 + m)
    enc = parity_codec.Encoder(k, m)
    for size in sizes:  # one encoder, shard sizes shrinking and growing: its buffers follow
        for _ in range(2):
            shards = [rng.randbytes(size) for _ in range(k)]
            views = [memoryview(bytearray(s)) for s in shards]
            got = [bytes(p) for p in enc.encode(views)]
            assert got == _zfec(shards, k, m)
            # read-only shards (bytes) give the same
            assert [bytes(p) for p in enc.encode([memoryview(s) for s in shards])] == got


def test_unequal_shards_are_refused() -> None:
    enc = parity_codec.Encoder(2, 1)
    with pytest.raises(ValueError):
        enc.encode([memoryview(bytearray(8)), memoryview(bytearray(7))])


def _parity_file(tmp_path: Path, name: str, pack: bytes) -> bytes:
    root = tmp_path / name
    (root / "tmp").mkdir(parents=True)
    storage = LocalStorage(str(root))
    pid = blake3.blake3(pack).hexdigest()
    write_parity(storage, ParityGeometry(), pack, pid)
    return storage.read(parity_name(pid))


def test_a_parity_file_is_the_same_through_either_encoder(
    isal: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = os.urandom(9 * 1024 * 1024 + 12345)  # two whole 4 MiB stripes and a short one
    with_isal = _parity_file(tmp_path, "isal", pack)
    monkeypatch.setenv(parity_codec.ENV_ENCODER, "zfec")
    parity_codec._isal.cache_clear()
    try:
        assert parity_codec.encoder_name() == "zfec"
        assert _parity_file(tmp_path, "zfec", pack) == with_isal
    finally:
        monkeypatch.delenv(parity_codec.ENV_ENCODER)
        parity_codec._isal.cache_clear()
    assert parity_codec.encoder_name() == "isa-l"
