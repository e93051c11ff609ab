"""Every Arrow schema that crosses a stage boundary, in one place.

Heavy columns (``data``, ``blob``) are ``large_binary`` built zero-copy over read buffers; they
never leave the process that read them (stages that touch bulk bytes are fused in one worker).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.store.index import INDEX_SCHEMA

# Work item: chunk-aligned ranges of the source to read (driver -> reader).
EXTENTS = pa.schema([("offset", pa.int64()), ("length", pa.int64())])
# Reader -> chunker: one row per range read, data over the worker's read buffer.
RAW = pa.schema([("offset", pa.int64()), ("data", pa.large_binary())])
_CHUNK_FIELDS = [
    ("offset", pa.int64()),
    ("length", pa.int32()),
    ("chunk_id", pa.binary(32)),
    ("zero", pa.bool_()),
]
# Chunker -> deduplicator: fixed chunks with their ids (all-zero chunks are not hashed).
CHUNKS = pa.schema([*_CHUNK_FIELDS, ("data", pa.large_binary())])
# Deduplicator -> compressor: plus whether this worker must store the chunk.
DEDUPED = pa.schema([*_CHUNK_FIELDS, ("new", pa.bool_()), ("data", pa.large_binary())])
# Compressor -> writer: the stored form of new chunks (null blob where not new).
COMPRESSED = pa.schema(
    [*_CHUNK_FIELDS, ("new", pa.bool_()), ("codec", pa.int8()), ("blob", pa.large_binary())]
)
# Writer -> driver: manifest rows and statistics, no bulk bytes.
WRITTEN = pa.schema([*_CHUNK_FIELDS, ("new", pa.bool_()), ("stored_len", pa.int32())])
# Writer side output -> driver: index rows of packs sealed during this call.
INDEX_ROWS = INDEX_SCHEMA

MAIN_PORT = "out"
INDEX_PORT = "index"
