"""Undoing what was deleted or replaced since a time, in a bucket that keeps versions (``comb
repair undelete``): the recovery after someone holding the repository's credentials deleted or
overwrote its objects, which Object Lock keeps as older versions (FORMAT.md 3.1).

For every object of the repository changed since the time (by the server's ``LastModified``):
one whose every change since is a delete marker gets those markers removed, so the version it
had then is current again; one replaced since gets that version copied back on top (a new
version; the replacing one stays, noncurrent), then given the retention a repository with
Object Lock gives what it writes. What did not exist then, or was already deleted then, is left
as it is. Locks, prune records, probes and overlay leases are never touched (comb rewrites and
removes them). The config goes first, so what is copied back gets the config's retention.

S3 lists a key's versions newest first, and its delete markers newest first in a list of
their own, all timed to the whole second: two versions of one second are ordered by the
listing, but a version and a marker of the same second before TIME cannot be (the newer is
taken to be the version). A second run finds nothing more to do.

Owns reading a bucket's versions. Must not: judge what a file holds (``verify`` does that next).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from catalog.errors import RepositoryError
from catalog.store import s3_lock
from catalog.store.format import CONFIG_NAME
from catalog.store.s3_client import reason

if TYPE_CHECKING:
    from catalog.store.s3 import S3Storage

_NEVER = ("locks", "gc", "probe")  # comb's own coordination objects


class Entry(NamedTuple):
    time: datetime
    version: str
    marker: bool  # a delete marker, not a version
    latest: bool
    etag: str  # ("" for a marker)
    order: int  # S3 lists a key's versions (and its markers) newest first: ties of a second


@dataclass
class Undone:
    undeleted: list[str] = field(default_factory=list)  # their delete markers since removed
    reverted: list[str] = field(default_factory=list)  # their version then copied back on top
    left: list[str] = field(default_factory=list)  # changed since, but nothing to go back to


def _skipped(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top in _NEVER or (top == "overlays" and name.endswith("/lock"))


def _newest_first(e: Entry) -> tuple[datetime, int]:
    return (e.time, -e.order)


def _entries(s3: S3Storage) -> dict[str, list[Entry]]:
    """Every version and delete marker under the repository's prefix, by repository name
    (those ``_skipped`` left out: a lease has a version per heartbeat)."""
    cut = len(s3.prefix) + 1 if s3.prefix else 0
    out: dict[str, list[Entry]] = defaultdict(list)
    seen: Counter[tuple[str, bool]] = Counter()  # (name, marker) -> entries listed so far
    with s3._failing("list the versions of", s3.location):
        pages = s3.client.get_paginator("list_object_versions").paginate(
            Bucket=s3.bucket, Prefix=s3._dir_key("")
        )
        for page in pages:
            for kind, marker in (("Versions", False), ("DeleteMarkers", True)):
                for e in page.get(kind, ()):
                    name = e["Key"][cut:]
                    if _skipped(name):
                        continue
                    order = seen[(name, marker)]
                    seen[(name, marker)] += 1
                    entry = Entry(
                        e["LastModified"], e["VersionId"], marker, bool(e["IsLatest"]),
                        e.get("ETag", ""), order,
                    )  # fmt: skip
                    out[name].append(entry)
    return out


def versioned(s3: S3Storage) -> bool:
    try:
        status = s3.client.get_bucket_versioning(Bucket=s3.bucket).get("Status")
    except Exception as err:
        raise RepositoryError(
            f"cannot read the settings of bucket {s3.bucket}: {reason(err)}"
        ) from None
    return status in ("Enabled", "Suspended")


def undo_since(s3: S3Storage, since: datetime, dry_run: bool = False) -> Undone:
    """Bring back what was deleted or replaced at or after ``since`` (see the module)."""
    if not versioned(s3):
        raise RepositoryError(
            f"bucket {s3.bucket} keeps no versions (versioning was never on): what was deleted "
            "or replaced there is gone"
        )
    done = Undone()
    since = since.replace(microsecond=0)  # (S3 times objects to the second)
    found = _entries(s3)
    order = sorted(found, key=lambda n: (n != CONFIG_NAME, n))  # the config first
    for name in order:
        entries = sorted(found[name], key=_newest_first)  # (oldest first)
        later = [e for e in entries if e.time >= since]
        before = [e for e in entries if e.time < since]
        if not later:
            continue
        if not before or before[-1].marker:
            done.left.append(name)  # made since, or already deleted then
            continue
        then = before[-1]
        current = next(e for e in entries if e.latest)
        if not current.marker and current.etag == then.etag:
            continue  # the same bytes as then (brought back already, or rewritten unchanged)
        if all(e.marker for e in later):
            done.undeleted.append(name)
            if not dry_run:
                for e in later:
                    _call(
                        s3, "remove a delete marker of", name, "delete_object", VersionId=e.version
                    )
        elif name.startswith("overlays/"):
            done.left.append(name)  # a log's seal is never undone (FORMAT.md 19.5)
        else:
            done.reverted.append(name)
            if not dry_run:
                source = {"Bucket": s3.bucket, "Key": s3.key(name), "VersionId": then.version}
                _call(s3, "copy back", name, "copy_object", CopySource=source)
                lock = s3_lock.retention_args(s3, name)  # (a copy cannot carry it: no body)
                if lock:
                    retention = {
                        "Mode": lock["ObjectLockMode"],
                        "RetainUntilDate": lock["ObjectLockRetainUntilDate"],
                    }
                    _call(s3, "lock", name, "put_object_retention", Retention=retention)
    return done


def _call(s3: S3Storage, verb: str, name: str, method: str, **args: object) -> None:
    """One request about ``name``: the client's ``method``."""
    with s3._failing(verb, s3.where(name)):
        getattr(s3.client, method)(Bucket=s3.bucket, Key=s3.key(name), **args)
