"""Opening and creating repositories; the entry point other packages use."""

from __future__ import annotations

import os

from .errors import RepositoryError, describe_os_error
from .format import CONFIG_NAME, DEFAULT_CHUNK_SIZE_BYTES, RepoConfig, parse_config
from .manifest import ManifestReader
from .parity import ParityGeometry
from .points import RecoveryPoint, load_points_tolerant, resolve
from .storage import TMP_DIR, LocalStorage, Storage

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


class Repository:
    """An opened repository: its storage and config."""

    def __init__(self, storage: Storage, config: RepoConfig, location: str) -> None:
        self.storage = storage
        self.config = config
        self.location = location
        self.damaged: list[str] = []

    @staticmethod
    def init(
        location: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES,
        zstd_level: int | None = None,
        parity: ParityGeometry | None = ParityGeometry(),
    ) -> Repository:
        """A new repository; ``parity`` None: no parity files (FORMAT.md 15)."""
        config = (
            RepoConfig.new(chunk_size, parity=parity)
            if zstd_level is None
            else RepoConfig.new(chunk_size, zstd_level, parity)
        )
        path = os.path.abspath(location)
        if os.path.exists(os.path.join(path, CONFIG_NAME)):
            raise RepositoryError(f"{path} already holds a comb repository")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise RepositoryError(f"{path} exists and is not an empty directory")
        try:
            for d in REPO_DIRS:
                os.makedirs(os.path.join(path, d), exist_ok=True)
        except OSError as err:
            raise RepositoryError(f"cannot create {path}: {describe_os_error(err)}") from None
        storage = LocalStorage(path)
        storage.write_atomic(CONFIG_NAME, config.to_json())
        return Repository(storage, config, path)

    @staticmethod
    def open(location: str) -> Repository:
        path = os.path.abspath(location)
        if not os.path.isdir(path):
            raise RepositoryError(
                f"repository {path} does not exist (run `comb -r {location} init`)"
            )
        storage = LocalStorage(path)
        if not storage.exists(CONFIG_NAME):
            raise RepositoryError(f"{path} is not a comb repository (no {CONFIG_NAME})")
        config = parse_config(storage.read(CONFIG_NAME), os.path.join(path, CONFIG_NAME))
        return Repository(storage, config, path)

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
        """By id, unique prefix or NAME@latest (NAME may be a relative path of the source)."""
        points = self.points()
        if spec.endswith("@latest"):
            name = spec[: -len("@latest")]
            if not any(p.source == name for p in points):
                absolute = os.path.abspath(name)
                if any(p.source == absolute for p in points):
                    spec = f"{absolute}@latest"
        return resolve(points, spec)

    def manifest(self, point: RecoveryPoint) -> ManifestReader:
        return ManifestReader(self.storage, point.root, point.leaves)
