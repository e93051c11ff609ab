"""Encryption at rest (FORMAT.md section 21): keys, key files and the sealing of every object.

A repository made with ``init --encryption aes-256-gcm`` (the default) has a random 64-byte
master secret. Each password wraps it in one key file ``keys/<id>.json`` with a key derived by
Argon2id (memory-hard). Purpose keys are derived from the master with BLAKE3's key-derivation
mode, so no key serves two purposes:

- the chunk-id key: chunk ids are keyed BLAKE3, so stored ids reveal nothing about content;
- the blob key: every stored blob is AES-256-GCM sealed with its chunk id as associated data;
- the table key: a pack's entry table is sealed as one unit with the pack header as associated
  data;
- the document key: recovery point documents and overlay files are sealed envelopes;
- the Parquet key: index segments, leaves, roots and change tables use Parquet modular
  encryption (AES-GCM, uniform), which DuckDB reads when given the key.

Every failure to authenticate is reported as tampering or damage, never used.
"""

from __future__ import annotations

import base64
import functools
import getpass
import json
import secrets
import socket
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from catalog.errors import CorruptionError, PasswordError, RepositoryError, UsageError
from catalog.store.sealing import ChunkHasher
from catalog.store.storage import Storage, json_ids

ALGORITHM = "aes-256-gcm"
KDF_NAME = "argon2id"
KEYS_PREFIX = "keys"
KEY_FORMAT_NAME = "comb-key"
KEY_FORMAT_VERSION = 1
SEALED_FORMAT_NAME = "comb-sealed"
MASTER_BYTES = 64
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
# Argon2id cost of new key files: 64 MiB, 3 passes, 4 lanes (about 0.15 s on this hardware;
# RFC 9106's second recommended option). Stored per key file, so it can be raised later.
KDF_MEMORY_KIB = 64 * 1024
KDF_ITERATIONS = 3
KDF_LANES = 4
# What a reader accepts in a key file: bounded, so a planted key file cannot make every open
# allocate gigabytes or run for minutes before the real key is tried.
MAX_KDF_MEMORY_KIB = 1024 * 1024
WRAPPED_BYTES = NONCE_BYTES + MASTER_BYTES + TAG_BYTES
_CONTEXT = "comb 2026-11 repository {}"
PURPOSES = ("chunk id", "blob", "pack table", "document", "parquet", "overlay record")
# The key that seals another repository's chunk-id key in config.json (``init --copy-keys-from``,
# FORMAT.md 21.1); not one of the sealer's own keys.
SHARED_ID_PURPOSE = "shared chunk id"


_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")


@lru_cache(maxsize=64)
def _aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def _derive(master: bytes, purpose: str) -> bytes:
    return blake3.blake3(master, derive_key_context=_CONTEXT.format(purpose)).digest()


@dataclass(frozen=True)
class AesGcmSealer:
    """The sealer of an encrypted repository (``catalog.store.sealing.Sealer``): its unwrapped
    keys, and sealing with them (picklable: crosses to Ray workers)."""

    encrypted: ClassVar[bool] = True
    overhead: ClassVar[int] = SEAL_OVERHEAD_BYTES

    master: bytes
    id_key: bytes = field(repr=False, default=b"")
    blob_key: bytes = field(repr=False, default=b"")
    table_key: bytes = field(repr=False, default=b"")
    doc_key: bytes = field(repr=False, default=b"")
    parquet_key: bytes = field(repr=False, default=b"")
    record_key: bytes = field(repr=False, default=b"")
    # BLAKE3 keyed with id_key, made once (reads check every chunk's id through it).
    _hasher: ChunkHasher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hasher", functools.partial(blake3.blake3, key=self.id_key))

    @staticmethod
    def from_master(master: bytes) -> AesGcmSealer:
        keys = [_derive(master, p) for p in PURPOSES]
        return AesGcmSealer(master, *keys)

    def __repr__(self) -> str:  # never print key material
        return "AesGcmSealer(...)"

    def for_workers(self) -> AesGcmSealer:
        """The purpose keys without the master secret (what pipeline workers receive: they
        never wrap keys, and a worker's memory should not hold the secret every key opens)."""
        return replace(self, master=b"")

    # -- chunk ids --------------------------------------------------------------------------
    @property
    def chunk_hasher(self) -> ChunkHasher:
        """A callable data -> blake3 object, keyed with the chunk-id key."""
        return self._hasher

    # -- sealing ------------------------------------------------------------------------------
    def _seal(self, key: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        return nonce + _aead(key).encrypt(nonce, view, aad)

    def _open(self, key: bytes, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
        if len(sealed) < SEAL_OVERHEAD_BYTES:
            raise CorruptionError(f"{what} is too short to be sealed (damaged or tampered)")
        view = memoryview(sealed).cast("B")
        try:  # (views, not copies: a copy holds the GIL that decrypt releases)
            return _aead(key).decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CorruptionError(
                f"{what} fails authentication (tampered with or damaged)"
            ) from None

    def seal_blob(self, blob: bytes | memoryview, cid: bytes) -> bytes:
        return self._seal(self.blob_key, blob, cid)

    def seal_blob_into(self, blob: bytes | memoryview, cid: bytes, out: memoryview) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        out[:NONCE_BYTES] = nonce
        aead = _aead(self.blob_key)
        data = blob if isinstance(blob, bytes) else memoryview(blob).cast("B")
        if _ENCRYPT_INTO:  # (recent cryptography: no copy of the sealed blob)
            aead.encrypt_into(nonce, data, cid, out[NONCE_BYTES:])
        else:
            out[NONCE_BYTES:] = aead.encrypt(nonce, data, cid)

    def open_blob(self, sealed: bytes | memoryview, cid: bytes, where: str) -> bytes:
        return self._open(self.blob_key, sealed, cid, f"{where}: chunk {cid.hex()[:16]}")

    def seal_table(self, table: bytes, header: bytes) -> bytes:
        return self._seal(self.table_key, table, header)

    def open_table(self, sealed: bytes, header: bytes, where: str) -> bytes:
        return self._open(self.table_key, sealed, header, f"pack {where} entry table")

    def seal_record(self, payload: bytes | memoryview, head: bytes) -> bytes:
        """An overlay write record's payload, bound to its header (kind, offset, length)."""
        return self._seal(self.record_key, payload, head)

    def open_record(self, sealed: bytes | memoryview, head: bytes, where: str) -> bytes:
        return self._open(self.record_key, sealed, head, where)

    def seal_doc(self, raw: bytes, kind: str) -> bytes:
        """A JSON envelope around a sealed document; ``kind`` is bound as associated data."""
        sealed = self._seal(self.doc_key, raw, kind.encode())
        env = {"format": SEALED_FORMAT_NAME, "kind": kind, "data": _b64(sealed)}
        return (json.dumps(env, sort_keys=True) + "\n").encode()

    def open_doc(self, raw: bytes, kind: str, where: str) -> bytes:
        try:
            env = json.loads(raw)
            if not isinstance(env, dict) or env.get("format") != SEALED_FORMAT_NAME:
                raise ValueError("not sealed")
            sealed = base64.b64decode(env["data"], validate=True)
        except (ValueError, KeyError, TypeError):
            raise CorruptionError(
                f"{where} is not a sealed document (an encrypted repository seals every one)"
            ) from None
        return self._open(self.doc_key, sealed, kind.encode(), where)

    # -- Parquet and DuckDB -----------------------------------------------------------------
    def parquet_encryption(self) -> Any:
        import pyarrow.parquet.encryption as pe

        return pe.create_encryption_properties(self.parquet_key)

    def parquet_decryption(self) -> Any:
        import pyarrow.parquet.encryption as pe

        return pe.create_decryption_properties(self.parquet_key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _shared_id_aad(repo_id: str) -> bytes:
    return f"comb shared chunk id key of repository {repo_id}".encode()


def seal_shared_id_key(master: bytes, id_key: bytes, repo_id: str) -> str:
    """Another repository's chunk-id key, sealed with this one's master for config.json
    (``encryption.id_key``): the two then give the same data the same chunk ids."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    key = _derive(master, SHARED_ID_PURPOSE)
    return _b64(nonce + _aead(key).encrypt(nonce, id_key, _shared_id_aad(repo_id)))


def with_shared_id_key(sealer: AesGcmSealer, sealed: str, repo_id: str) -> AesGcmSealer:
    """``sealer`` with the chunk-id key that config.json holds sealed (``seal_shared_id_key``)
    in place of the one derived from its master."""
    where = f"config.json's shared chunk-id key of repository {repo_id}"
    raw = base64.b64decode(sealed, validate=True)
    opener = _derive(sealer.master, SHARED_ID_PURPOSE)
    key = sealer._open(opener, raw, _shared_id_aad(repo_id), where)
    if len(key) != 32:
        raise CorruptionError(f"{where} is not 32 bytes")
    return replace(sealer, id_key=key)


# -- key files --------------------------------------------------------------------------------


# Two Argon2id derivations at once in one process deadlock (cryptography 50 / OpenSSL 3,
# seen here with two threads opening a repository): derivations are serialised.
_kdf_lock = threading.RLock()


def _kek(password: str, kdf: dict[str, Any]) -> bytes:
    with _kdf_lock:
        return Argon2id(
            salt=base64.b64decode(kdf["salt"]),
            length=32,
            iterations=int(kdf["iterations"]),
            lanes=int(kdf["lanes"]),
            memory_cost=int(kdf["memory_kib"]),
        ).derive(password.encode())


def _key_aad(repo_id: str) -> bytes:
    return f"comb key for repository {repo_id}".encode()


def make_key_file(repo_id: str, master: bytes, password: str) -> bytes:
    kdf = {
        "name": KDF_NAME,
        "salt": _b64(secrets.token_bytes(16)),
        "memory_kib": KDF_MEMORY_KIB,
        "iterations": KDF_ITERATIONS,
        "lanes": KDF_LANES,
    }
    nonce = secrets.token_bytes(NONCE_BYTES)
    wrapped = nonce + AESGCM(_kek(password, kdf)).encrypt(nonce, master, _key_aad(repo_id))
    doc = {
        "format": KEY_FORMAT_NAME,
        "version": KEY_FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": _user(),
        "algorithm": ALGORITHM,
        "kdf": kdf,
        "wrapped": _b64(wrapped),
    }
    doc["check"] = key_check(doc)
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def key_check(doc: dict[str, Any]) -> str:
    """BLAKE3 of what opening a key file uses (FORMAT.md 21.2): a damaged key file is then told
    apart from a wrong password, which AES-GCM alone cannot do."""
    kdf = doc["kdf"]
    used = (kdf["name"], kdf["memory_kib"], kdf["iterations"], kdf["lanes"], kdf["salt"])
    return blake3.blake3("\n".join(map(str, (*used, doc["wrapped"]))).encode()).hexdigest()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def key_name(key_id: str) -> str:
    return f"{KEYS_PREFIX}/{key_id}.json"


def add_key(storage: Storage, repo_id: str, master: bytes, password: str) -> str:
    if not password:
        raise UsageError("an empty password is not allowed")
    key_id = secrets.token_hex(8)
    storage.write_atomic(key_name(key_id), make_key_file(repo_id, master, password))
    return key_id


def key_ids(storage: Storage) -> list[str]:
    return sorted(json_ids(storage, KEYS_PREFIX))


def read_key_doc(storage: Storage, key_id: str) -> dict[str, Any]:
    where = storage.local_path(key_name(key_id)) or key_name(key_id)
    try:
        doc = json.loads(storage.read(key_name(key_id)))
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT_NAME:
            raise ValueError("not a comb key file")
        if doc.get("version") != KEY_FORMAT_VERSION or doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"unknown key version or algorithm in {where}")
        kdf = doc["kdf"]
        if kdf.get("name") != KDF_NAME:
            raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
        if not 8 * 1024 <= int(kdf["memory_kib"]) <= MAX_KDF_MEMORY_KIB:
            raise ValueError("implausible Argon2id memory cost")
        if not 1 <= int(kdf["iterations"]) <= 10 or not 1 <= int(kdf["lanes"]) <= 16:
            raise ValueError("implausible Argon2id cost")
        if len(base64.b64decode(kdf["salt"], validate=True)) != 16:
            raise ValueError("the salt is not 16 bytes")
        if len(base64.b64decode(doc["wrapped"], validate=True)) != WRAPPED_BYTES:
            raise ValueError(f"the wrapped key is not {WRAPPED_BYTES} bytes")
        if "check" in doc and doc["check"] != key_check(doc):
            raise ValueError("damaged: its check does not match what it holds")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptionError(f"{where} is not a valid key file ({err})") from None
    return doc


_unlocked: dict[tuple[str, bytes], tuple[AesGcmSealer, str]] = {}
_unlock_lock = threading.Lock()


def unlock(
    storage: Storage, repo_id: str, password: str, location: str
) -> tuple[AesGcmSealer, str]:
    """The repository's keys and the id of the key file the password opens. Memoised per
    process (one Argon2id derivation per repository and password, not one per open)."""
    with _kdf_lock:  # a second thread opening the same repository waits, then finds the memo
        return _unlock(storage, repo_id, password, location)


def _unlock(
    storage: Storage, repo_id: str, password: str, location: str
) -> tuple[AesGcmSealer, str]:
    memo = (repo_id, blake3.blake3(password.encode()).digest())
    with _unlock_lock:
        if memo in _unlocked and _unlocked[memo][1] in key_ids(storage):
            return _unlocked[memo]
    ids = key_ids(storage)
    if not ids:
        raise RepositoryError(f"{location} is encrypted but has no key files (keys/ is empty)")
    damaged = []
    for key_id in ids:
        try:
            doc = read_key_doc(storage, key_id)
        except CorruptionError as err:
            damaged.append(err.message)
            continue
        wrapped = base64.b64decode(doc["wrapped"])
        try:
            master = AESGCM(_kek(password, doc["kdf"])).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _key_aad(repo_id)
            )
        except InvalidTag:
            continue
        except (ValueError, MemoryError) as err:  # parameters the KDF refuses: a bad key file
            damaged.append(f"key file {key_id} cannot be used ({err})")
            continue
        if len(master) != MASTER_BYTES:
            damaged.append(f"key {key_id} holds a master secret of the wrong size")
            continue
        found = (AesGcmSealer.from_master(master), key_id)
        with _unlock_lock:
            _unlocked[memo] = found
        return found
    if damaged and len(damaged) == len(ids):
        raise CorruptionError(damaged[0])
    skipped = f"; {len(damaged)} damaged key file(s) skipped: {damaged[0]}" if damaged else ""
    raise PasswordError(f"wrong password for {location} (no key file accepts it{skipped})")


def forget_unlocked() -> None:
    with _unlock_lock:
        _unlocked.clear()
