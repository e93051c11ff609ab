"""What every catalog view and column means: the text of ``comb catalog-schema`` and of the
README's view table. A test checks that it names exactly the views' columns."""

from __future__ import annotations

# The columns of an entry of the file catalogs (the files and file_changes views).
_ENTRY_COLUMNS = {
    "volume": "the volume inside the point: part1, disk, lvm/VG/LV",
    "path": "the path below the volume, from /, as the bytes the guest stored",
    "path_text": "the path as text (bytes that are not UTF-8 shown escaped, as ls does)",
    "kind": "file, dir, symlink, fifo, chardev, blockdev, socket or other",
    "size": "bytes (files and links)",
    "mode": "permission bits",
    "uid": "owner",
    "gid": "group",
    "mtime_ns": "modification time, ns since the epoch",
    "ctime_ns": "status change time, ns since the epoch",
    "inode": "inode or MFT number (hard links share it)",
    "nlink": "link count",
    "target": "a symbolic link's target (bytes)",
    "mtime": "modification time",
}

VIEWS: dict[str, tuple[str, dict[str, str]]] = {
    "points": (
        "committed recovery points, one row per point document",
        {
            "id": "point id (16 hex digits)",
            "source": "source name",
            "source_path": "what was read",
            "time": "commit time (UTC)",
            "size": "disk size in bytes",
            "chunk_size": "chunk size in bytes",
            "leaf_chunks": "chunks per manifest leaf",
            "parent": "parent point id (null for a first backup)",
            "mode": "full, full-reread or changed-extents",
            "engine": "local or ray",
            "root": "id of the manifest root file",
            "leaves": "id of the leaves file this backup wrote",
            "read_on": "the Ray nodes whose workers read the source: a list of {node_id, "
            "address} (empty for the local engine)",
            "bytes_read": "bytes read from the source",
            "bytes_new": "plain bytes of the chunks this backup stored",
            "bytes_stored": "blob bytes this backup wrote to packs",
            "bytes_zero": "bytes of zero chunks among those read",
            "chunks": "chunks read",
            "chunks_new": "chunks stored",
            "leaves_new": "manifest leaves written",
            "leaves_shared": "manifest leaves shared with earlier points",
            "metadata_bytes": "bytes of metadata files written",
            "seconds": "wall time of the backup",
        },
    ),
    "sources": (
        "one row per source",
        {
            "source": "source name",
            "points": "number of recovery points",
            "first_time": "time of the first point",
            "last_time": "time of the latest point",
            "size": "disk size at the latest point",
            "bytes_data": "data (non-zero) bytes at the latest point",
            "bytes_stored": "blob bytes its backups stored that the repository still holds "
            "(stored_history)",
            "has_changes": "every point has a change table (full history known)",
        },
    ),
    "point_history": (
        "points in source order with their statistics (pos orders by source, then lane, then "
        "down the parent chain)",
        {
            "pos": "position: source-major, then lane by lane, each lane oldest first",
            "point_id": "point id",
            "source": "source name",
            "lane": "the run of points (each the parent of the next) this one is in: the "
            "source's name, or SOURCE@FIRST_POINT for a branch",
            "seq": "position within the lane (0 = a first backup or the first of a branch)",
            "time": "commit time (UTC)",
            "size": "disk size in bytes",
            "chunk_size": "chunk size in bytes",
            "mode": "full, full-reread or changed-extents",
            "engine": "local or ray",
            "seconds": "wall time of the backup",
            "bytes_read": "bytes read from the source",
            "bytes_new": "plain bytes of the chunks this backup stored",
            "bytes_stored": "blob bytes this backup wrote to packs",
            "bytes_zero": "bytes of zero chunks among those read",
            "bytes_changed": "bytes whose content differs from the parent (null: not recorded)",
            "bytes_data": "data (non-zero) bytes of the whole image (null: not recorded)",
            "has_changes": "the point has a change table",
        },
    ),
    "stored_history": (
        "what each backup stored that the repository still holds: one row per point, and per "
        "forgotten point whose stored chunks kept points still use",
        {
            "point_id": "point id (a forgotten point's too)",
            "source": "source name",
            "time": "commit time (UTC)",
            "live": "false for a forgotten point",
            "pos": "point_history.pos (null for a forgotten point)",
            "bytes_stored": "blob bytes it stored that are still held (a live point: all)",
            "bytes_new": "plain bytes of those (a forgotten point: in proportion to stored)",
            "bytes_data": "data bytes of the image (null for a forgotten point)",
            "has_changes": "the point has a change table",
            "ord": "order by time (for running totals)",
        },
    ),
    "changes": (
        "every chunk each point changed relative to its parent (its first backup: every data "
        "chunk)",
        {
            "point_id": "the point that made the change",
            "source": "source name",
            "pos": "point_history.pos of that point",
            "offset": "byte offset on the disk",
            "length": "bytes (the last chunk of a disk may be short)",
            "chunk_key": "first 8 bytes of the new chunk id (null: now zeros)",
            "zero": "the region became zeros",
            "new": "this backup stored the chunk (it existed nowhere before)",
            "stored_len": "bytes stored for it by this backup (0 unless new)",
        },
    ),
    "point_usage": (
        "per point: what it added and what only it holds",
        {
            "pos": "point_history.pos",
            "point_id": "point id",
            "source": "source name",
            "time": "commit time (UTC)",
            "new_bytes": "plain bytes of the chunks it stored",
            "changed_bytes": "bytes whose content differs from its parent",
            "stored_bytes": "blob bytes it stored",
            "unique_bytes": "blob bytes of chunks no other point holds: freed by deleting it",
            "data_bytes": "data (non-zero) bytes of its image",
            "dedup_ratio": "data read / plain bytes stored (how much was already there)",
            "compression_ratio": "plain bytes / blob bytes of what it stored",
        },
    ),
    "manifests": (
        "the data chunks of every point (zeros are the gaps); reads every manifest",
        {
            "point_id": "point id",
            "offset": "byte offset on the disk",
            "length": "bytes",
            "chunk_id": "BLAKE3-256 of the chunk",
            "shared_leaf": "its manifest leaf is shared with an earlier point",
        },
    ),
    "extents": (
        "every point's whole disk as data chunks and zero runs; reads every manifest",
        {
            "point_id": "point id",
            "offset": "byte offset on the disk",
            "length": "bytes",
            "chunk_id": "BLAKE3-256 of the chunk (null for zeros)",
            "kind": "data or zero",
        },
    ),
    "chunks": (
        "the chunk index: one row per stored copy of a chunk",
        {
            "chunk_id": "BLAKE3-256 of the plain chunk",
            "pack": "pack id",
            "offset": "blob offset in the pack",
            "stored_len": "blob bytes",
            "raw_len": "plain bytes",
            "codec": "0 = stored, 1 = zstd",
        },
    ),
    "packs": (
        "per pack totals from the index",
        {
            "pack": "pack id",
            "chunks": "blobs in the pack",
            "stored_bytes": "blob bytes",
            "raw_bytes": "plain bytes",
        },
    ),
    "files": (
        "every entry of every point's filesystems (file catalogs: `comb index`); rebuilt per "
        "point from its catalog's chain, so query a few points or paths",
        {
            "point_id": "point id",
            **_ENTRY_COLUMNS,
        },
    ),
    "file_changes": (
        "entries each point's catalog added, modified or removed against its parent's",
        {
            "point_id": "point id",
            "source": "source name",
            "time": "the point's time",
            "forgotten": "the point was forgotten (its catalog is kept)",
            "change": "added, modified or removed (a removed entry shows what it was)",
            **_ENTRY_COLUMNS,
        },
    ),
}
