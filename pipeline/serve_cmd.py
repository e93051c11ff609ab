"""``comb serve``: the repository's recovery points as read-only NBD disks.

Owns the command's side only: parsing ``--listen``, the start-up line, and turning SIGINT and
SIGTERM into a graceful stop. The server itself is ``drive.nbd``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from catalog.errors import UsageError
from catalog.repo import Repository
from drive.nbd import DEFAULT_HOST, DEFAULT_PORT, NbdServer

DEFAULT_LISTEN = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (the default host); port 0 picks one."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise UsageError(f"--listen {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT (a port from 0 to 65535)")
    return host or DEFAULT_HOST, int(port)


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_serve(repo: str, args: argparse.Namespace) -> int:
    host, port = parse_listen(getattr(args, "listen", None) or DEFAULT_LISTEN)
    r = Repository.open(repo)
    server = NbdServer(r, host, port)
    points = r.points()
    for msg in r.damaged:
        print(f"comb: warning: skipping {msg}", file=sys.stderr)
    bound_host, bound_port = server.address
    print(
        f"serving {len(points)} recovery point{'s' if len(points) != 1 else ''} read-only on "
        f"nbd://{_uri_host(bound_host)}:{bound_port}/SOURCE@POINT (Ctrl-C stops)",
        flush=True,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
