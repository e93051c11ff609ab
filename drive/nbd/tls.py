"""NBD over TLS: the server's x509 or PSK context and whether an address is private.

Owns building the ``ssl.SSLContext`` a server wraps each connection in after
``NBD_OPT_STARTTLS``: x509 (a certificate and key; with a CA, client certificates are required
and checked against it, which is the authentication) or PSK (pre-shared keys read from a
psktool-format file, ``IDENTITY:HEXKEY`` per line, as qemu-nbd and nbdkit read them: a client
that knows no key for its identity fails the handshake, which is the authentication), and
``is_loopback``, which the commands use to refuse exposing disks on a network without TLS. PSK
uses ``ssl``'s PSK callbacks, which Python has from 3.13 on; on older Pythons asking for it is a
one-line error. The negotiation that uses the context is ``drive.nbd.server``'s. Imports
catalog only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import sys

from catalog.errors import UsageError, describe_os_error


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context for ``cert``/``key`` (PEM); with ``ca``, clients must present a
    certificate that CA signed. A file that is missing or not PEM is a one-line UsageError."""
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{option} {path}: no such file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as err:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: {_reason(err)}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except OSError as err:
            raise UsageError(f"--tls-ca {ca}: {_reason(err)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


PSK_TLS12_SUITES = ":".join(
    (
        "ECDHE-PSK-CHACHA20-POLY1305",
        "DHE-PSK-AES256-GCM-SHA384",
        "DHE-PSK-AES128-GCM-SHA256",
        "DHE-PSK-CHACHA20-POLY1305",
    )
)
PSK_MIN, PSK_MAX = 16, 512  # key bytes: below, guessable offline; above, OpenSSL refuses it
PSK_FILE_MAX = 1 << 20


def psk_context(path: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context that accepts the pre-shared keys of ``path`` (``IDENTITY:HEXKEY``
    lines, as ``psktool`` writes them) and no certificates. A missing, unreadable or malformed
    file, or a Python without PSK support, is a one-line UsageError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    set_callback = getattr(ctx, "set_psk_server_callback", None)
    if set_callback is None or not getattr(ssl, "HAS_PSK", False):
        raise UsageError(
            f"--tls-psk needs Python 3.13 or later (this is {sys.version.split()[0]}); "
            "use --tls-cert/--tls-key"
        )
    keys = read_psk_file(path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.3 has its own suites and a PSK-with-(EC)DHE handshake; TLS 1.2 offers PSK only
    # through PSK suites: these, AEAD with an ephemeral key exchange (forward secrecy) only.
    try:
        ctx.set_ciphers(PSK_TLS12_SUITES)
    except ssl.SSLError as err:
        raise UsageError(f"--tls-psk: this OpenSSL offers no PSK cipher suites ({err})") from None
    set_callback(lambda identity: keys.get(identity or "", b""))
    return ctx


def read_psk_file(path: str) -> dict[str, bytes]:
    """The keys of a psktool-format file by identity. Blank lines are ignored; an identity given
    twice is refused (which key a client gets would otherwise depend on the reader)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(PSK_FILE_MAX + 1)
    except OSError as err:
        raise UsageError(f"--tls-psk {path}: {describe_os_error(err)}") from None
    if len(raw) > PSK_FILE_MAX:
        raise UsageError(f"--tls-psk {path}: larger than 1 MiB, not a key file")
    keys: dict[str, bytes] = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        identity, sep, hexkey = line.strip().partition(b":")
        try:
            name, key = identity.decode("utf-8"), bytes.fromhex(hexkey.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            name, key = "", b""
        if not sep or not name or not key or not hexkey.isalnum():
            raise UsageError(
                f"--tls-psk {path}: line {number} is not IDENTITY:HEXKEY (psktool's format)"
            )
        if not PSK_MIN <= len(key) <= PSK_MAX:
            raise UsageError(
                f"--tls-psk {path}: line {number}: a key of {len(key)} bytes "
                f"(give {PSK_MIN} to {PSK_MAX}; psktool makes 32)"
            )
        if name in keys:
            raise UsageError(f"--tls-psk {path}: line {number} repeats identity {name!r}")
        keys[name] = key
    if not keys:
        raise UsageError(f"--tls-psk {path}: no keys (write IDENTITY:HEXKEY lines, e.g. psktool)")
    return keys


def _reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        return f"not a usable PEM certificate/key ({err.reason or err.strerror or err})"
    return describe_os_error(err)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) resolves only to loopback addresses. A name that
    does not resolve counts as loopback: binding it fails anyway, with its own error."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return True
    for info in infos:
        try:
            if not ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback:
                return False
        except ValueError:
            return False
    return True
