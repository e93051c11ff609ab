"""NBD over TLS-PSK (``serve --tls-psk FILE``, psktool's ``IDENTITY:HEXKEY`` lines): qemu and
libnbd read through it with the key qemu-nbd and nbdkit users already have; a wrong key, an
unknown identity or no TLS at all is refused; TLS 1.2's PSK suites work as well as TLS 1.3; a
bad key file is a one-line error."""

from __future__ import annotations

import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from combtest import need_tls_psk, need_tool
from nbdtest import (
    OPT_GO,
    REP_ERR_TLS_REQD,
    RawClient,
    Served,
    name_data,
    run_tool,
    serve_process,
    serving,
)

from catalog.errors import UsageError
from drive.nbd.tls import psk_context, read_psk_file

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory as qemu's tls-creds-psk wants it (``keys.psk``), with two identities."""
    d = tmp_path_factory.mktemp("psk")
    other = os.urandom(32).hex()
    (d / "keys.psk").write_text(f"alice:{KEY.hex()}\n\nbob:{other}\n")
    (d / "wrong.psk").write_text(f"alice:{os.urandom(32).hex()}\n")
    (d / "eve.psk").write_text(f"eve:{KEY.hex()}\n")  # the right key under an unknown name
    return d


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[Served]:
    need_tls_psk()
    yield from serving(tmp_path_factory, tls=psk_context(str(keys / "keys.psk")))


def test_qemu_img_reads_a_point_over_tls_psk(served: Served, keys: Path, tmp_path: Path) -> None:
    need_tls_psk()
    out = tmp_path / "out.img"
    nbd = f"driver=nbd,host=127.0.0.1,port={served.port},export={served.export},tls-creds=tls0"
    res = run_tool(
        need_tool("qemu-img"),
        "convert",
        "--object",
        f"tls-creds-psk,id=tls0,dir={keys},username=alice,endpoint=client",
        "--image-opts",
        f"driver=raw,file.{nbd.replace(',', ',file.')}",
        "-O",
        "raw",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == served.image.read_bytes()


def test_libnbd_reads_with_the_key_and_is_refused_without_it(
    served: Served, keys: Path, tmp_path: Path
) -> None:
    need_tls_psk()
    host = f"127.0.0.1:{served.port}/{served.export}"
    uri = f"nbds://alice@{host}?tls-psk-file={keys / 'keys.psk'}"
    res = run_tool(need_tool("nbdinfo"), "--json", uri)
    assert res.returncode == 0 and '"TLS": true' in res.stdout, res.stdout + res.stderr
    res = run_tool(need_tool("nbdcopy"), uri, str(tmp_path / "out.img"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.img").read_bytes() == served.image.read_bytes()
    bob = run_tool("nbdinfo", f"nbds://bob@{host}?tls-psk-file={keys / 'keys.psk'}")
    assert bob.returncode == 0, bob.stderr  # the second identity has its own key
    for refused in (
        f"nbds://alice@{host}?tls-psk-file={keys / 'wrong.psk'}",  # a wrong key
        f"nbds://eve@{host}?tls-psk-file={keys / 'eve.psk'}",  # an identity the server lacks
        f"nbd://{host}",  # no TLS
    ):
        res = run_tool("nbdinfo", refused)
        assert res.returncode != 0, refused


def client(identity: str, key: bytes, **versions: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for name, version in versions.items():
        setattr(ctx, name, version)
    ctx.set_ciphers("PSK")
    ctx.set_psk_client_callback(lambda hint: (identity, key))  # type: ignore[attr-defined]
    return ctx


def test_tls12_psk_suites_and_tls13_both_serve(served: Served) -> None:
    need_tls_psk()
    image = served.image.read_bytes()
    for versions, want in (
        ({"maximum_version": ssl.TLSVersion.TLSv1_2}, "TLSv1.2"),
        ({"minimum_version": ssl.TLSVersion.TLSv1_3}, "TLSv1.3"),
    ):
        with RawClient(served.port) as c:
            [(reply, _)] = c.option(OPT_GO, name_data(served.export, b"\0\0"))
            assert reply == REP_ERR_TLS_REQD  # nothing before TLS
            c.starttls(client("alice", KEY, **versions))
            assert isinstance(c.s, ssl.SSLSocket) and c.s.version() == want
            c.go(served.export)
            assert c.read(8192, 4096) == image[8192:12288], want
    with RawClient(served.port) as c, pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
        c.starttls(client("alice", bytes(32), maximum_version=ssl.TLSVersion.TLSv1_2))
        c.go(served.export)


def test_psk_files_are_read_strictly(tmp_path: Path) -> None:
    f = tmp_path / "k.psk"
    f.write_bytes(b"alice:" + b"00ff" * 8 + b"\r\n\nbob:" + KEY.hex().encode() + b"\n")
    assert read_psk_file(str(f)) == {"alice": b"\0\xff" * 8, "bob": KEY}
    k = KEY.hex().encode()
    for text, want in (
        (b"", "no keys"),
        (b"alice\n", "line 1 is not IDENTITY:HEXKEY"),
        (b"\nalice:zz\n", "line 2 is not IDENTITY:HEXKEY"),
        (b":" + k + b"\n", "line 1 is not IDENTITY:HEXKEY"),
        (b"alice:\n", "line 1 is not IDENTITY:HEXKEY"),
        (b"alice:" + k[:32] + b" " + k[32:] + b"\n", "line 1 is not IDENTITY:HEXKEY"),
        (b"alice:00ff\n", "line 1: a key of 2 bytes"),  # guessable offline
        (b"alice:" + b"00" * 513 + b"\n", "a key of 513 bytes"),  # more than OpenSSL takes
        (b"alice:" + k + b"\nalice:" + k + b"\n", "line 2 repeats identity 'alice'"),
        (b"alice:" + k + b"\n" + b"#" * (1 << 20), "larger than 1 MiB"),
    ):
        f.write_bytes(text)
        with pytest.raises(UsageError, match=want):
            read_psk_file(str(f))
    with pytest.raises(UsageError, match="nope.psk: No such file"):
        read_psk_file(str(tmp_path / "nope.psk"))


def test_serve_command_tls_psk_and_its_refusals(served: Served, keys: Path) -> None:
    need_tls_psk()
    repo, psk = served.server.repo.location, str(keys / "keys.psk")
    (keys / "bad.psk").write_text("alice 00ff\n")
    for args, want in [
        (["--tls-psk", str(keys / "bad.psk")], "bad.psk: line 1 is not IDENTITY:HEXKEY"),
        (["--tls-psk", psk, "--tls-cert", psk, "--tls-key", psk], "exclude each other"),
        (["--tls-psk", psk, "--insecure"], "--insecure and --tls-psk exclude each other"),
    ]:
        with serve_process(repo, *args) as proc:
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and want in err, (args, err)
    with serve_process(
        repo, "--listen", "0.0.0.0:0", "--tls-psk", psk
    ) as proc:  # PSK is TLS enough
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "on nbds://0.0.0.0:" in line and "TLS required with pre-shared keys" in line, (
            line + proc.stderr.read()
        )
        port = int(line.split("nbds://0.0.0.0:")[1].split("/")[0])
        with RawClient(port) as c:
            c.starttls(client("bob", read_psk_file(psk)["bob"]))
            c.go(served.export)
            assert c.read(0, 4096) == served.image.read_bytes()[:4096]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr.read() == ""
