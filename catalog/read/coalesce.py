"""Coalescing chunk reads into pack reads: the one policy for every reader of many chunks at once
(restore's ``stages.restore.plan_reads``, the virtual drive's large reads in
``catalog.read.point``).

Neighbouring chunks of a pack are read with one request, through gaps of at most ``GAP_BYTES``
(reading a gap costs less than another request), up to ``READ_BYTES`` a request (which bounds a
reader's buffers and keeps several requests in flight). Figures: bench/README.md, "Coalesced
pack reads".

Owns the constants and the grouping. Must not: read, decode or sort anything (callers hand in
their chunks sorted by pack and offset), or know where the chunks go.
"""

from __future__ import annotations

from collections.abc import Sequence

# Measured (bench/README.md, "Coalesced pack reads"): restore and exports run the same within
# noise with 64 KiB or 1 MiB gaps and 4, 8 or 16 MiB reads, but 16 MiB reads cost restore
# 15-25 % more CPU (likely the page faults of its per-thread read buffers, twice as large).
GAP_BYTES = 1 << 20  # read through gaps up to this size rather than issue another request
READ_BYTES = 8 << 20  # one request covers at most this many bytes of a pack


def coalesce(
    pack: Sequence[object],
    offset: Sequence[int],
    length: Sequence[int],
    gap_bytes: int = GAP_BYTES,
    read_bytes: int = READ_BYTES,
) -> list[tuple[int, int]]:
    """The pack reads for chunks sorted by (pack, offset): runs [first, end) of their rows, in
    order, each read as bytes [offset[first], max end of its rows) of one pack. A row at the
    same pack and offset as the row before it (one chunk wanted twice) never starts a read;
    a chunk longer than ``read_bytes`` is read alone."""
    runs: list[tuple[int, int]] = []
    first, start, end = 0, 0, 0
    for i in range(len(offset)):
        at, n = offset[i], length[i]
        if i and pack[i] == pack[i - 1] and at == offset[i - 1]:
            continue
        if not i or pack[i] != pack[first] or at - end > gap_bytes or at + n - start > read_bytes:
            if i:
                runs.append((first, i))
            first, start, end = i, at, at + n
        else:
            end = max(end, at + n)
    if len(offset):
        runs.append((first, len(offset)))
    return runs
