"""A real S3 server for the tests: moto in server mode, its own process speaking HTTP on
loopback (it enforces If-None-Match, If-Match, versioning and Object Lock). In memory only, and
its ranged GETs read whole objects: behaviour is tested on it, never speed.

``S3Server.bucket()`` makes a new bucket; ``env()`` is what a comb process needs to reach it
(the standard AWS variables). ``HeaderStripper`` is a fault: an HTTP proxy in front of it that
drops one request header, as S3 clones that ignore preconditions behave.
"""

from __future__ import annotations

import http.client
import http.server
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from combtest import need_tool

ACCESS = {"AWS_ACCESS_KEY_ID": "comb-test", "AWS_SECRET_ACCESS_KEY": "comb-test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {
            **ACCESS,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_MAX_ATTEMPTS": "2",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=ACCESS["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def bucket(self) -> str:
        name = f"comb-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


@contextmanager
def moto_server() -> Iterator[S3Server]:
    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")  # this venv's
    tool = beside if os.access(beside, os.X_OK) else need_tool("moto_server")
    port = free_port()
    proc = subprocess.Popen(
        [tool, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **ACCESS},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def header_stripper(upstream: str, header: str) -> Iterator[str]:
    """An HTTP proxy to ``upstream`` that forwards every request without ``header``."""
    host, port = upstream.removeprefix("http://").split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() != header.lower()}
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request(self.command, self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            head = self.command == "HEAD"  # (its Content-Length is the object's)
            for k, v in reply.getheaders():
                skip = ("transfer-encoding", "connection") + (() if head else ("content-length",))
                if k.lower() not in skip:
                    self.send_header(k, v)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
