"""The one read-coalescing policy (catalog.read.coalesce): gaps, the size cap, shared chunks."""

from __future__ import annotations

from catalog.read.coalesce import GAP_BYTES, READ_BYTES, coalesce


def test_neighbours_of_a_pack_are_read_together_through_small_gaps() -> None:
    packs = ["a", "a", "a", "b"]
    offsets = [0, 100, 201 + GAP_BYTES, 0]
    assert coalesce(packs, offsets, [100, 100, 100, 100]) == [(0, 2), (2, 3), (3, 4)]
    # A gap of exactly GAP_BYTES is still read through.
    assert coalesce(["a", "a"], [0, 100 + GAP_BYTES], [100, 100]) == [(0, 2)]


def test_a_read_covers_at_most_read_bytes() -> None:
    n = READ_BYTES // 4
    assert coalesce(["a"] * 6, [i * n for i in range(6)], [n] * 6) == [(0, 4), (4, 6)]
    assert coalesce(["a"], [0], [2 * READ_BYTES]) == [(0, 1)]  # a larger chunk: alone
    assert coalesce(["a", "a"], [0, 10], [10, 10], gap_bytes=0, read_bytes=15) == [(0, 1), (1, 2)]


def test_a_chunk_wanted_twice_never_starts_a_read() -> None:
    big = READ_BYTES + 1
    assert coalesce(["a", "a", "a"], [0, 0, big], [big, big, 10]) == [(0, 2), (2, 3)]


def test_no_chunks_no_reads() -> None:
    assert coalesce([], [], []) == []
