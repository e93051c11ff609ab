"""NBD over TLS: the server's x509 context and the question of whether an address is private.

Owns building the ``ssl.SSLContext`` a server wraps each connection in after
``NBD_OPT_STARTTLS`` (a certificate and key; with a CA, client certificates are required and
checked against it, which is the authentication), and ``is_loopback``, which the commands use to
refuse exposing disks on a network without TLS. x509 only: TLS-PSK needs ``ssl``'s PSK callbacks,
which arrived in Python 3.13 (this project runs on 3.11), so PSK is not offered. The negotiation
that uses the context is ``drive.nbd.server``'s. Imports catalog only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl

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
