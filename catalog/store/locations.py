"""Where a repository is: a local directory or ``s3://BUCKET/PREFIX``, and its storage.

Owns the one choice between the storages by location. Must not: read or write anything itself
(each storage checks its own place).
"""

from __future__ import annotations

import os

from catalog.store.local import LocalStorage
from catalog.store.s3 import S3Storage, is_s3
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import Storage


def canonical(location: str) -> str:
    """The location as comb names it: an absolute path, or the S3 URL as given."""
    return location if is_s3(location) else os.path.abspath(location)


def new_storage(location: str, marker: str) -> LocalStorage | S3Storage:
    """For a repository to create (refuses a place that holds one, or anything else)."""
    if is_s3(location):
        return S3Storage.new(location, marker)
    return LocalStorage.new(location, marker)


def existing_storage(location: str) -> Storage:
    """For the repository at ``location`` (its config is not read here)."""
    return S3Storage.existing(location) if is_s3(location) else LocalStorage.existing(location)


def storage_at(location: str, sealer: Sealer = PLAIN) -> Storage:
    """A worker's storage of a repository its job has opened already (no checks)."""
    if is_s3(location):
        return S3Storage.at(location, sealer)
    return LocalStorage(location, sealer=sealer)
