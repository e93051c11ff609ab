"""Format constants and the repository config file. FORMAT.md is the spec these must match.

Every constant that appears in FORMAT.md's tables lives here; tests/catalog/test_format_spec.py
checks the two agree.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from catalog.errors import CorruptionError, RepositoryError, UsageError
from catalog.store.parity import ParityGeometry

REPO_FORMAT_NAME = "comb-repository"
REPO_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"

# Default chunk size: 64 KiB matches VMware CBT's granularity class, so 1,000 scattered 4 KiB
# writes store ~1,000 chunks, not ~1,000 MiB. Chosen by `python -m bench chunksize`
# (figures in bench/README.md).
DEFAULT_CHUNK_SIZE_BYTES = 64 * 1024
MIN_CHUNK_SIZE_BYTES = 4 * 1024
MAX_CHUNK_SIZE_BYTES = 4 * 1024 * 1024
# Chunks per manifest leaf: 16 x 64 KiB = 1 MiB of disk per leaf. An incremental rewrites only
# the leaves it touches (1,000 scattered changes -> ~1,000 x 16 rows), and the root has one row
# per non-empty MiB of disk. See FORMAT.md "Manifests".
DEFAULT_LEAF_CHUNKS = 16
# A leaf's slot is an int16 column.
MAX_LEAF_CHUNKS = 32768

HASH_NAME = "blake3-256"
CHUNK_ID_BYTES = 32

# Codecs of stored chunks (pack entry "codec" byte, index "codec" column).
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}
# zstd level of new repositories: 1 compresses real files (an OS disk's /usr, 64 KiB chunks)
# 1.45x faster than 3 and stores 3 % more (bench/README.md "Compression level"); a config
# without a level (none was ever written so) reads as 3, the level of the first version.
DEFAULT_ZSTD_LEVEL = 1
MISSING_ZSTD_LEVEL = 3

# Feature flags (ext4 style). A reader refuses a repository with an unknown "incompat" feature,
# opens one with an unknown "ro_compat" feature read-only, and ignores unknown "compat" ones.
KNOWN_INCOMPAT: frozenset[str] = frozenset({"encryption", "shared-ids"})  # FORMAT.md 21
# "shared-ids": the chunk-id key is another repository's, sealed in ``encryption.id_key``
# (``init --copy-keys-from``); a comb unaware of it would derive other ids (FORMAT.md 21.1).
SHARED_IDS_FEATURE = "shared-ids"
# "locks": writers take locks (FORMAT.md 13); "parity": every pack has a parity file (15).
KNOWN_RO_COMPAT: frozenset[str] = frozenset({"locks", "object-lock", "parity"})
PARITY_FEATURE = "parity"
# S3 Object Lock: locked objects get a retention date; a comb unaware of it would neither
# give one nor respect it when removing (FORMAT.md 4).
OBJECT_LOCK_FEATURE = "object-lock"
KNOWN_COMPAT: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Features:
    compat: tuple[str, ...] = ()
    ro_compat: tuple[str, ...] = ()
    incompat: tuple[str, ...] = ()


@dataclass(frozen=True)
class RepoConfig:
    """The contents of config.json."""

    id: str
    created: str
    chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES
    leaf_chunks: int = DEFAULT_LEAF_CHUNKS
    hash: str = HASH_NAME
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    features: Features = field(default_factory=Features)
    parity: ParityGeometry | None = None
    # None, or {"algorithm": "aes-256-gcm", "kdf": "argon2id"} (FORMAT.md 21).
    encryption: dict[str, str] | None = None
    # None, or {"days": N, "mode": "GOVERNANCE" | "COMPLIANCE"}: S3 Object Lock (FORMAT.md 4).
    object_lock: dict[str, Any] | None = None
    format: str = REPO_FORMAT_NAME
    version: int = REPO_FORMAT_VERSION

    @staticmethod
    def new(
        chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        parity: ParityGeometry | None = ParityGeometry(),
        encrypted: bool = False,
    ) -> RepoConfig:
        if not (MIN_CHUNK_SIZE_BYTES <= chunk_size <= MAX_CHUNK_SIZE_BYTES) or (
            chunk_size & (chunk_size - 1)
        ):
            raise UsageError(
                f"chunk size {chunk_size} must be a power of two between "
                f"{MIN_CHUNK_SIZE_BYTES} and {MAX_CHUNK_SIZE_BYTES} bytes"
            )
        if not 1 <= zstd_level <= 19:
            raise UsageError(f"zstd level {zstd_level} must be between 1 and 19")
        return RepoConfig(
            id=secrets.token_hex(16),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            chunk_size=chunk_size,
            zstd_level=zstd_level,
            features=Features(
                ro_compat=(PARITY_FEATURE,) if parity else (),
                incompat=("encryption",) if encrypted else (),
            ),
            parity=parity,
            encryption={"algorithm": "aes-256-gcm", "kdf": "argon2id"} if encrypted else None,
        )

    def to_json(self) -> bytes:
        doc = asdict(self)
        for name in ("encryption", "object_lock"):
            if doc[name] is None:
                del doc[name]  # repositories without them keep the version-1 config bytes
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def leaf_bytes(self) -> int:
        return self.chunk_size * self.leaf_chunks

    @property
    def read_only(self) -> bool:
        """True when the repository has a ro_compat feature this comb does not know: it may
        read the repository but must not write to it."""
        return bool(set(self.features.ro_compat) - KNOWN_RO_COMPAT)


def _object_lock(raw: object, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    days = raw.get("days") if isinstance(raw, dict) else None
    mode = raw.get("mode") if isinstance(raw, dict) else None
    if not isinstance(days, int) or days < 1 or mode not in ("GOVERNANCE", "COMPLIANCE"):
        raise RepositoryError(f"{where}: object_lock must be {{days >= 1, mode}}, not {raw!r}")
    return {"days": days, "mode": mode}


def parse_config(raw: bytes, where: str) -> RepoConfig:
    """Parse config.json, refusing unknown versions and unknown incompatible features."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise RepositoryError(f"{where} is not a comb repository config ({err})") from None
    if doc.get("format") != REPO_FORMAT_NAME:
        raise RepositoryError(f"{where} is not a comb repository config")
    version = doc.get("version")
    if version != REPO_FORMAT_VERSION:
        raise RepositoryError(
            f"{where}: unknown repository format version {version!r} "
            f"(this comb reads version {REPO_FORMAT_VERSION})"
        )
    feats = doc.get("features") or {}
    unknown = sorted(set(feats.get("incompat", ())) - KNOWN_INCOMPAT)
    if unknown:
        raise RepositoryError(
            f"{where}: repository needs features this comb does not have: {', '.join(unknown)}"
        )
    try:
        config = RepoConfig(
            id=str(doc["id"]),
            created=str(doc["created"]),
            chunk_size=int(doc["chunk_size"]),
            leaf_chunks=int(doc["leaf_chunks"]),
            hash=str(doc["hash"]),
            zstd_level=int(doc.get("zstd_level", MISSING_ZSTD_LEVEL)),
            features=Features(
                compat=tuple(feats.get("compat", ())),
                ro_compat=tuple(feats.get("ro_compat", ())),
                incompat=tuple(feats.get("incompat", ())),
            ),
            encryption=_encryption(doc.get("encryption"), feats, where),
            object_lock=_object_lock(doc.get("object_lock"), where),
        )
        raw_parity = doc.get("parity")
        if raw_parity is not None:
            config = replace(
                config,
                parity=ParityGeometry(
                    int(raw_parity["data_shards"]),
                    int(raw_parity["parity_shards"]),
                    int(raw_parity["shard_bytes"]),
                ),
            )
    except (KeyError, TypeError, ValueError) as err:
        raise RepositoryError(f"{where}: missing or invalid field {err}") from None
    if PARITY_FEATURE not in config.features.ro_compat:
        config = replace(config, parity=None)  # the flag decides; a stray field means nothing
    elif config.parity is None:
        raise RepositoryError(f"{where}: the parity feature is on but the parity field is missing")
    if config.parity is not None:
        try:
            config.parity.check(where)
        except CorruptionError as err:
            raise RepositoryError(err.message) from None
    c = config.chunk_size
    if not (MIN_CHUNK_SIZE_BYTES <= c <= MAX_CHUNK_SIZE_BYTES) or c & (c - 1):
        raise RepositoryError(f"{where}: invalid chunk size {c}")
    if not (1 <= config.leaf_chunks <= MAX_LEAF_CHUNKS):
        raise RepositoryError(f"{where}: invalid leaf_chunks {config.leaf_chunks}")
    if config.hash != HASH_NAME:
        raise RepositoryError(f"{where}: unknown chunk hash {config.hash!r}")
    return config


def _encryption(value: object, feats: dict, where: str) -> dict[str, str] | None:  # type: ignore[type-arg]
    """The config's encryption object, consistent with the ``encryption`` and ``shared-ids``
    feature flags."""
    flagged = "encryption" in feats.get("incompat", ())
    shared = SHARED_IDS_FEATURE in feats.get("incompat", ())
    if value is None and not flagged and not shared:
        return None
    if not flagged or not isinstance(value, dict):
        raise RepositoryError(
            f"{where}: the encryption field and the encryption feature flag disagree"
        )
    if value.get("algorithm") != "aes-256-gcm" or value.get("kdf") != "argon2id":
        raise RepositoryError(f"{where}: unknown encryption {value!r}")
    out = {"algorithm": "aes-256-gcm", "kdf": "argon2id"}
    id_key = value.get("id_key")
    if shared != (id_key is not None):
        raise RepositoryError(
            f"{where}: the encryption's id_key and the shared-ids feature flag disagree"
        )
    if id_key is not None:
        try:
            ok = len(base64.b64decode(str(id_key), validate=True)) == 32 + 28
        except ValueError:
            ok = False
        if not ok:
            raise RepositoryError(f"{where}: encryption.id_key is not a sealed 32-byte key")
        out["id_key"] = str(id_key)
    return out
