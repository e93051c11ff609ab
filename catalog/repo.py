"""Opening and creating repositories; the entry point other packages use.

Owns the facade: a repository's storage, config, sealer and points, and the readers of its
manifests and points (``reader``: a point as a block source, ``catalog.read.point``). Must not:
know a file layout itself (``catalog.store`` does), or print anything.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace

from catalog.errors import CorruptionError, PointNotFound, RepositoryError, UsageError
from catalog.read import point as read_point
from catalog.store import crypto, s3_lock
from catalog.store.format import (
    CONFIG_NAME,
    DEFAULT_CHUNK_SIZE_BYTES,
    DEFAULT_ZSTD_LEVEL,
    OBJECT_LOCK_FEATURE,
    SHARED_IDS_FEATURE,
    RepoConfig,
    parse_config,
)
from catalog.store.locations import canonical, existing_storage, new_storage
from catalog.store.manifest import ManifestReader
from catalog.store.parity import ParityGeometry
from catalog.store.points import POINTS_PREFIX, RecoveryPoint, load_points_tolerant, resolve
from catalog.store.s3 import is_s3
from catalog.store.sealing import Sealer
from catalog.store.storage import TMP_DIR, Storage

REPO_DIRS = (
    "packs",
    "parity",
    "index",
    "manifests/leaves",
    "manifests/roots",
    "points",
    "locks",
    TMP_DIR,
)
ENCRYPTIONS = (crypto.ALGORITHM, "none")

# Where an encrypted repository's password comes from when the caller does not hold it yet:
# (location, confirm) -> password, called only when the repository is encrypted (``confirm``:
# a new repository's, which a terminal asks twice). The application supplies it (the command
# line: its options, environment and terminal, ``pipeline.cli.passwords``); this layer never
# reads the environment or prompts.
PasswordSource = Callable[[str, bool], str]


class Repository:
    """An opened repository: its storage and config."""

    def __init__(
        self, storage: Storage, config: RepoConfig, location: str, key_id: str | None = None
    ) -> None:
        self.storage = storage
        self.config = config
        self.location = location
        self.damaged: list[str] = []
        self.key_id = key_id  # the key file the password opened (encrypted repositories)

    @property
    def sealer(self) -> Sealer:
        """What seals and opens its objects (plain, or AES-256-GCM with its keys)."""
        return self.storage.sealer

    @staticmethod
    def init(
        location: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES,
        zstd_level: int | None = None,
        parity: ParityGeometry | None = ParityGeometry(),
        encryption: str = crypto.ALGORITHM,
        password: str | PasswordSource | None = None,
        object_lock: tuple[int, str] | None = None,
        ids_from: Repository | None = None,
    ) -> Repository:
        """A new repository; ``parity`` None: no parity files (FORMAT.md 20); encrypted unless
        ``encryption="none"``, with ``password`` (a string, or a source asked with
        confirm=True; an encrypted repository needs one); ``object_lock`` (days, mode): S3
        Object Lock on what cannot be rebuilt (``catalog.store.s3_lock``); ``ids_from``: a
        repository whose chunk ids the new one shares (its chunk size and chunk-id key,
        ``init --copy-keys-from``: the same data then has the same id in both)."""
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r} (use {' or '.join(ENCRYPTIONS)})")
        encrypted = encryption != "none"
        if ids_from is not None:
            _check_ids_from(ids_from, chunk_size, encrypted)
        config = RepoConfig.new(
            chunk_size,
            DEFAULT_ZSTD_LEVEL if zstd_level is None else zstd_level,
            parity,
            encrypted=encrypted,
        )
        if object_lock is not None:
            days, mode = object_lock
            if days < 1 or mode not in s3_lock.MODES:
                raise UsageError(f"Object Lock needs DAYS >= 1 and a mode of {s3_lock.MODES}")
            if not is_s3(location):
                raise UsageError(f"{location}: Object Lock needs an s3:// repository")
            feats = config.features
            config = replace(
                config,
                object_lock={"days": days, "mode": mode},
                features=replace(
                    feats, ro_compat=tuple(sorted({*feats.ro_compat, OBJECT_LOCK_FEATURE}))
                ),
            )
        path = canonical(location)
        storage = new_storage(path, CONFIG_NAME)  # refuses a repository or other files
        if object_lock is not None:
            s3_lock.check_bucket(storage)
        secret = _password(location, password, confirm=True) if encrypted else None
        storage.make_root(REPO_DIRS + ((crypto.KEYS_PREFIX,) if encrypted else ()))
        key_id = None
        if secret is not None:
            master = secrets.token_bytes(crypto.MASTER_BYTES)
            # The key file first: a config that says "encrypted" always has a key.
            key_id = crypto.add_key(storage, config.id, master, secret)
            storage.sealer = crypto.AesGcmSealer.from_master(master)
            if ids_from is not None:
                config = _sharing_ids(config, master, ids_from)
                storage.sealer = _shared_sealer(storage.sealer, config)
        storage.write_atomic(CONFIG_NAME, config.to_json())
        if object_lock is not None:  # (written before the config said so: locked now)
            s3_lock.extend(storage, [CONFIG_NAME, *storage.list(crypto.KEYS_PREFIX)])
        return Repository(storage, config, path, key_id)

    @staticmethod
    def open(
        location: str,
        password: str | PasswordSource | None = None,
        sealer: Sealer | None = None,
    ) -> Repository:
        """``password``: a string, or a source asked only when the repository is encrypted;
        ``sealer``: one already unwrapped (a worker of a job whose driver opened the repository:
        no password, no second Argon2id derivation)."""
        path = canonical(location)
        storage = existing_storage(location)
        if not storage.exists(CONFIG_NAME):
            raise RepositoryError(f"{path} is not a comb repository (no {CONFIG_NAME})")
        config = parse_config(storage.read(CONFIG_NAME), f"{path}/{CONFIG_NAME}")
        key_id = None
        if config.encrypted and sealer is not None and sealer.encrypted:
            storage.sealer = sealer
        elif config.encrypted:
            secret = _password(location, password, confirm=False)
            own, key_id = crypto.unlock(storage, config.id, secret, path)
            storage.sealer = _shared_sealer(own, config)
        else:
            trace = _sealed_trace(storage)
            if trace:
                raise RepositoryError(
                    f"{path}: config.json says the repository is not encrypted, but it has "
                    f"{trace} (config.json was tampered with or replaced)"
                )
        return Repository(storage, config, path, key_id)

    def require_writable(self) -> None:
        if self.config.read_only:
            unknown = ", ".join(self.config.features.ro_compat)
            raise RepositoryError(
                f"{self.location} can only be read by this comb (it uses features: {unknown})"
            )

    def points(self) -> list[RecoveryPoint]:
        """Readable committed points; damaged documents are skipped and kept in ``damaged``."""
        points, self.damaged = load_points_tolerant(self.storage)
        return points

    def resolve(self, spec: str) -> RecoveryPoint:
        """A point spec (``catalog.store.points.resolve``) among the readable points; a spec
        that names a point whose document is damaged says so (not "no recovery point")."""
        points = self.points()
        try:
            return resolve(points, spec)
        except PointNotFound:
            wanted = spec.rsplit("@", 1)[-1].lower()
            readable = {p.id for p in points}
            for name in self.storage.list(POINTS_PREFIX) if self.damaged else []:
                pid = name.rsplit("/", 1)[-1].removesuffix(".json")
                if pid not in readable and wanted and pid.startswith(wanted):
                    why = next((d for d in self.damaged if f"{pid}.json" in d), "")
                    raise CorruptionError(
                        f"the document of recovery point {pid} is damaged"
                        + (f": {why}" if why else "")
                    ) from None
            raise

    def shares_chunk_ids(self, other: Repository) -> bool:
        """Whether the same data has the same chunk id here and in ``other``: one chunk size
        and one chunk-id key (both plain, or one made with ``init --copy-keys-from`` the
        other)."""
        if self.config.chunk_size != other.config.chunk_size:
            return False
        if not self.sealer.encrypted and not other.sealer.encrypted:
            return True
        mine, theirs = _id_key(self.sealer), _id_key(other.sealer)
        return mine is not None and theirs is not None and secrets.compare_digest(mine, theirs)

    def manifest(self, point: RecoveryPoint) -> ManifestReader:
        return ManifestReader(self.storage, point.root, point.leaves)

    def reader(
        self, point: RecoveryPoint, cache_chunks: int = read_point.DEFAULT_CACHE_CHUNKS
    ) -> read_point.PointSource:
        """``point`` as a block source (size, extents, reads; ``catalog.read.source``): opening
        reads only its root; ``cache_chunks``: decoded chunks kept for neighbouring reads."""
        return read_point.PointSource(self.storage, point, cache_chunks)


def _id_key(sealer: Sealer) -> bytes | None:
    return sealer.id_key if isinstance(sealer, crypto.AesGcmSealer) else None


def _check_ids_from(src: Repository, chunk_size: int, encrypted: bool) -> None:
    """Refuse what cannot share ``src``'s chunk ids, before anything is written."""
    if chunk_size != src.config.chunk_size:
        raise UsageError(
            f"chunk size {chunk_size} differs from {src.location}'s "
            f"({src.config.chunk_size}): chunk ids are shared only with one chunk size"
        )
    if encrypted != src.sealer.encrypted:
        has = "is encrypted" if src.sealer.encrypted else "is not encrypted"
        raise UsageError(
            f"{src.location} {has}: a repository shares chunk ids only with one encrypted "
            "alike (two plain repositories of one chunk size share them already)"
        )


def _sharing_ids(config: RepoConfig, master: bytes, src: Repository) -> RepoConfig:
    """The new config holding ``src``'s chunk-id key, sealed (FORMAT.md 21.1)."""
    key = _id_key(src.sealer)
    assert key is not None and config.encryption is not None
    sealed = crypto.seal_shared_id_key(master, key, config.id)
    feats = config.features
    return replace(
        config,
        encryption={**config.encryption, "id_key": sealed},
        features=replace(feats, incompat=tuple(sorted({*feats.incompat, SHARED_IDS_FEATURE}))),
    )


def _shared_sealer(sealer: crypto.AesGcmSealer, config: RepoConfig) -> crypto.AesGcmSealer:
    """``sealer`` with the chunk-id key config.json shares, if it holds one."""
    sealed = (config.encryption or {}).get("id_key")
    return sealer if sealed is None else crypto.with_shared_id_key(sealer, sealed, config.id)


def _password(location: str, password: str | PasswordSource | None, confirm: bool) -> str:
    """The password of the encrypted repository at ``location``: ``password`` itself, or what
    the source answers; none at all, or an empty one, is a usage error."""
    if password is None:
        raise UsageError(f"{location} needs a password (none given)")
    secret = password if isinstance(password, str) else password(location, confirm)
    if not secret:
        raise UsageError("an empty password is not allowed")
    return secret


def _sealed_trace(storage: Storage) -> str:
    """What shows that a repository whose config says "plain" was encrypted: key files, a
    sealed point document, an encrypted index segment, or a sealed pack (one of each is looked
    at: a few small reads). Otherwise replacing config.json (and deleting keys/) would make comb
    read sealed data as plain, or write plain data next to it."""
    if crypto.key_ids(storage):
        return "key files"
    points = sorted(n for n in storage.list("points") if n.endswith(".json"))
    if points and b'"comb-sealed"' in storage.read(points[0]):
        return "sealed point documents"
    segments = sorted(n for n in storage.list("index") if n.endswith(".parquet"))
    if segments and storage.read(segments[0], 0, 4) == b"PARE":
        return "encrypted index segments"
    try:
        for fan in storage.list_dirs("packs"):
            packs = [n for n in storage.list(fan) if n.endswith(".pack")]
            if packs:
                header = storage.read(packs[0], 0, 16)
                if len(header) == 16 and int.from_bytes(header[10:12], "little") & 1:
                    return "sealed packs"
                break
    except RepositoryError:
        pass
    return ""
