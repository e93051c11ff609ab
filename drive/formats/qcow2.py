"""qcow2 (version 3) images generated on the fly from a block source.

Owns the qcow2 layout: the header, the L1 and L2 mapping tables, the refcount table and
refcount blocks, and where each data cluster of the disk lands in the file. It lays the file
out from the disk's size and extents alone: it must not read the disk's data (data clusters
are ``FromSource`` segments, read only when the image is read) and it knows nothing of comb
beyond ``drive.formats.image`` and the block-source protocol (``catalog.read.source``).

The file is packed with no free clusters, in this order::

    cluster 0          header, then the end-of-extensions marker
    L1 table           one 8-byte entry per L2 table's worth of guest clusters
    refcount table     one 8-byte entry per refcount block
    refcount blocks    16-bit refcounts (refcount_order 4), one per host cluster
    L2 tables          one per L1 entry whose guest range overlaps the extents
    data clusters      one per guest cluster overlapping the extents, in guest order

Because every host cluster in [0, total) is used exactly once, every refcount is 1 (so every
L1 and L2 entry carries the COPIED flag) and the refcount blocks are simply ``total`` ones.
Data clusters in guest order make each run of consecutive guest clusters one host run, hence
one ``FromSource`` segment.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass

from catalog.read.source import MappedSource
from drive.formats.image import FromSource, Literal, Segment, VirtualImage

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_VERSION = 3
# The version 3 header without optional fields (compression_type is absent, i.e. zlib).
HEADER_LENGTH_BYTES = 104
# Extension type 0 with length 0: the end of the (empty) header extension area.
END_OF_EXTENSIONS = bytes(8)
REFCOUNT_ORDER = 4  # 1 << 4 = 16-bit refcounts, the qcow2 default
REFCOUNT_ENTRY_BYTES = 2
TABLE_ENTRY_BYTES = 8  # L1, L2 and refcount table entries
# Bit 63 of an L1/L2 entry: the cluster's refcount is exactly one (true of every cluster here).
COPIED_FLAG = 1 << 63
MIN_CLUSTER_BITS = 9  # the spec's floor (512-byte clusters)
MAX_CLUSTER_BITS = 21  # qemu opens nothing with clusters above 2 MiB
# qemu's implementation limits; an image past them would be valid qcow2 that qemu refuses.
MAX_L1_TABLE_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
# Host offsets live in bits 9-55 of table entries.
MAX_HOST_OFFSET_BYTES = 1 << 56

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
assert _HEADER.size == HEADER_LENGTH_BYTES
SECTOR_BYTES = 512


@dataclass(frozen=True)
class _Run:
    """``count`` consecutive guest clusters from ``guest_cluster``, stored from ``host_cluster``."""

    guest_cluster: int
    count: int
    host_cluster: int


@dataclass(frozen=True)
class _Layout:
    """Where everything goes, in clusters (offsets are ``cluster * cluster_bytes``)."""

    cluster_bytes: int
    l1_entries: int
    l1_cluster: int
    refcount_table_cluster: int
    refcount_table_clusters: int
    refcount_block_cluster: int
    refcount_blocks: int
    l2_cluster: int
    l2_indices: list[int]  # the L1 indices that have an L2 table, ascending
    runs: list[_Run]
    total_clusters: int


def qcow2_image(source: MappedSource, cluster_bytes: int = 64 << 10) -> VirtualImage:
    """``source`` as a qcow2 version 3 image (no backing file, no encryption, 16-bit
    refcounts): clusters overlapping its extents are allocated, the rest read as zeros."""
    layout = _plan(source.size, source.extents(), cluster_bytes)
    cb = layout.cluster_bytes
    segs: list[Segment] = [
        # Sector-aligned size: qemu rounds a qcow2's size *down* to 512 bytes, which would hide
        # a partial last sector; rounding up shows it, followed by zeros.
        Literal(
            0, _header(-(-source.size // SECTOR_BYTES) * SECTOR_BYTES, layout) + END_OF_EXTENSIONS
        ),
        Literal(layout.refcount_table_cluster * cb, _refcount_table(layout)),
        # Every cluster in [0, total) has refcount 1; the rest of the last block is a gap (0).
        Literal(
            layout.refcount_block_cluster * cb,
            (1).to_bytes(REFCOUNT_ENTRY_BYTES, "big") * layout.total_clusters,
        ),
    ]
    if layout.l1_entries:  # an empty disk has an empty L1 table, which takes no cluster
        segs.append(Literal(layout.l1_cluster * cb, _l1_table(layout)))
    segs += [
        Literal((layout.l2_cluster + n) * cb, table) for n, table in enumerate(_l2_tables(layout))
    ]
    for run in layout.runs:
        guest = run.guest_cluster * cb
        # The disk's last cluster may be partial: what lies past its end stays a gap (zeros).
        length = min(run.count * cb, source.size - guest)
        segs.append(FromSource(run.host_cluster * cb, length, guest))
    return VirtualImage(layout.total_clusters * cb, segs, source)


def _plan(size: int, extents: list[tuple[int, int]], cluster_bytes: int) -> _Layout:
    """The whole layout, from the disk's size and extents (no data is read)."""
    cluster_bits = cluster_bytes.bit_length() - 1
    if cluster_bytes != 1 << cluster_bits or not (
        MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    ):
        raise ValueError(f"qcow2 cluster size {cluster_bytes} is not a power of two in 512..2M")
    guest_runs = _guest_runs(size, extents, cluster_bytes)
    data_clusters = sum(n for _, n in guest_runs)
    l2_entries = cluster_bytes // TABLE_ENTRY_BYTES
    l1_entries = _ceil_div(_ceil_div(size, cluster_bytes), l2_entries)
    if l1_entries * TABLE_ENTRY_BYTES > MAX_L1_TABLE_BYTES:
        raise ValueError(f"a {size}-byte disk needs clusters larger than {cluster_bytes} in qcow2")
    l2_indices = _l2_indices(guest_runs, l2_entries)
    l1_clusters = _ceil_div(l1_entries * TABLE_ENTRY_BYTES, cluster_bytes)
    fixed = 1 + l1_clusters + len(l2_indices) + data_clusters
    table_clusters, blocks = _refcount_clusters(fixed, cluster_bytes)
    total = fixed + table_clusters + blocks
    if table_clusters * cluster_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise ValueError(f"a {size}-byte disk needs clusters larger than {cluster_bytes} in qcow2")
    if total * cluster_bytes > MAX_HOST_OFFSET_BYTES:
        raise ValueError(f"a qcow2 image of {total} clusters is past qcow2's 64 PiB offsets")
    l1_cluster = 1
    table_cluster = l1_cluster + l1_clusters
    block_cluster = table_cluster + table_clusters
    l2_cluster = block_cluster + blocks
    host = l2_cluster + len(l2_indices)
    runs: list[_Run] = []
    for guest, count in guest_runs:
        runs.append(_Run(guest, count, host))
        host += count
    assert host == total
    return _Layout(
        cluster_bytes,
        l1_entries,
        l1_cluster,
        table_cluster,
        table_clusters,
        block_cluster,
        blocks,
        l2_cluster,
        l2_indices,
        runs,
        total,
    )


def _refcount_clusters(other_clusters: int, cluster_bytes: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) for a file of ``other_clusters`` plus these.

    The refcount blocks count themselves and the table that points at them: grow their number
    until it covers the total it implies (the sequence never decreases, so it settles on the
    smallest fixed point, leaving no refcount block without a used cluster to count)."""
    per_block = cluster_bytes // REFCOUNT_ENTRY_BYTES
    blocks = 0
    while True:
        table_clusters = max(1, _ceil_div(blocks * TABLE_ENTRY_BYTES, cluster_bytes))
        need = _ceil_div(other_clusters + table_clusters + blocks, per_block)
        if need <= blocks:
            return table_clusters, blocks
        blocks = need


def _guest_runs(
    size: int, extents: list[tuple[int, int]], cluster_bytes: int
) -> list[tuple[int, int]]:
    """(first guest cluster, count) of the clusters overlapping the extents, merged: extents
    need not be cluster-aligned, so neighbours may share a cluster or touch."""
    runs: list[tuple[int, int]] = []
    for offset, length in extents:
        end = min(offset + length, size)
        if end <= offset:
            continue
        first, stop = offset // cluster_bytes, _ceil_div(end, cluster_bytes)
        if runs and runs[-1][0] + runs[-1][1] >= first:
            start = runs[-1][0]
            stop = max(stop, start + runs[-1][1])
            runs[-1] = (start, stop - start)
        else:
            runs.append((first, stop - first))
    return runs


def _l2_indices(guest_runs: list[tuple[int, int]], l2_entries: int) -> list[int]:
    """The L1 indices whose guest range holds at least one data cluster, ascending."""
    out: list[int] = []
    for first, count in guest_runs:
        lo, hi = first // l2_entries, (first + count - 1) // l2_entries
        if out and out[-1] >= lo:
            lo = out[-1] + 1
        out.extend(range(lo, hi + 1))
    return out


def _header(size: int, layout: _Layout) -> bytes:
    cb = layout.cluster_bytes
    return _HEADER.pack(
        QCOW2_MAGIC,
        QCOW2_VERSION,
        0,  # backing_file_offset: none
        0,  # backing_file_size
        cb.bit_length() - 1,  # cluster_bits
        size,  # virtual size: a multiple of 512 (see qcow2_image), not rounded to clusters
        0,  # crypt_method: none
        layout.l1_entries,
        layout.l1_cluster * cb,
        layout.refcount_table_cluster * cb,
        layout.refcount_table_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
        0,  # incompatible_features: clean, not corrupt, no data file, zlib, normal L2
        0,  # compatible_features: no lazy refcounts, so the refcounts are authoritative
        0,  # autoclear_features
        REFCOUNT_ORDER,
        HEADER_LENGTH_BYTES,
    )


def _big_endian(entries: array) -> bytes:
    """Table entries as the big-endian bytes qcow2 stores."""
    if sys.byteorder == "little":
        entries.byteswap()
    return entries.tobytes()


def _l1_table(layout: _Layout) -> bytes:
    entries = array("Q", bytes(layout.l1_entries * TABLE_ENTRY_BYTES))
    for n, index in enumerate(layout.l2_indices):
        entries[index] = ((layout.l2_cluster + n) * layout.cluster_bytes) | COPIED_FLAG
    return _big_endian(entries)


def _refcount_table(layout: _Layout) -> bytes:
    cb = layout.cluster_bytes
    first = layout.refcount_block_cluster
    entries = array("Q", (c * cb for c in range(first, first + layout.refcount_blocks)))
    return _big_endian(entries)


def _l2_tables(layout: _Layout) -> list[bytes]:
    """One cluster-sized L2 table per entry of ``layout.l2_indices``, in that order."""
    cb = layout.cluster_bytes
    l2_entries = cb // TABLE_ENTRY_BYTES
    tables: list[bytes] = []
    runs, r = layout.runs, 0
    for index in layout.l2_indices:
        lo, hi = index * l2_entries, (index + 1) * l2_entries
        entries = array("Q", bytes(cb))
        while r < len(runs) and runs[r].guest_cluster < hi:
            run = runs[r]
            a = max(run.guest_cluster, lo)
            b = min(run.guest_cluster + run.count, hi)
            host = (run.host_cluster + a - run.guest_cluster) * cb | COPIED_FLAG
            # A run of consecutive host clusters: one C-speed slice, not a loop per cluster.
            entries[a - lo : b - lo] = array("Q", range(host, host + (b - a) * cb, cb))
            if run.guest_cluster + run.count > hi:
                break  # the run goes on into the next L2 table
            r += 1
        tables.append(_big_endian(entries))
    return tables


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
