"""Encrypted Parquet read as FORMAT.md 2.3 describes it (importable as ``specparquet``): the
footer's Thrift structures decoded by hand, the file decrypted with the footer key through
pyarrow's Parquet modular encryption, so the spec tests check the layout, not comb's reader."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = data[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, pos


def _thrift_value(data: bytes, pos: int, typ: int) -> tuple[Any, int]:
    if typ in (1, 2):  # a bool field's value is its type
        return typ == 1, pos
    if typ == 3:
        return data[pos], pos + 1
    if typ in (4, 5, 6):
        zz, pos = _varint(data, pos)
        return (zz >> 1) ^ -(zz & 1), pos
    if typ == 7:
        return data[pos : pos + 8], pos + 8
    if typ == 8:
        n, pos = _varint(data, pos)
        return data[pos : pos + n], pos + n
    if typ in (9, 10):
        head = data[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(data, pos)
        items = []
        for _ in range(n):
            if elem in (1, 2):  # a bool element is one byte
                items.append(data[pos] == 1)
                pos += 1
            else:
                item, pos = _thrift_value(data, pos, elem)
                items.append(item)
        return items, pos
    if typ == 12:
        return _thrift_struct(data, pos)
    raise AssertionError(f"unexpected thrift type {typ}")


def _thrift_struct(data: bytes, pos: int) -> tuple[dict[int, Any], int]:
    """A Thrift compact-protocol struct: field id -> value (nested structs as dicts)."""
    out: dict[int, Any] = {}
    last = 0
    while True:
        byte = data[pos]
        pos += 1
        if byte == 0:
            return out, pos
        delta, typ = byte >> 4, byte & 0x0F
        if delta:
            fid = last + delta
        else:
            zz, pos = _varint(data, pos)
            fid = (zz >> 1) ^ -(zz & 1)
        last = fid
        out[fid], pos = _thrift_value(data, pos, typ)


def spec_parquet(stored: bytes, key: bytes, columns: list[str]) -> pa.Table:
    """Section 2.3: PARE at both ends, AES_GCM_V1 without AAD prefix and without key metadata,
    every column with the footer key; read with the parquet key given directly, page checksums
    verified."""
    assert stored[:4] == b"PARE" and stored[-4:] == b"PARE"
    footer_len = int.from_bytes(stored[-8:-4], "little")
    meta, pos = _thrift_struct(stored, len(stored) - 8 - footer_len)
    assert set(meta) == {1}, "FileCryptoMetaData holds no key_metadata (field 2)"
    assert set(meta[1]) == {1}, "encryption_algorithm is AES_GCM_V1 (field 1)"
    gcm = meta[1][1]
    assert 1 not in gcm, "no aad_prefix"
    assert len(gcm[2]) == 8, "an 8-byte aad_file_unique"
    assert gcm.get(3, False) is False, "supply_aad_prefix false"
    # The footer module: length, nonce, ciphertext, tag; its AAD is aad_file_unique and the
    # module type 0 (Parquet's rule). Every column chunk: ENCRYPTION_WITH_FOOTER_KEY (field 1).
    n = int.from_bytes(stored[pos : pos + 4], "little")
    footer = AESGCM(key).decrypt(
        stored[pos + 4 : pos + 16], stored[pos + 16 : pos + 4 + n], gcm[2] + b"\0"
    )
    file_meta, _end = _thrift_struct(footer, 0)
    for row_group in file_meta[4]:
        for chunk in row_group[1]:
            assert chunk[8] == {1: {}}, "the column is encrypted with the footer key"
    return pq.read_table(
        pa.BufferReader(stored),
        columns=columns,
        page_checksum_verification=True,
        decryption_properties=pe.create_decryption_properties(key),
    )
