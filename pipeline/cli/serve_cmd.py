"""``comb serve``: the repository's recovery points as read-only NBD disks, and its overlays as
writable ones.

Owns the command's side only: parsing ``--listen``, ``--overlay`` and the TLS options (and
refusing a non-loopback address without TLS unless ``--insecure``), creating missing overlays,
opening (and locking) the overlays for the server's lifetime, the repository's shared ``serve``
lock for the same time (FORMAT.md 13), the start-up line, and turning SIGINT and SIGTERM into a
graceful stop. The server itself is ``drive.nbd.server``.
"""

from __future__ import annotations

import argparse
import signal
import ssl
from types import FrameType

import drive.overlays.overlay as overlay
from catalog.errors import CombError, RepositoryError, UsageError
from catalog.errors import describe_os_error as _os
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.nbd.exports import ServedPoint
from drive.nbd.overlay import ServedOverlay
from drive.nbd.server import DEFAULT_HOST, DEFAULT_PORT, NbdServer
from drive.nbd.tls import is_loopback, psk_context, server_context

from ..console import warn, warn_damaged
from ..locking import reader_lock
from . import EXIT_INTERRUPTED, Subparsers, command

DEFAULT_LISTEN = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "serve",
        "serve recovery points (read-only) and overlays (writable) over NBD",
        [
            "comb -r /backup/repo serve &",
            "nbdcopy nbd://127.0.0.1:10809/web01@latest web01.img",
            "comb -r /backup/repo serve --overlay try1=web01@latest --listen 0.0.0.0:10809 "
            "--tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem",
            "nbdinfo 'nbds://HOST/web01@latest?tls-certificates=/etc/pki/comb'",
        ],
        json=None,
    )
    s.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    s.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="NAME=POINT",
        help="serve writable overlay NAME as overlay/NAME, created over POINT if missing",
    )
    for flag, text in (
        ("--tls-cert", "x509 server certificate (PEM): clients must start TLS (NBD_OPT_STARTTLS)"),
        ("--tls-key", "the private key of --tls-cert (PEM)"),
        ("--tls-ca", "CA certificate(s) (PEM): require client certificates it signed"),
        ("--tls-psk", "pre-shared keys, IDENTITY:HEXKEY lines (psktool): TLS-PSK instead of x509"),
    ):
        s.add_argument(flag, metavar="FILE", help=text)
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without TLS (anyone reaching it reads every disk)",
    )
    s.add_argument(
        "--cache-mib",
        type=int,
        default=16,
        help="decoded chunks cached per served point, MiB (default 16; at most 8 points loaded)",
    )
    s.set_defaults(run=cmd_serve)


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


def tls_options(args: argparse.Namespace, host: str, port: int) -> ssl.SSLContext | None:
    """The TLS context of ``--tls-cert``/``--tls-key``/``--tls-ca`` or of ``--tls-psk``, or None.
    Without TLS, a non-loopback address is refused unless ``--insecure`` (which warns)."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    ca, insecure = getattr(args, "tls_ca", None), getattr(args, "insecure", False)
    psk = getattr(args, "tls_psk", None)
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if ca is not None and cert is None:
        raise UsageError("--tls-ca needs --tls-cert and --tls-key")
    if psk is not None and cert is not None:
        raise UsageError("--tls-psk and --tls-cert exclude each other (one kind of TLS)")
    if insecure and (psk is not None or cert is not None):
        raise UsageError(
            f"--insecure and {'--tls-psk' if psk else '--tls-cert'} exclude each other"
        )
    if psk is not None:
        return psk_context(psk)
    if cert is not None and key is not None:
        return server_context(cert, key, ca)
    where = f"{_uri_host(host)}:{port}"
    if insecure:
        warn(f"--insecure: serving without TLS or authentication on {where}", loud=True)
    elif not is_loopback(host):
        raise UsageError(
            f"--listen {where} is not a loopback address: give --tls-cert and --tls-key "
            "(and --tls-ca to authenticate clients) or --tls-psk, or --insecure to serve "
            "without TLS"
        )
    return None


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def open_overlays(
    r: Repository, points: list[RecoveryPoint], wanted: dict[str, str]
) -> dict[str, ServedOverlay]:
    """Every overlay, opened for writing (locked). Those named by ``--overlay`` are created if
    missing, and any failure to open them is an error; another overlay that cannot be opened
    (e.g. another server has it) is left out with a warning."""
    for name, spec in wanted.items():
        if name not in overlay.names(r):
            overlay.create(r, name, r.resolve(spec))
    by_id = {pt.id: pt for pt in points}
    served: dict[str, ServedOverlay] = {}
    try:
        for name in overlay.names(r):
            try:
                opened = overlay.Overlay(r, name)
            except CombError as err:
                if name in wanted:
                    raise
                warn(f"overlay {name} is not served: {err.message}")
                continue
            point = by_id.get(opened.base_id)
            if point is None:
                opened.close()
                msg = f"overlay {name}: its base recovery point {opened.base_id} is missing"
                if name in wanted:
                    raise UsageError(msg)
                warn(f"{msg}; not served")
                continue
            try:
                base = ServedPoint(r.reader(point))
            except CombError as err:
                opened.close()
                if name in wanted:
                    raise
                warn(f"overlay {name} is not served: its base point: {err.message}")
                continue
            served[name] = ServedOverlay(opened, base, point.chunk_size)
    except BaseException:
        close_overlays(served)
        raise
    return served


def parse_overlay_specs(specs: list[str]) -> dict[str, str]:
    """``--overlay NAME=POINT`` options: name -> point spec (a name given twice is an error)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, point = spec.partition("=")
        if not sep or not point:
            raise UsageError(f"--overlay {spec[:80]!r} is not NAME=POINT")
        overlay.check_name(name)
        if name in out:
            raise UsageError(f"--overlay {name!r} is given twice")
        out[name] = point
    return out


def close_overlays(served: dict[str, ServedOverlay]) -> RepositoryError | None:
    """Flush and close each overlay, even when one cannot be flushed: the error naming those
    (their writes since the last flush may be lost) is returned, for the caller to raise once
    no other error is on its way."""
    failed: list[str] = []
    for name, s in served.items():
        try:
            s.flush()
        except (OSError, CombError) as err:
            failed.append(f"{name}: {err.message if isinstance(err, CombError) else _os(err)}")
        finally:
            s.overlay.close()
    return RepositoryError(f"cannot flush overlay {'; '.join(failed)}") if failed else None


def cmd_serve(repo: str, args: argparse.Namespace) -> int:
    host, port = parse_listen(getattr(args, "listen", None) or DEFAULT_LISTEN)
    wanted = parse_overlay_specs(getattr(args, "overlay", None) or [])
    cache_mib = getattr(args, "cache_mib", 16)
    if not 0 < cache_mib <= 1 << 20:
        raise UsageError(f"--cache-mib {cache_mib} is out of range (1 MiB to 1 TiB)")
    tls = tls_options(args, host, port)
    r = Repository.open(repo, password=args.password)
    # The shared lock is held from before the points are listed until the server has stopped:
    # prune waits for it, so no file a served point needs goes (they are opened lazily).
    with reader_lock(r, "serve", long_lived=True):
        psk = getattr(args, "tls_psk", None) is not None
        return _serve(r, host, port, wanted, cache_mib, tls, psk)


def _serve(
    r: Repository,
    host: str,
    port: int,
    wanted: dict[str, str],
    cache_mib: int,
    tls: ssl.SSLContext | None,
    psk: bool = False,
) -> int:
    chunks = max(1, (cache_mib << 20) // r.config.chunk_size)
    server = NbdServer(r, host, port, cache_chunks=chunks, tls=tls)
    points = r.points()
    warn_damaged(r)
    try:
        overlays = open_overlays(r, points, wanted)
    except BaseException:
        server.shutdown_unstarted()
        raise
    for name, served in overlays.items():
        server.overlays[f"overlay/{name}"] = served
    bound_host, bound_port = server.address
    n = len(overlays)
    also = f" and {n} overlay{'s' if n != 1 else ''} writable (overlay/NAME)" if n else ""
    scheme, how = "nbd", ""
    if tls is not None:
        scheme = "nbds"
        how = ", TLS required" + (
            " with client certificates"
            if tls.verify_mode == ssl.CERT_REQUIRED
            else " with pre-shared keys"
            if psk
            else ""
        )
    got: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        server.request_stop()

    # The handlers come first: a client may signal as soon as it has read the start-up line.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"serving {len(points)} recovery point{'s' if len(points) != 1 else ''} read-only "
            f"on {scheme}://{_uri_host(bound_host)}:{bound_port}/SOURCE@POINT{also}{how} "
            "(Ctrl-C stops)",
            flush=True,
        )
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        failed = close_overlays(overlays)
    if failed is not None:
        raise failed
    return EXIT_INTERRUPTED if got[:1] == [signal.SIGINT] else 0
