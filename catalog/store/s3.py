"""Object storage (``catalog.store.storage.Storage``): a repository under ``s3://BUCKET/PREFIX``
on Amazon S3 or an S3-compatible server.

Every repository file is one object, ``PREFIX/<name>``. A new file is spooled (in memory up to
``SPOOL_BYTES``, then in a temporary file) and uploaded by one PUT at ``commit``: an object
appears whole or not at all, so the commit needs no rename. There are no directories: ``sync``
and ``remove_dir`` have nothing to do, and nothing is ever in ``tmp/``.

The endpoint, region and credentials come the way the AWS tools take them (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``...); with an endpoint set (an
S3-compatible server) requests use path-style addresses. Before its first write a storage probes
the server (``probe``): a create-if-absent that must be refused the second time, and the bytes
read back whole and by range. A server that fails is refused: several S3 clones silently
overwrite instead (the lock-free commits planned for object storage need the precondition), and
some ignore ranges (every chunk read is one). A body cut off while it streams is fetched again
(botocore retries requests, not bodies).

Owns every request to the object store. Must not: know what a file holds (the other
``catalog.store`` modules do). Files written in place (an overlay's log and lock) are
``catalog.store.s3_inplace``'s.
"""

from __future__ import annotations

import builtins
import os
import random
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any

from catalog.errors import RepositoryError
from catalog.store import s3_copies, s3_inplace, s3_lease, s3_lock
from catalog.store.inplace import FileLock, LogFile
from catalog.store.s3_client import (
    BODY_ATTEMPTS,
    STREAM_ERRORS,
    error_code,
    missing,
    reason,
    refused,
    shared_client,
)
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import NewFile

SCHEME = "s3://"
SPOOL_BYTES = 16 << 20  # a new file's bytes kept in memory before they go to a temporary file
MAX_PUT_BYTES = 5 << 30  # S3's limit for one PUT
LIST_PAGE = 1000  # keys per LIST request (S3's most)
PROBE_PREFIX = "probe"  # where the capability probe writes (and removes) its object
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3(location: str) -> bool:
    return location[: len(SCHEME)].lower() == SCHEME


def parse_location(location: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at its ends)."""
    rest = location[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise RepositoryError(f"{location}: not a valid S3 bucket name {bucket!r}")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts):
        raise RepositoryError(f"{location}: the prefix must not hold empty, '.' or '..' parts")
    return bucket, prefix


# (endpoint, bucket, prefix) already probed by this process: a backup's workers share a process
# with their driver on the local engine, and each probe costs five requests.
_PROBED: set[tuple[str, str, str]] = set()
_PROBED_LOCK = threading.Lock()


class _S3NewFile:
    """A new object: spooled, then uploaded whole by ``commit``."""

    def __init__(self, storage: S3Storage) -> None:
        self._storage = storage
        self._spool: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        if self._spool is None:
            raise RepositoryError("write to a file already committed or aborted")
        try:
            self._spool.write(data)
        except OSError as err:
            self.abort()
            raise RepositoryError(f"cannot spool a new object: {err.strerror or err}") from None
        self._pos += len(data)
        return len(data)

    def write_many(self, parts: list[bytes | memoryview]) -> int:
        return sum(self.write(p) for p in parts)

    def tell(self) -> int:
        return self._pos

    def commit(self, name: str, durable: bool = True) -> None:
        """Upload it as ``name`` (an existing object of that name is replaced, as a rename
        replaces a file; an S3 PUT is durable when it returns)."""
        spool, self._spool = self._spool, None
        if spool is None:
            raise RepositoryError(f"cannot commit {name}: already committed or aborted")
        try:
            if self._pos > MAX_PUT_BYTES:
                raise RepositoryError(f"cannot commit {name}: {self._pos} bytes is over 5 GiB")
            spool.seek(0)
            self._storage.put(name, spool, self._pos)
        finally:
            spool.close()

    def abort(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()


class S3Storage:
    """A repository under one prefix of one bucket."""

    def __init__(self, bucket: str, prefix: str, sealer: Sealer = PLAIN) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.sealer = sealer
        with self._failing("reach", self.location):
            self.client = shared_client()

    @classmethod
    def at(cls, location: str, sealer: Sealer = PLAIN) -> S3Storage:
        bucket, prefix = parse_location(location)
        return cls(bucket, prefix, sealer)

    @classmethod
    def new(cls, location: str, marker: str) -> S3Storage:
        """For a repository to create at ``location``: an existing bucket, and nothing under
        the prefix (``marker`` there: a repository already)."""
        storage = cls.at(location)
        storage._check_bucket()
        if storage.exists(marker):
            raise RepositoryError(f"{storage.location} already holds a comb repository")
        with storage._failing("list", storage.location):
            found = storage.client.list_objects_v2(
                Bucket=storage.bucket, Prefix=storage._dir_key(""), MaxKeys=100
            )
        probes = storage._dir_key(PROBE_PREFIX)  # (a probe killed before its cleanup)
        if any(not o["Key"].startswith(probes) for o in found.get("Contents", ())):
            raise RepositoryError(f"{storage.location} is not empty")
        storage.probe()
        return storage

    @classmethod
    def existing(cls, location: str) -> S3Storage:
        """For the repository at ``location`` (its config is not read here)."""
        storage = cls.at(location)
        storage._check_bucket()
        return storage

    def _check_bucket(self) -> None:
        with self._failing("reach", self.location):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as err:
                if missing(err) or error_code(err) == "NoSuchBucket":
                    raise RepositoryError(
                        f"cannot reach {self.location}: the bucket does not exist"
                    ) from None
                if error_code(err) in ("403", "AccessDenied"):
                    return  # credentials for a prefix only: its own requests will tell
                raise

    def make_root(self, prefixes: object) -> None:
        """Nothing to make: an object store has no directories."""

    @property
    def location(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, name: str) -> str:
        if not name or name.startswith("/") or any(p in ("", "..") for p in name.split("/")):
            raise RepositoryError(f"invalid repository object name {name!r}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def _dir_key(self, prefix: str) -> str:
        """The key prefix of everything under the repository prefix ``prefix``."""
        if prefix:
            return self.key(prefix.strip("/")) + "/"
        return f"{self.prefix}/" if self.prefix else ""

    def where(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(name)}"

    @contextmanager
    def _failing(self, verb: str, what: str) -> Iterator[None]:
        """A failed request becomes RepositoryError("cannot VERB WHAT: reason")."""
        try:
            yield
        except RepositoryError:
            raise
        except Exception as err:  # botocore's errors share no useful base class
            if type(err).__module__.split(".")[0] not in ("botocore", "boto3", "urllib3"):
                raise
            raise RepositoryError(f"cannot {verb} {what}: {reason(err)}") from None

    # -- reading ---------------------------------------------------------------------------

    def _head(self, name: str) -> dict[str, Any] | None:
        with self._failing("stat", self.where(name)):
            try:
                head: dict[str, Any] = self.client.head_object(
                    Bucket=self.bucket, Key=self.key(name)
                )
            except Exception as err:
                if missing(err):
                    return None
                raise
        return head

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise RepositoryError(f"cannot stat {self.where(name)}: no such object")
        return int(head["ContentLength"])

    def mtime(self, name: str) -> float | None:
        head = self._head(name)
        return None if head is None else float(head["LastModified"].timestamp())

    def age(self, name: str) -> float | None:
        head = self._head(name)
        return None if head is None else self.head_age(head, name)

    def head_age(self, head: dict[str, Any], name: str) -> float:
        """By the server's clock: the ``Date`` of the HEAD's response minus ``Last-Modified``."""
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            raise RepositoryError(f"{self.where(name)}: the server sends no Date header")
        return parsedate_to_datetime(date).timestamp() - head["LastModified"].timestamp()

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        if length == 0:
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name)}
        if length > 0:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            args["Range"] = f"bytes={offset}-"
        for attempt in range(1, BODY_ATTEMPTS + 1):
            with self._failing("read", self.where(name)):
                try:
                    response = self.client.get_object(**args)
                    data: bytes = response["Body"].read()
                except Exception as err:
                    if error_code(err) in ("InvalidRange", "416"):
                        return b""  # from or past its end, as a pread there
                    if missing(err):
                        raise RepositoryError(
                            f"cannot read {self.where(name)}: no such object"
                        ) from None
                    # (botocore retries a request, not a body cut off while it streams)
                    if attempt < BODY_ATTEMPTS and type(err).__name__ in STREAM_ERRORS:
                        time.sleep(random.uniform(0, 0.2 * 2**attempt))
                        continue
                    raise
            if "Range" in args and "ContentRange" not in response:
                raise RepositoryError(
                    f"cannot read {self.where(name)}: the S3 server ignored the byte range "
                    "asked for (comb needs ranged reads)"
                )
            if length > 0 and len(data) > length:
                raise RepositoryError(
                    f"cannot read {self.where(name)}: {len(data)} bytes for a range of {length}"
                )
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def read_into(self, name: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at its end)."""
        data = self.read(name, offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def list(self, prefix: str) -> builtins.list[str]:  # noqa: A003
        """Every name under ``prefix`` (all of the repository for ""), sorted."""
        return self._listing(prefix, "Contents", "Key")

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        return self._listing(prefix, "CommonPrefixes", "Prefix", Delimiter="/")

    def _listing(self, prefix: str, part: str, field: str, **extra: str) -> builtins.list[str]:
        """The ``field`` of every ``part`` entry of the paged LIST under ``prefix``, as
        repository names (without the repository's own prefix or a final slash), sorted."""
        cut = len(self.prefix) + 1 if self.prefix else 0
        out: builtins.list[str] = []
        with self._failing("list", self.location + (f"/{prefix}" if prefix else "")):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=self._dir_key(prefix),
                PaginationConfig={"PageSize": LIST_PAGE},
                **extra,
            )
            for page in pages:
                out.extend(e[field][cut:].rstrip("/") for e in page.get(part, ()))
        return sorted(out)

    def local_path(self, name: str) -> str | None:
        return None

    def local_copies(self) -> str:
        """This repository's local copies (``catalog.store.s3_copies``)."""
        return s3_copies.copies_dir(self.location)

    def local_copy(self, name: str) -> str:
        """A download of ``name`` kept among the local copies (fetched unless kept already)."""
        path = os.path.join(self.local_copies(), *self.key(name).split("/"))
        if not s3_copies.fresh(path):  # (a missing object: ``read`` says so)
            s3_copies.keep(path, self.read(name), self.where(name))
        return path

    def tmp_files(self) -> builtins.list[str]:
        return []  # an upload not completed is no object

    # -- writing ---------------------------------------------------------------------------

    def create(self, bulk: bool = False) -> NewFile:
        self.probe()
        return _S3NewFile(self)

    def write_atomic(self, name: str, data: bytes) -> None:
        self.probe()
        self.put(name, data, len(data))

    def put(
        self, name: str, body: Any, size: int, if_absent: bool = False, if_match: str | None = None
    ) -> str | None:
        """One PUT, its ETag; ``if_absent``: only when no object has that name, ``if_match``:
        only over the object of that ETag (compare-and-swap). None: the condition failed."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name), "Body": body}
        args["ContentLength"] = size
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        args.update(s3_lock.put_args(self, name, body))  # (Object Lock: a retention date)
        with self._failing("write", self.where(name)):
            try:
                etag = self.client.put_object(**args).get("ETag")
            except Exception as err:
                if (if_absent or if_match is not None) and refused(err):
                    return None
                raise
        if not etag and (if_absent or if_match is not None):
            raise RepositoryError(f"{self.where(name)}: the S3 server returned no ETag")
        return str(etag or "")

    def remove(self, name: str) -> None:
        with self._failing("remove", self.where(name)):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def sync(self, prefix: str) -> None:
        """Nothing to do: a PUT or DELETE is durable when it returns."""

    def remove_dir(self, prefix: str) -> None:
        """Nothing to do: an object store has no directories."""

    def probe(self) -> None:
        """Refuse a server that ignores create-if-absent or does not return the bytes it was
        given (once per process and location, before its first write)."""
        where = (str(self.client.meta.endpoint_url), self.bucket, self.prefix)
        if where in _PROBED:
            return
        with _PROBED_LOCK:  # (one probe at a time in a process: probes are rare)
            if where in _PROBED:
                return
            name = f"{PROBE_PREFIX}/{secrets.token_hex(8)}"
            payload = secrets.token_bytes(64) + bytes(range(256))
            try:
                if self.put(name, payload, len(payload), if_absent=True) is None:
                    raise RepositoryError(f"{self.where(name)}: a new random name already taken")
                if self.put(name, b"x", 1, if_absent=True) is not None:
                    raise RepositoryError(
                        f"{self.location}: the S3 server ignores If-None-Match (a conditional "
                        "create overwrote an object); comb refuses it: concurrent writers "
                        "would overwrite each other's commits"
                    )
                if self.read(name) != payload or self.read(name, 100, 50) != payload[100:150]:
                    raise RepositoryError(
                        f"{self.location}: the S3 server returned other bytes than it was given"
                    )
            finally:
                self.remove(name)
            _PROBED.add(where)

    # -- files written in place (``catalog.store.s3_inplace``) --------------------------------

    logs_reopen = False  # every open for writing starts a new log

    def open_log(self, name: str, writable: bool = False) -> LogFile:
        return s3_inplace.open_log(self, name, writable)

    def create_log(self, name: str) -> LogFile:
        return s3_inplace.create_log(self, name)

    def file_lock(self, name: str) -> FileLock:
        return s3_lease.Lease(self, name)
