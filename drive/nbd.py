"""A read-only NBD server that serves every committed recovery point as a disk.

Owns the exports (``SOURCE@POINTID``, ``SOURCE@<unique id prefix>``, ``SOURCE@latest``; the point
list is read when a client connects, so new backups appear without a restart), the per-point
``PointSource`` cache shared by all connections, the fixed-newstyle negotiation and the
listener's life cycle. One thread per connection; a client's error, bad request or disconnect
ends only its own connection. The wire format and the request loop live in ``drive.nbd_proto``.
Imports catalog and drive only (no Ray, no pipeline); never writes to the repository.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from bisect import bisect_right
from collections import OrderedDict

from catalog.errors import CombError, PointNotFound, UsageError, describe_os_error
from catalog.points import RecoveryPoint, load_points_tolerant
from catalog.repo import Repository
from drive import nbd_proto as p
from drive.source import PointSource

log = logging.getLogger("comb.nbd")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809  # IANA's NBD port
DEFAULT_MAX_SOURCES = 8  # loaded points kept: ~1.6 MiB per GiB of data + a 16 MiB chunk cache
NEGOTIATION_TIMEOUT_S = 30.0  # a client that never finishes its handshake is dropped
DRAIN_TIMEOUT_S = 5.0  # on shutdown, how long connections get to finish their request
ACCEPT_POLL_S = 0.2  # how quickly serve_forever notices a stop request
META_CONTEXT_ID = 1  # base:allocation's id on every connection


def export_name(point: RecoveryPoint) -> str:
    return f"{point.source}@{point.id}"


def find_point(points: list[RecoveryPoint], name: str) -> RecoveryPoint:
    """The point an export name names: SOURCE@ID, SOURCE@PREFIX or SOURCE@latest. The source
    may itself contain '@', so the name splits at the last one."""
    source, sep, spec = name.rpartition("@")
    if not sep or not spec:
        raise PointNotFound(f"export {name!r} is not SOURCE@POINT (SOURCE@latest or an id)")
    mine = [pt for pt in points if pt.source == source]
    if not mine:
        raise PointNotFound(f"no recovery point for source {source!r}")
    if spec == "latest":
        return mine[-1]
    matches = [pt for pt in mine if pt.id.startswith(spec)]
    if len(matches) != 1:
        what = "ambiguous" if matches else "unknown"
        raise PointNotFound(f"recovery point {spec!r} of {source!r} is {what}")
    return matches[0]


class ServedPoint:
    """One point being served: its block source (safe for concurrent reads) and its
    allocation map."""

    def __init__(self, source: PointSource) -> None:
        self.source = source
        self.point = source.point
        self.size = source.size
        extents = source.extents()
        self._starts = [off for off, _ in extents]
        self._ends = [off + n for off, n in extents]

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length) if length else b""

    def segments(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering the range in order; at most ``limit`` runs
        (0: all). Zero chunks and holes are not data."""
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        i = bisect_right(self._starts, offset) - 1
        at = offset
        while at < end and (not limit or len(out) < limit):
            if i >= 0 and at < self._ends[i]:
                stop, data = min(end, self._ends[i]), True
            else:
                nxt = self._starts[i + 1] if i + 1 < len(self._starts) else end
                stop, data = min(end, nxt), False
                i += 1
            out.append((at, stop - at, data))
            at = stop
        return out


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: ServedPoint | None = None


class SourceCache:
    """Loaded points shared by all connections, least recently used first out. A point is loaded
    once even when several clients connect at once; other points' loads do not wait for it."""

    def __init__(self, repo: Repository, max_sources: int = DEFAULT_MAX_SOURCES) -> None:
        self._repo = repo
        self._max = max(1, max_sources)
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def get(self, point: RecoveryPoint) -> ServedPoint:
        with self._lock:
            slot = self._slots.get(point.id)
            if slot is None:
                slot = self._slots[point.id] = _Slot()
            self._slots.move_to_end(point.id)
            while len(self._slots) > self._max:
                self._slots.popitem(last=False)  # connections using it keep their reference
        with slot.lock:
            if slot.value is None:
                slot.value = ServedPoint(PointSource(self._repo, point))
            return slot.value


def transmission_flags(structured: bool) -> int:
    flags = p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY | p.TFLAG_CAN_MULTI_CONN
    return flags | (p.TFLAG_SEND_DF if structured else 0)


class _Connection:
    """One client: option haggling, then requests until it disconnects or the server stops."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # the export base:allocation was selected for
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

    def _negotiate(self) -> tuple[str, ServedPoint] | None:
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
            chosen = self._option(option, data)
            if chosen is not None:
                return chosen

    def _option(self, option: int, data: bytes) -> tuple[str, ServedPoint] | None:
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
        for point in self._points_now():
            name = export_name(point).encode()
            body = struct.pack(">I", len(name)) + name + _description(point).encode()
            p.option_reply(self.sock, p.OPT_LIST, p.REP_SERVER, body)
        p.option_reply(self.sock, p.OPT_LIST, p.REP_ACK)

    def _export_name(self, data: bytes) -> tuple[str, ServedPoint]:
        """The old way in: no error reply is possible, so a failure hangs up."""
        name = data.decode(errors="replace")
        try:
            served = self.server.sources.get(find_point(self._points_now(), name))
        except (CombError, OSError) as err:
            raise p.Disconnect(f"NBD_OPT_EXPORT_NAME {name!r}: {_describe(err)}") from None
        reply = struct.pack(">QH", served.size, transmission_flags(self.structured))
        self.sock.sendall(reply + (b"" if self.no_zeroes else bytes(124)))
        return name, served

    def _info(self, option: int, data: bytes) -> tuple[str, ServedPoint] | None:
        try:
            name, wanted = p.parse_info_request(data)
        except ValueError as err:
            p.option_error(self.sock, option, p.REP_ERR_INVALID, str(err))
            return None
        try:
            point = find_point(self._points_now(), name)
            served = self.server.sources.get(point) if option == p.OPT_GO else None
        except (CombError, OSError) as err:
            p.option_error(self.sock, option, p.REP_ERR_UNKNOWN, _describe(err))
            return None
        flags = transmission_flags(self.structured)
        infos = [struct.pack(">HQH", p.INFO_EXPORT, point.size, flags)]
        infos.append(
            struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, point.chunk_size, p.MAX_REQUEST_BYTES)
        )
        if p.INFO_NAME in wanted:
            infos.append(struct.pack(">H", p.INFO_NAME) + export_name(point).encode())
        if p.INFO_DESCRIPTION in wanted:
            infos.append(struct.pack(">H", p.INFO_DESCRIPTION) + _description(point).encode())
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
            find_point(self._points_now(), name)
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

    def _transmit(self, name: str, served: ServedPoint) -> None:
        log.info("%s: serving %s", self.peer, export_name(served.point))
        meta = META_CONTEXT_ID if self.meta_export == name else None
        errors = (CombError, OSError)
        p.Transmission(self.sock, served, self.structured, meta, errors).serve()


def _description(point: RecoveryPoint) -> str:
    return f"recovery point {point.id} of {point.source}, {point.time}, {point.size} bytes"


def _describe(err: Exception) -> str:
    if isinstance(err, CombError):
        return err.message
    if isinstance(err, OSError):
        return describe_os_error(err)
    return str(err)


class NbdServer:
    """Listens on ``host:port`` (port 0: an ephemeral port, see ``address``) and serves every
    committed point of ``repo`` read-only until ``request_stop``/``shutdown``."""

    def __init__(
        self,
        repo: Repository,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        self.repo = repo
        self.sources = SourceCache(repo, max_sources)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port}: {describe_os_error(err)}") from None
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def export_names(self) -> list[str]:
        """The names of the exports a client connecting now would see."""
        return [export_name(pt) for pt in load_points_tolerant(self.repo.storage)[0]]

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
            self._connections[thread] = sock
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
        for _, sock in live:
            try:
                sock.shutdown(socket.SHUT_RD)  # the next read sees end of stream
            except OSError:
                pass
        for thread, _ in live:
            thread.join(DRAIN_TIMEOUT_S)
