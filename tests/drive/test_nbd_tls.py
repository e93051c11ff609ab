"""NBD over TLS (``serve --tls-cert/--tls-key/--tls-ca``): real clients (qemu-img, nbdinfo)
read through it, clients without TLS or without a certificate are refused, and ``serve`` will
not listen beyond loopback without TLS unless told ``--insecure``."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from combtest import need_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nbdtest import (
    IHAVEOPT,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    ROOT,
    RawClient,
    Served,
    name_data,
    run_tool,
    serve_process,
    serving,
    start,
)

from drive.nbd.server import NbdServer
from drive.nbd.tls import server_context


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey]
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        # Key identifiers: Python 3.13's default client context verifies strictly (RFC 5280).
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
    )


def make_certs(d: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, named as
    qemu's and libnbd's x509 directories want them (ca-cert.pem, client-cert.pem, ...)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = ("comb test CA", ca_key)
    ca_cert = (
        _cert("comb test CA", ca_key, ca)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca-cert.pem": ca_cert.public_bytes(serialization.Encoding.PEM)}
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _cert(f"comb test {role}", key, ca).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if role == "server":
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files[f"{role}-cert.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}-key.pem"] = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).chmod(0o600)
    return d


def client_context(certs: Path, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    if with_cert:
        ctx.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Served]:
    """Served with TLS and client certificates required (``--tls-ca``)."""
    context = server_context(
        str(certs / "server-cert.pem"), str(certs / "server-key.pem"), str(certs / "ca-cert.pem")
    )
    yield from serving(tmp_path_factory, tls=context)


def test_qemu_img_reads_a_point_over_tls(served: Served, certs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    nbd = f"driver=nbd,host=127.0.0.1,port={served.port},export={served.export},tls-creds=tls0"
    res = run_tool(
        need_tool("qemu-img"),
        "convert",
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts",
        f"driver=raw,file.{nbd.replace(',', ',file.')}",
        "-O",
        "raw",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == served.image.read_bytes()


def test_libnbd_reads_over_tls(served: Served, certs: Path, tmp_path: Path) -> None:
    uri = f"nbds://127.0.0.1:{served.port}/{served.export}?tls-certificates={certs}"
    res = run_tool(need_tool("nbdinfo"), "--json", uri)
    assert res.returncode == 0 and '"TLS": true' in res.stdout, res.stdout + res.stderr
    res = run_tool(need_tool("nbdcopy"), uri, str(tmp_path / "out.img"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.img").read_bytes() == served.image.read_bytes()
    res = run_tool(need_tool("nbdinfo"), uri.replace("nbds://", "nbd://"))  # no TLS: refused
    assert res.returncode != 0


def test_clients_without_tls_or_a_certificate_are_refused(served: Served, certs: Path) -> None:
    with RawClient(served.port) as c:
        for opt, data in ((OPT_LIST, b""), (OPT_GO, name_data(served.export, b"\0\0"))):
            [(reply, message)] = c.option(opt, data)
            assert reply == REP_ERR_TLS_REQD and message, opt
        c.starttls(client_context(certs))
        assert c.option(OPT_STARTTLS) == [(REP_ERR_INVALID, b"TLS is already on")]
        c.go(served.export)
        assert c.read(4096, 8192) == served.image.read_bytes()[4096:12288]
    with RawClient(served.port) as c:  # the old way in has no error reply: it hangs up
        c.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 1) + b"x")
        assert c.s.recv(1) == b""
    with RawClient(served.port) as c:  # a TLS client without a certificate: --tls-ca refuses
        with pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
            c.starttls(client_context(certs, with_cert=False))
            c.go(served.export)
    with RawClient(served.port) as c:
        assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    plain = NbdServer(served.server.repo, port=0)  # no TLS configured: STARTTLS is refused
    thread = start(plain)
    try:
        with RawClient(plain.address[1]) as c:
            assert c.option(OPT_STARTTLS)[0][0] == REP_ERR_POLICY
            c.go(served.export)
    finally:
        plain.shutdown()
        thread.join(10)


def test_serve_command_tls_and_its_refusals(served: Served, certs: Path) -> None:
    repo = served.server.repo.location
    cert, key = str(certs / "server-cert.pem"), str(certs / "server-key.pem")
    for args, want in [
        (["--listen", "0.0.0.0:0"], "--listen 0.0.0.0:0 is not a loopback address"),
        (["--tls-cert", cert, "--tls-key", str(certs / "nope.pem")], "nope.pem: no such file"),
        (["--tls-cert", cert, "--tls-key", cert], "not a usable PEM"),  # a cert is no key
        (["--tls-cert", cert], "--tls-cert and --tls-key go together"),
    ]:
        with serve_process(repo, *args) as proc:
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and want in err, (args, err)
    with serve_process(
        repo, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "on nbds://127.0.0.1:" in line and "TLS required" in line, line
        port = int(line.split("nbds://127.0.0.1:")[1].split("/")[0])
        with RawClient(port) as c:  # no --tls-ca: any TLS client, no certificate needed
            c.starttls(client_context(certs, with_cert=False))
            c.go(served.export)
            assert c.read(0, 4096) == served.image.read_bytes()[:4096]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            with pytest.raises(ssl.SSLError):  # the open connection was closed (an alert)
                c.s.recv(1)
        assert proc.stderr.read() == ""
    with serve_process(repo, "--listen", "0.0.0.0:0", "--insecure") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "on nbd://0.0.0.0:" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        err = proc.stderr.read()
        assert "WARNING: --insecure: serving without TLS" in err and err.count("\n") == 1, err


def test_boot_listens_on_loopback_only(served: Served) -> None:
    need_tool("qemu-system-x86_64")  # a missing QEMU is reported before the address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    repo = served.server.repo.location
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", repo, "boot", served.export]
    res = subprocess.run(
        [*cmd, "--listen", "0.0.0.0:0"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert res.returncode == 2 and "listens on loopback only" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
