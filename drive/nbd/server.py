"""An NBD server that serves every committed recovery point as a read-only disk, and the
overlays it is given as writable ones.

Owns the names a client may ask for (a recovery point in the point-spec grammar of every
command, ``catalog.store.points.resolve``: ``SOURCE@latest``, ``SOURCE@ID``, an id or a unique
prefix, listed by its canonical ``SOURCE@ID``; ``overlay/NAME`` for the open overlays handed to
it), the fixed-newstyle negotiation (TLS first, through ``NBD_OPT_STARTTLS``, when the server
has a context from ``drive.nbd.tls``) and the listener's life cycle. The point list is read when a
client connects, so new backups appear without a restart. One thread per connection; a client's
error, bad request or disconnect ends only its own connection. The wire format is
``drive.nbd.proto``'s, the request loop ``drive.nbd.transmission``'s, the loaded points
``drive.nbd.exports``', overlays ``drive.overlays.overlay``'s. Imports catalog and drive only
(no Ray, no pipeline); writes to the repository only through overlays.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
from dataclasses import dataclass

import drive.nbd.proto as p
from catalog.errors import CombError, PointNotFound, UsageError, describe_os_error
from catalog.read.point import DEFAULT_CACHE_CHUNKS
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint, load_points_tolerant, resolve
from drive.nbd.exports import DEFAULT_MAX_SOURCES, ServedPoint, SourceCache, export_name
from drive.nbd.overlay import ServedOverlay
from drive.nbd.transmission import Transmission

log = logging.getLogger("comb.nbd")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809  # IANA's NBD port
NEGOTIATION_TIMEOUT_S = 30.0  # a client that never finishes its handshake is dropped
DRAIN_TIMEOUT_S = 5.0  # on shutdown, how long connections get to finish their request
ACCEPT_POLL_S = 0.2  # how quickly serve_forever notices a stop request
META_CONTEXT_ID = 1  # base:allocation's id on every connection


def transmission_flags(structured: bool, writable: bool = False) -> int:
    """Multi-conn holds for overlays too: a flush on any connection syncs the one shared log."""
    flags = p.TFLAG_HAS_FLAGS | p.TFLAG_CAN_MULTI_CONN
    if writable:
        flags |= p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
        flags |= p.TFLAG_SEND_WRITE_ZEROES
    else:
        flags |= p.TFLAG_READ_ONLY
    return flags | (p.TFLAG_SEND_DF if structured else 0)


OVERLAY_PREFIX = "overlay/"
Export = ServedPoint | ServedOverlay


@dataclass(frozen=True)
class _Found:
    """An export a name resolved to, before it is loaded."""

    name: str  # canonical
    size: int
    block: int
    description: str
    writable: bool
    point: RecoveryPoint | None
    overlay: ServedOverlay | None


class _Connection:
    """One client: option haggling, then requests until it disconnects or the server stops."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # the export base:allocation was selected for
        self.tls = False  # NBD_OPT_STARTTLS has succeeded
        self._points: list[RecoveryPoint] | None = None

    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(NEGOTIATION_TIMEOUT_S)
            chosen = self._negotiate()
            if chosen is not None:
                self.sock.settimeout(None)
                self._transmit(*chosen)
        except (p.Disconnect, OSError) as err:
            log.debug("%s: connection ended: %s", self.peer, err)
        except Exception:  # noqa: BLE001 - one client's failure must not stop the server
            log.exception("%s: unexpected error; closing this connection", self.peer)
        finally:
            self.sock.close()

    # -- negotiation --------------------------------------------------------------------------

    def _negotiate(self) -> tuple[str, Export] | None:
        flags = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
        self.sock.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, flags))
        (client,) = struct.unpack(">I", p.recv_exact(self.sock, 4))
        if client & ~p.CLIENT_FLAGS_KNOWN:
            raise p.Disconnect(f"unknown client flags {client:#x}")
        self.no_zeroes = bool(client & p.FLAG_NO_ZEROES)
        while True:
            magic, option, n = struct.unpack(">QII", p.recv_exact(self.sock, 16))
            if magic != p.IHAVEOPT:
                raise p.Disconnect("bad option magic")
            if n > p.MAX_OPTION_BYTES:
                raise p.Disconnect(f"option {option} with {n} bytes of data")
            data = p.recv_exact(self.sock, n)
            if option == p.OPT_ABORT:
                p.option_reply(self.sock, option, p.REP_ACK)
                return None
            if self.server.stopping:
                p.option_error(self.sock, option, p.REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if not self._tls_allows(option, data):
                continue
            chosen = self._option(option, data)
            if chosen is not None:
                return chosen

    def _tls_allows(self, option: int, data: bytes) -> bool:
        """Whether ``option`` may be handled now. Handles NBD_OPT_STARTTLS (wrapping the
        socket) and, while a server with TLS has not started it, refuses everything else with
        NBD_REP_ERR_TLS_REQD (the spec's FORCEDTLS; NBD_OPT_EXPORT_NAME cannot be refused, so
        it hangs up)."""
        context = self.server.tls
        if option != p.OPT_STARTTLS:
            if context is None or self.tls:
                return True
            if option == p.OPT_EXPORT_NAME:
                raise p.Disconnect("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS")
            p.option_error(self.sock, option, p.REP_ERR_TLS_REQD, "TLS is required")
        elif context is None:
            p.option_error(self.sock, option, p.REP_ERR_POLICY, "TLS is not configured")
        elif self.tls:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, "TLS is already on")
        elif data:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, "unexpected option data")
        else:
            p.option_reply(self.sock, option, p.REP_ACK)
            self.sock = context.wrap_socket(self.sock, server_side=True)  # may raise SSLError
            self.tls = True
            log.debug("%s: TLS %s", self.peer, self.sock.version())
        return False

    def _option(self, option: int, data: bytes) -> tuple[str, Export] | None:
        if option == p.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option in (p.OPT_INFO, p.OPT_GO):
            return self._info(option, data)
        if option == p.OPT_LIST:
            self._list(data)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                p.option_error(self.sock, option, p.REP_ERR_INVALID, "unexpected option data")
            else:
                self.structured = True
                p.option_reply(self.sock, option, p.REP_ACK)
        elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta(option, data)
        else:
            p.option_error(self.sock, option, p.REP_ERR_UNSUP, f"option {option} unsupported")
        return None

    def _points_now(self) -> list[RecoveryPoint]:
        """The committed points, read once per connection (at its first look-up)."""
        if self._points is None:
            self._points = load_points_tolerant(self.server.repo.storage)[0]
        return self._points

    def _list(self, data: bytes) -> None:
        if data:
            p.option_error(self.sock, p.OPT_LIST, p.REP_ERR_INVALID, "unexpected option data")
            return
        listing = [(export_name(pt), _description(pt)) for pt in self._points_now()]
        listing += [(n, _overlay_description(o)) for n, o in self.server.overlays.items()]
        for text, description in listing:
            name = text.encode()
            body = struct.pack(">I", len(name)) + name + description.encode()
            p.option_reply(self.sock, p.OPT_LIST, p.REP_SERVER, body)
        p.option_reply(self.sock, p.OPT_LIST, p.REP_ACK)

    def _find(self, name: str) -> _Found:
        """The export a name names: ``overlay/NAME``, or a recovery point in the point-spec
        grammar of every command (``SOURCE@latest``, ``SOURCE@ID``, an id or a unique prefix:
        ``catalog.store.points.resolve``)."""
        if name.startswith(OVERLAY_PREFIX):
            served = self.server.overlays.get(name)
            if served is None:
                raise PointNotFound(f"no overlay {name[len(OVERLAY_PREFIX) :]!r} is served")
            return _Found(
                name, served.size, served.granularity, _overlay_description(served), True,
                None, served,
            )  # fmt: skip
        point = resolve(self._points_now(), name)
        block = point.chunk_size
        return _Found(
            export_name(point), point.size, block, _description(point), False, point, None
        )

    def _load(self, found: _Found) -> Export:
        if found.overlay is not None:
            return found.overlay
        assert found.point is not None
        return self.server.sources.get(found.point)

    def _export_name(self, data: bytes) -> tuple[str, Export]:
        """The old way in: no error reply is possible, so a failure hangs up."""
        name = data.decode(errors="replace")
        try:
            found = self._find(name)
            served = self._load(found)
        except (CombError, OSError) as err:
            raise p.Disconnect(f"NBD_OPT_EXPORT_NAME {name!r}: {_describe(err)}") from None
        reply = struct.pack(">QH", served.size, transmission_flags(self.structured, found.writable))
        self.sock.sendall(reply + (b"" if self.no_zeroes else bytes(124)))
        return name, served

    def _info(self, option: int, data: bytes) -> tuple[str, Export] | None:
        try:
            name, wanted = p.parse_info_request(data)
        except ValueError as err:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, str(err))
            return None
        try:
            found = self._find(name)
            served = self._load(found) if option == p.OPT_GO else None
        except (CombError, OSError) as err:
            p.option_error(self.sock, option, p.REP_ERR_UNKNOWN, _describe(err))
            return None
        flags = transmission_flags(self.structured, found.writable)
        infos = [struct.pack(">HQH", p.INFO_EXPORT, found.size, flags)]
        infos.append(struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, found.block, p.MAX_REQUEST_BYTES))
        if p.INFO_NAME in wanted:
            infos.append(struct.pack(">H", p.INFO_NAME) + found.name.encode())
        if p.INFO_DESCRIPTION in wanted:
            infos.append(struct.pack(">H", p.INFO_DESCRIPTION) + found.description.encode())
        for info in infos:
            p.option_reply(self.sock, option, p.REP_INFO, info)
        p.option_reply(self.sock, option, p.REP_ACK)
        return None if served is None else (name, served)

    def _meta(self, option: int, data: bytes) -> None:
        setting = option == p.OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None  # a SET replaces the selection, even when it fails
        if not self.structured:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, "structured replies first")
            return
        try:
            name, queries = p.parse_meta_request(data)
            self._find(name)
        except ValueError as err:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, str(err))
            return
        except CombError as err:
            p.option_error(self.sock, option, p.REP_ERR_UNKNOWN, err.message)
            return
        if queries:
            selected = any(p.meta_matches(q, listing=not setting) for q in queries)
        else:
            selected = not setting  # no queries: LIST shows everything, SET selects nothing
        if selected:
            context = struct.pack(">I", META_CONTEXT_ID if setting else 0)
            body = context + p.META_BASE_ALLOCATION.encode()
            p.option_reply(self.sock, option, p.REP_META_CONTEXT, body)
            if setting:
                self.meta_export = name
        p.option_reply(self.sock, option, p.REP_ACK)

    # -- transmission -------------------------------------------------------------------------

    def _transmit(self, name: str, served: Export) -> None:
        log.info("%s: serving %s", self.peer, name)
        meta = META_CONTEXT_ID if self.meta_export == name else None
        errors = (CombError, OSError)
        Transmission(self.sock, served, self.structured, meta, errors).serve()


def _description(point: RecoveryPoint) -> str:
    return f"recovery point {point.id} of {point.source}, {point.time}, {point.size} bytes"


def _overlay_description(served: ServedOverlay) -> str:
    o = served.overlay
    return f"writable overlay {o.name} over recovery point {o.base_id}, {o.size} bytes"


def _describe(err: Exception) -> str:
    if isinstance(err, CombError):
        return err.message
    if isinstance(err, OSError):
        return describe_os_error(err)
    return str(err)


class NbdServer:
    """Listens on ``host:port`` (port 0: an ephemeral port, see ``address``) and serves every
    committed point of ``repo`` read-only until ``request_stop``/``shutdown``. With ``tls``
    (``drive.nbd.tls.server_context``) every client must start TLS before anything else."""

    def __init__(
        self,
        repo: Repository,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_sources: int = DEFAULT_MAX_SOURCES,
        overlays: dict[str, ServedOverlay] | None = None,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.repo = repo
        self.tls = tls
        self.sources = SourceCache(repo, max_sources, cache_chunks)
        self.overlays = {f"{OVERLAY_PREFIX}{n}": o for n, o in (overlays or {}).items()}
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port}: {describe_os_error(err)}") from None
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, _Connection] = {}

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def serve_forever(self) -> None:
        """Accept clients until a stop is requested, then close the listener and every
        connection (each finishes the request it is serving)."""
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._listener, selectors.EVENT_READ)
                while not self._stop.is_set():
                    if sel.select(ACCEPT_POLL_S):
                        self._accept()
        finally:
            self._listener.close()
            self._drain()
            self._finished.set()

    def shutdown_unstarted(self) -> None:
        """Close the listener of a server whose serve_forever never ran."""
        self._listener.close()

    def request_stop(self) -> None:
        """Ask serve_forever to return (safe from a signal handler: it only sets a flag)."""
        self._stop.set()

    def shutdown(self) -> None:
        """Stop and wait until serve_forever has closed everything (from another thread)."""
        self._stop.set()
        self._finished.wait()

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except OSError:
            return  # the client gave up between select and accept
        peer = f"{addr[0]}:{addr[1]}"
        conn = _Connection(self, sock, peer)
        thread = threading.Thread(target=self._run, args=(conn,), name=f"nbd {peer}", daemon=True)
        with self._lock:
            self._connections[thread] = conn
        thread.start()

    def _run(self, conn: _Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def _drain(self) -> None:
        with self._lock:
            live = list(self._connections.items())
        for _, conn in live:
            try:  # the TCP socket's, also under TLS: the next read sees end of stream
                socket.socket.shutdown(conn.sock, socket.SHUT_RD)
            except OSError:
                pass
        for thread, _ in live:
            thread.join(DRAIN_TIMEOUT_S)
