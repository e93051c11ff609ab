"""A vSphere VM disk read over HTTPS from its datastore, without VMware's VDDK.

``DatastoreDisk`` is plain picklable configuration (URL of the disk's flat file under the
server's ``/folder`` tree, the session cookie, TLS policy), usable wherever
``stages.sources.image.ImageSource`` is: each worker's ``open()`` makes its own connection pool and
reads the ranges it is given with HTTP ``Range`` requests, a large range as several parallel
requests. The bytes go straight into the reader's buffer (no copy, no temporary file).
"""

from __future__ import annotations

import http.client
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

from catalog.errors import SourceError

# Ranges are read in requests of at most PART_BYTES, ``connections`` at a time per worker.
PART_BYTES = 4 << 20
DEFAULT_CONNECTIONS = 4
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DatastoreDisk:
    url: str  # https://HOST[:PORT]/folder/PATH?dcPath=DC&dsName=DS of the disk's flat file
    cookie: str  # "vmware_soap_session=..." of a logged-in session
    size: int
    label: str  # for messages: 'disk 2000 "Hard disk 1" ([ds] vm/vm.vmdk)'
    verify: bool | str = True  # True: system CAs; False: --insecure; str: a CA bundle file
    connections: int = DEFAULT_CONNECTIONS

    def open(self) -> OpenDatastoreDisk:
        return OpenDatastoreDisk(self)

    def describe(self) -> str:
        return self.label


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """True: system CAs; False: no checks (--insecure); a path: that CA bundle."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    except (OSError, ssl.SSLError) as err:
        raise SourceError(f"cannot load CA file {verify}: {err}") from None


class OpenDatastoreDisk:
    def __init__(self, disk: DatastoreDisk) -> None:
        self.disk = disk
        self.size = disk.size
        parts = urlsplit(disk.url)
        if parts.scheme != "https" or not parts.hostname:
            raise SourceError(f"{disk.label}: not an https URL: {disk.url}")
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._pool = urllib3.HTTPSConnectionPool(
            parts.hostname,
            parts.port or 443,
            maxsize=disk.connections,
            block=True,
            ssl_context=tls_context(disk.verify),
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=urllib3.Retry(total=3, connect=3, read=0, status=0, backoff_factor=0.2),
        )
        self._threads: ThreadPoolExecutor | None = None

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        # What holds data is known from Changed Block Tracking, not from the file.
        return [(start, end - start)] if end > start else []

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.read_many([(buf, offset)])

    def read_many(self, parts: list[tuple[memoryview, int]]) -> None:
        """Fill each ``(buf, offset)``; the requests (large ones cut into ``PART_BYTES``) run
        ``connections`` at a time, so many small changed areas cost round trips in parallel."""
        gets = [
            (buf[c : c + PART_BYTES], offset + c)
            for buf, offset in parts
            for c in range(0, len(buf), PART_BYTES)
        ]
        if len(gets) == 1 or self.disk.connections < 2:
            for buf, offset in gets:
                self._get(buf, offset)
            return
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.disk.connections, "comb-datastore")
        futures = [self._threads.submit(self._get, buf, offset) for buf, offset in gets]
        for f in futures:
            f.result()

    def _fail(self, offset: int, why: str) -> SourceError:
        return SourceError(f"cannot read {self.disk.label} at offset {offset}: {why}")

    def _get(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf) - 1
        try:
            resp = self._pool.urlopen(
                "GET",
                self._target,
                headers={"Range": f"bytes={offset}-{end}", "Cookie": self.disk.cookie},
                preload_content=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as err:
            raise self._fail(offset, _reason(err)) from None
        ok = False
        done = 0
        try:
            if resp.status in (401, 403):
                raise self._fail(
                    offset, f"the datastore refused access (HTTP {resp.status}; session expired?)"
                )
            if resp.status == 416:
                raise self._fail(offset, "the disk file on the datastore is shorter than the disk")
            if resp.status != 206:
                raise self._fail(offset, f"HTTP {resp.status} {resp.reason or ''}".strip())
            got = resp.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {offset}-{end}/"):
                raise self._fail(offset, f"the server answered another range ({got or 'none'})")
            while done < len(buf):
                k = resp.readinto(buf[done:])
                if not k:
                    raise self._fail(offset + done, "the datastore ended the transfer early")
                done += k
            ok = True
        except urllib3.exceptions.ProtocolError as err:
            short = [a for a in err.args if isinstance(a, http.client.IncompleteRead)]
            if short:
                part = short[0].partial
                at = offset + done + (part if isinstance(part, int) else len(part))
                raise self._fail(at, "the datastore ended the transfer early") from None
            raise self._fail(offset + done, f"the connection broke: {_reason(err)}") from None
        except urllib3.exceptions.HTTPError as err:
            raise self._fail(offset + done, _reason(err)) from None
        finally:
            if not ok:  # unread body: the connection cannot serve another request
                resp.close()
            resp.release_conn()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        self._pool.close()


def _reason(err: Exception) -> str:
    inner = getattr(err, "reason", None)
    text = str(inner if inner is not None else err).strip().splitlines()
    return text[0] if text else type(err).__name__
