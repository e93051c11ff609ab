"""The S3 client of object-storage repositories (``catalog.store.s3``): one per process and
AWS settings, configured from the environment the way the AWS tools read it, with retries;
the API calls it made, by operation; a failed request as one line.

Owns the client's configuration and the reading of botocore's errors. Must not: name
repository files or read or write any (``catalog.store.s3`` does).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from catalog.errors import RepositoryError, UsageError

MAX_ATTEMPTS = 5  # per request, the first included (a wrong endpoint fails within ~15 s)
BODY_ATTEMPTS = 4  # per GET whose body is cut off while it streams
# botocore and urllib3 errors of a body that stopped streaming (by class name: each library
# names its own)
STREAM_ERRORS = frozenset(
    (
        "IncompleteReadError",
        "ResponseStreamingError",
        "ReadTimeoutError",
        "ProtocolError",
        "ConnectionClosedError",
    )
)


# The repository's top folders (FORMAT.md 3), by which the API calls are counted.
_FOLDERS = frozenset(
    ("packs", "parity", "index", "manifests", "points", "forgotten", "locks", "keys", "files")
    + ("gc", "overlays", "probe", "resume", "config.json")
)


class RequestCount:
    """The S3 API calls this process made, by operation (``python -m bench s3`` reads them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_operation: dict[str, int] = {}

    def __call__(self, model: Any = None, params: Any = None, **_kwargs: Any) -> None:
        name = getattr(model, "name", "?")
        if isinstance(params, dict):  # and the repository folder it is about
            where = str(params.get("Prefix") or params.get("Key") or "")
            folder = next((p for p in where.split("/") if p in _FOLDERS), "")
            if folder:
                name = f"{name} {folder}"
        with self._lock:
            self.by_operation[name] = self.by_operation.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_operation)


REQUESTS = RequestCount()
RATE_ENV = "COMB_S3_MAX_REQUESTS_PER_S"  # a budget for providers that throttle (per process)


class RequestBudget:
    """At most ``rate`` HTTP requests a second from this process (retries included): each
    request waits for its turn (evenly spaced, a burst of one second's worth allowed)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = rate
        self._at = time.monotonic()

    def __call__(self, **_kwargs: Any) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= 1
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


def _budget() -> RequestBudget | None:
    text = os.environ.get(RATE_ENV)
    if not text:
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0:
        raise UsageError(f"{RATE_ENV}={text}: give a number of requests a second above 0")
    return RequestBudget(rate)


def client_from_env() -> Any:
    """A thread-safe S3 client configured from the environment."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - a dependency
        raise RepositoryError("S3 repositories need boto3 (pip install boto3)") from None
    custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = MAX_ATTEMPTS
    config = Config(
        # Retries with backoff and jitter on 5xx, throttling (503 SlowDown) and dropped
        # connections: botocore's standard mode (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE override).
        retries=retries,
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
        s3={"addressing_style": "path"} if custom else None,
        # The bytes are checked by comb itself (every object is named by or holds BLAKE3
        # hashes); streaming checksums (aws-chunked) are what several S3 clones store corrupted.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client("s3", config=config)
    client.meta.events.register("before-parameter-build.s3", REQUESTS)
    budget = _budget()
    if budget is not None:
        client.meta.events.register("before-send.s3", budget)
    return client


_CLIENTS: dict[tuple[tuple[str, str], ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client() -> Any:
    """One client per process and AWS settings: making one costs 70-200 ms (botocore loads
    its service model), and a backup opens a storage per worker."""
    key = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == RATE_ENV)
    )
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = client_from_env()
        return _CLIENTS[key]


def error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def reason(err: BaseException) -> str:
    """One line for a failed request."""
    name = type(err).__name__
    if name == "NoCredentialsError":
        return "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return f"cannot reach the S3 endpoint ({err})"
    code = error_code(err)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access denied ({code})"
    if code in ("NoSuchBucket",):
        return "the bucket does not exist"
    message = (getattr(err, "response", None) or {}).get("Error", {}).get("Message")
    return f"{code}: {message}" if message else str(err).splitlines()[0]


def missing(err: BaseException) -> bool:
    return error_code(err) in ("404", "NoSuchKey", "NotFound")


def refused(err: BaseException) -> bool:
    """A conditional request's condition did not hold (412), lost a race with another
    conditional write (409), or named an object that is gone (404, for If-Match)."""
    return missing(err) or error_code(err) in (
        "PreconditionFailed",
        "412",
        "409",
        "ConditionalRequestConflict",
    )
