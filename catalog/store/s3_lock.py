"""S3 Object Lock for a repository (``init --object-lock DAYS``, FORMAT.md 4 and 13): which
objects get a retention date when written, how long they have left, and extending it; and
whether the bucket keeps old versions of what comb removes (``versions_kept``).

Locked are the objects no tool can rebuild: packs, their parity, manifests (leaves, roots,
change tables), point documents, key files and the config (``locked``); without the keys and
the config an encrypted repository's packs could not be read. Index segments and file catalogs
are not: ``repair index`` and ``comb index`` rebuild them, and a prune rewrites segments. Locks
and condemnation records never are (comb removes them). A replaced config is a new version; a
removed key stays, hidden, until its date. Every writing
process learns the setting from the repository's config (read once per process and place), so
Ray workers lock what they write without being told.

Owns the retention of objects. Must not: decide what may be removed (``catalog.maint.prune``).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from catalog.errors import RepositoryError
from catalog.store.format import CONFIG_NAME, parse_config
from catalog.store.s3_client import error_code, reason
from catalog.store.storage import Storage

if TYPE_CHECKING:
    from catalog.store.s3 import S3Storage

LOCKED = ("packs", "parity", "manifests", "points", "forgotten", "keys", CONFIG_NAME)
MODES = ("GOVERNANCE", "COMPLIANCE")
_SETTINGS: dict[tuple[str, str], dict[str, Any] | None] = {}  # (bucket, prefix): the config's
_SETTINGS_LOCK = threading.Lock()


def _s3(storage: Storage) -> S3Storage | None:
    from catalog.store.s3 import S3Storage  # (s3 imports this module)

    return storage if isinstance(storage, S3Storage) else None


def settings(storage: S3Storage) -> dict[str, Any] | None:
    """The repository's ``object_lock`` ({"days", "mode"}) or None, from its config (read once
    per process and place; a place without one is no repository, and nothing is locked)."""
    where = (storage.bucket, storage.prefix)
    with _SETTINGS_LOCK:
        if where not in _SETTINGS:
            if not storage.exists(CONFIG_NAME):  # not a repository (yet): nothing to lock
                return None
            _SETTINGS[where] = parse_config(storage.read(CONFIG_NAME), CONFIG_NAME).object_lock
        return _SETTINGS[where]


def locked(name: str) -> bool:
    return name.split("/", 1)[0] in LOCKED


def put_args(storage: S3Storage, name: str, body: Any) -> dict[str, Any]:
    """The Object Lock arguments of a PUT of ``name`` (none for what is not locked). S3 wants
    a checksum with a retention date: Content-MD5, computed here over ``body`` (bytes, or a
    file read once and rewound), since a checksum botocore adds to a streamed body would be
    sent as a trailer, which several S3 servers store wrongly (``s3_client``)."""
    retention = retention_args(storage, name)
    if not retention:
        return {}
    digest = hashlib.md5(usedforsecurity=False)
    if isinstance(body, bytes | bytearray | memoryview):
        digest.update(body)
    else:
        start = body.tell()
        while block := body.read(1 << 20):
            digest.update(block)
        body.seek(start)
    return {**retention, "ContentMD5": base64.b64encode(digest.digest()).decode()}


def retention_args(storage: S3Storage, name: str) -> dict[str, Any]:
    """The retention a new object ``name`` gets (none for what is not locked)."""
    lock = settings(storage) if locked(name) else None
    if lock is None:
        return {}
    return {
        "ObjectLockMode": lock["mode"],
        "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=int(lock["days"])),
    }


def check_bucket(storage: Storage) -> None:
    """Refuse a bucket without Object Lock (it cannot be turned on for objects one by one)."""
    s3 = _s3(storage)
    if s3 is None:
        raise RepositoryError("Object Lock needs an s3:// repository")
    try:
        got = s3.client.get_object_lock_configuration(Bucket=s3.bucket)
        config = got.get("ObjectLockConfiguration", {})
        enabled = config.get("ObjectLockEnabled") == "Enabled"
        if enabled and config.get("Rule", {}).get("DefaultRetention"):
            raise RepositoryError(
                f"bucket {s3.bucket} has a default retention: it would lock what comb must "
                "replace or remove (locks, records); remove the rule (comb sets its own dates)"
            )
    except RepositoryError:
        raise
    except Exception as err:
        if error_code(err) not in ("ObjectLockConfigurationNotFoundError", "404"):
            raise RepositoryError(
                f"cannot read the Object Lock of {s3.bucket}: {reason(err)}"
            ) from None
        enabled = False
    if not enabled:
        raise RepositoryError(
            f"bucket {s3.bucket} has no Object Lock: create the bucket with Object Lock enabled "
            "(it cannot be enabled for a repository in a bucket without it)"
        )


def remaining(storage: Storage, name: str) -> float | None:
    """Seconds until ``name``'s retention ends, by the server's clock (0 or less: ended; minus
    infinity: a locked kind of object written without one); None when it is not a locked
    kind, the storage is not S3, or the object is gone."""
    s3 = _s3(storage)
    if s3 is None or not locked(name):
        return None
    head = s3._head(name)
    if head is None:
        return None
    if head.get("ObjectLockRetainUntilDate") is None:
        return float("-inf")
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        raise RepositoryError(f"{s3.where(name)}: the server sends no Date header")
    now = parsedate_to_datetime(date).timestamp()
    return float(head["ObjectLockRetainUntilDate"].timestamp()) - now


def first_period_left(storage: Storage, name: str) -> float | None:
    """Seconds until ``name`` is ``days`` old (server clock), if it is younger: a point may be
    forgotten only then, whatever later extensions keep its version protected for; None
    without Object Lock."""
    s3 = _s3(storage)
    lock = settings(s3) if s3 is not None else None
    age = storage.age(name) if lock is not None else None
    if lock is None or age is None:
        return None
    left = int(lock["days"]) * 86400.0 - age
    return left if left > 0 else None


def extend(storage: Storage, names: list[str]) -> int:
    """Give every locked object of ``names`` whose retention ends within half the repository's
    period a full period again (what live points use stays protected); how many."""
    s3 = _s3(storage)
    lock = settings(s3) if s3 is not None else None
    if s3 is None or lock is None:
        return 0
    period = int(lock["days"]) * 86400.0
    done = 0
    for name in names:
        left = remaining(s3, name)
        if left is None or left >= period / 2:
            continue
        until = datetime.now(UTC) + timedelta(seconds=period)
        retention = {"Mode": lock["mode"], "RetainUntilDate": until}
        try:
            s3.client.put_object_retention(Bucket=s3.bucket, Key=s3.key(name), Retention=retention)
        except Exception as err:
            raise RepositoryError(
                f"cannot extend the retention of {s3.where(name)}: {reason(err)}"
            ) from None
        done += 1
    return done


def versions_kept(storage: Storage) -> str | None:
    """Why what a prune removes would stay stored, or None: the bucket keeps old versions
    (versioning on, as Object Lock requires) and no lifecycle rule expires noncurrent ones."""
    s3 = _s3(storage)
    if s3 is None:
        return None
    try:
        if s3.client.get_bucket_versioning(Bucket=s3.bucket).get("Status") != "Enabled":
            return None
        try:
            rules = s3.client.get_bucket_lifecycle_configuration(Bucket=s3.bucket)["Rules"]
        except Exception as err:
            if error_code(err) != "NoSuchLifecycleConfiguration":
                raise
            rules = []
    except Exception as err:  # (no permission to look: say nothing rather than guess)
        if error_code(err) in ("AccessDenied", "403"):
            return None
        raise RepositoryError(
            f"cannot read the settings of bucket {s3.bucket}: {reason(err)}"
        ) from None
    for rule in rules:
        if rule.get("Status") == "Enabled" and rule.get("NoncurrentVersionExpiration"):
            return None
    return (
        f"bucket {s3.bucket} keeps every version of what prune removes (versioning is on and "
        "no lifecycle rule expires noncurrent versions): add one, or prune frees no storage"
    )
