"""Where a repository is: a local directory or ``s3://BUCKET/PREFIX``, and its storage.

Owns the one choice between the storages by location. Must not: read or write anything itself
(each storage checks its own place).
"""

from __future__ import annotations

import os
import re

from catalog.errors import UsageError
from catalog.store.local import LocalStorage
from catalog.store.s3 import S3Storage, is_s3
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import Storage

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def canonical(location: str) -> str:
    """The location as comb names it: an absolute path, or the S3 URL as given. Any other
    URL is refused (it would otherwise be taken for a relative path)."""
    if is_s3(location):
        return location
    if _URL.match(location):
        scheme = location.split(":", 1)[0]
        raise UsageError(
            f"{location}: unknown repository location {scheme}:// (use a path or s3://)"
        )
    return os.path.abspath(location)


def new_storage(location: str, marker: str) -> LocalStorage | S3Storage:
    """For a repository to create (refuses a place that holds one, or anything else)."""
    if is_s3(location):
        return S3Storage.new(location, marker)
    canonical(location)  # (refuses another URL)
    return LocalStorage.new(location, marker)


def existing_storage(location: str) -> Storage:
    """For the repository at ``location`` (its config is not read here)."""
    if is_s3(location):
        return S3Storage.existing(location)
    canonical(location)  # (refuses another URL)
    return LocalStorage.existing(location)


def storage_at(location: str, sealer: Sealer = PLAIN) -> Storage:
    """A worker's storage of a repository its job has opened already (no checks)."""
    if is_s3(location):
        return S3Storage.at(location, sealer)
    return LocalStorage(location, sealer=sealer)
