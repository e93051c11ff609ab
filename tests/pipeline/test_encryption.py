"""Encryption at rest, end to end through the CLI: nothing stored is plaintext, chunk ids are
keyed, a wrong or missing password is one line, tampering with any file is detected as such,
several passwords open one repository, and DuckDB analytics work on the encrypted catalog."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import blake3
import duckdb
import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    ImageFactory,
    assert_one_line_error,
    flip_byte,
    point_ids,
    repo_files,
)

from catalog.store import crypto
from catalog.store.packs import PACK_HEADER_BYTES, PACK_TRAILER_BYTES

CHUNK = 64 * 1024
MARKER = b"comb-plaintext-marker-"


def _image(make_image: ImageFactory) -> Image:
    """Distinctive text in compressible and random surroundings, in several chunks."""
    img = make_image(3 * 1024 * 1024, name="secret-source-name.img")
    for i in range(12):
        img.write(i * CHUNK * 3 + 100, MARKER + b"%04d " % i * 200)
    img.compressible(40 * CHUNK, 4 * CHUNK, seed=3)
    img.random(44 * CHUNK, 2 * CHUNK, seed=4)
    return img


def _backed_up(cli: CliRunner, tmp_path: Path, make_image: ImageFactory) -> tuple[Path, Image]:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    img = _image(make_image)
    assert cli("-r", repo, "backup", img.path).code == 0
    img.write(5 * CHUNK, MARKER + b"changed " * 100)
    assert cli("-r", repo, "backup", img.path).code == 0
    return repo, img


def _all_files(repo: Path) -> list[Path]:
    return sorted(p for p in repo.rglob("*") if p.is_file())


def test_nothing_stored_is_plaintext_and_ids_are_keyed(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory
) -> None:
    repo, img = _backed_up(cli, tmp_path, make_image)
    data = img.path.read_bytes()
    plain_ids = {
        blake3.blake3(data[o : o + CHUNK]).digest()
        for o in range(0, len(data), CHUNK)
        if any(data[o : o + CHUNK])
    }
    assert len(plain_ids) > 10
    files = _all_files(repo)
    kinds = {p.relative_to(repo).parts[0] for p in files}
    assert {"packs", "index", "manifests", "points", "keys", "config.json"} <= kinds
    for path in files:
        body = path.read_bytes()
        assert MARKER not in body, path
        assert b"secret-source-name" not in body, path
        assert b"alpha beta" not in body and b"gamma delta" not in body, path
        assert not any(i in body for i in plain_ids), f"{path} holds an unkeyed chunk id"
        if path.suffix == ".parquet":
            assert body[:4] == b"PARE" and body[-4:] == b"PARE", path  # encrypted footer
    config = json.loads((repo / "config.json").read_text())
    assert config["features"]["incompat"] == ["encryption"]
    assert config["encryption"] == {"algorithm": "aes-256-gcm", "kdf": "argon2id"}
    # And yet everything works: restore, verify, DuckDB analytics over the encrypted catalog.
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", point_ids(cli, repo)[-1], out).code == 0
    assert out.read_bytes() == data
    assert cli("-r", repo, "verify", "--read-data").code == 0
    res = cli("-r", repo, "query", "SELECT count(*) AS n FROM chunks", "--format", "json")
    assert res.code == 0 and json.loads(res.out)["rows"][0]["n"] > 10
    res = cli("-r", repo, "query", "SELECT count(*) AS n FROM changes", "--format", "json")
    assert res.code == 0 and json.loads(res.out)["rows"][0]["n"] > 0
    assert cli("-r", repo, "report", "growth").code == 0
    # Without the key DuckDB cannot read the catalog at all.
    segment = next(iter(repo_files(repo, "index")))
    with pytest.raises(duckdb.Error):
        duckdb.connect().execute(f"SELECT * FROM read_parquet('{segment}')").fetchall()


def test_plain_repository_has_no_keys(cli: CliRunner, tmp_path: Path) -> None:
    repo = tmp_path / "plain"
    res = cli("-r", repo, "init", "--encryption", "none")
    assert res.code == 0 and "unencrypted" in res.out
    assert "encryption" not in json.loads((repo / "config.json").read_text())
    assert not (repo / "keys").exists()
    assert_one_line_error(cli("-r", repo, "key", "list"), "not encrypted", code=3)


def _rename_to_content(path: Path, length: int) -> Path:
    """What an attacker who recomputes names does: the file is named by its new content."""
    body = path.read_bytes()
    new = path.with_name(blake3.blake3(body).hexdigest()[:length] + path.suffix)
    path.rename(new)
    return new


def test_tampering_is_detected_as_tampering(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory
) -> None:
    base, img = _backed_up(cli, tmp_path, make_image)
    original = img.path.read_bytes()

    def fresh(name: str) -> Path:
        repo = tmp_path / name
        shutil.copytree(base, repo)
        return repo

    # A point document re-sealed by someone without the key: authentication fails, the
    # point is skipped with a warning naming it, the other point still restores.
    repo = fresh("points")
    doc = sorted(repo_files(repo, "points"))[-1]
    env = json.loads(doc.read_text())
    sealed = bytearray(base64.b64decode(env["data"]))
    sealed[20] ^= 1
    env["data"] = base64.b64encode(bytes(sealed)).decode()
    doc.write_text(json.dumps(env, sort_keys=True) + "\n")
    _rename_to_content(doc, 16)
    res = cli("-r", repo, "points")
    assert res.code == 0 and "fails authentication" in res.err
    assert_one_line_error(cli("-r", repo, "verify"), "fails authentication")

    # An index segment renamed to its new content: Parquet decryption refuses it.
    repo = fresh("index")
    seg = sorted(repo_files(repo, "index"))[0]
    flip_byte(seg, seg.stat().st_size // 2)
    _rename_to_content(seg, 64)
    res = cli("-r", repo, "verify")
    assert res.code != 0 and "fails authentication" in res.out + res.err

    # A blob changed in a pack: the chunk fails authentication (not decompression or id).
    repo = fresh("blob")
    pack = max(repo_files(repo, "packs"), key=lambda p: p.stat().st_size)
    flip_byte(pack, PACK_HEADER_BYTES + 40)
    res = cli("-r", repo, "restore", point_ids(cli, repo)[0], tmp_path / "x.img")
    assert_one_line_error(res, "fails authentication", code=7)
    res = cli("-r", repo, "scrub")
    assert res.code == 7 and "fails authentication" in res.err

    # Two blobs swapped (valid ciphertexts moved): the chunk id is bound to each blob.
    repo = fresh("swap")
    pack = max(repo_files(repo, "packs"), key=lambda p: p.stat().st_size)
    body = bytearray(pack.read_bytes())
    n = CHUNK // 4
    a, b = PACK_HEADER_BYTES, len(body) - PACK_TRAILER_BYTES - 4 * n
    body[a : a + n], body[b : b + n] = body[b : b + n], body[a : a + n]
    pack.write_bytes(bytes(body))
    res = cli("-r", repo, "verify", "--read-data")
    assert res.code != 0

    # The entry table of a pack: scrub still finds it without the key (entries hash), and
    # repair index reports the pack instead of trusting it.
    repo = fresh("table")
    pack = max(repo_files(repo, "packs"), key=lambda p: p.stat().st_size)
    flip_byte(pack, pack.stat().st_size - PACK_TRAILER_BYTES - 5)
    assert cli("-r", repo, "scrub").code != 0
    res = cli("-r", repo, "repair", "index")
    assert "entry table" in res.out + res.err

    # config.json rewritten to claim "not encrypted": refused, not read as plain.
    repo = fresh("config")
    cfg = json.loads((repo / "config.json").read_text())
    cfg["features"]["incompat"] = []
    del cfg["encryption"]
    (repo / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("-r", repo, "points"), "tampered", code=3)

    # A damaged key file: the one key is unusable, said in one line.
    repo = fresh("key")
    key = next(iter(repo_files(repo, "keys")))
    kdoc = json.loads(key.read_text())
    kdoc["kdf"]["memory_kib"] = 1
    key.write_text(json.dumps(kdoc))
    crypto.forget_unlocked()
    assert_one_line_error(cli("-r", repo, "points"), "not a valid key file", code=7)

    # The untouched repository still restores identically.
    out = tmp_path / "ok.img"
    assert cli("-r", base, "restore", point_ids(cli, base)[-1], out).code == 0
    assert out.read_bytes() == original


def test_overlays_are_sealed(cli: CliRunner, tmp_path: Path, make_image: ImageFactory) -> None:
    """A writable overlay's writes and document are sealed too; they read back through the
    writer, the read-only reader and a backup of the overlay; tampering is refused."""
    import drive.overlays.overlay as overlay
    from catalog.repo import Repository
    from drive.overlays.overlay import Overlay
    from drive.overlays.reader import OverlayReader

    repo, img = _backed_up(cli, tmp_path, make_image)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "vm", r.resolve(point_ids(cli, repo)[-1]))
    ov = Overlay(r, "vm")
    secret = MARKER + b"written by the guest " * 50
    ov.write(7 * CHUNK + 10, secret)
    ov.write(7 * CHUNK + 100, b"X" * 10)  # splits the first record's run in the map
    ov.zero(9 * CHUNK, CHUNK)
    ov.flush()
    assert ov.read_piece(ov.pieces(7 * CHUNK + 10, 5)[0]) == secret[:5]
    ov.close()
    expected = bytearray(img.path.read_bytes())
    expected[7 * CHUNK + 10 : 7 * CHUNK + 10 + len(secret)] = secret
    expected[7 * CHUNK + 100 : 7 * CHUNK + 110] = b"X" * 10
    expected[9 * CHUNK : 10 * CHUNK] = bytes(CHUNK)
    for path in _all_files(repo):
        body = path.read_bytes()
        assert MARKER not in body and b"secret-source-name" not in body, path
    reader = OverlayReader(r, "vm")
    assert reader.read(0, len(expected)) == bytes(expected)
    reader.close()
    again = Overlay(r, "vm")  # replay authenticates every record
    got = b"".join(again.read_piece(p) for p in again.pieces(7 * CHUNK, CHUNK))
    assert secret[:90] + b"X" * 10 + secret[100:200] in got
    again.close()
    assert cli("-r", repo, "backup", "overlay:vm").code == 0
    out = tmp_path / "ov.img"
    assert cli("-r", repo, "restore", point_ids(cli, repo)[-1], out).code == 0
    assert out.read_bytes() == bytes(expected)
    assert cli("-r", repo, "verify").code == 0
    # A forged record (payload changed, checksum recomputed): authentication fails.
    log = next(p for p in (repo / "overlays" / "vm").iterdir() if p.name.startswith("log-"))
    import drive.overlays.log as L

    rec = bytearray(log.read_bytes())
    rec[L.HEADER_BYTES + 30] ^= 1
    head = bytes(rec[: L.HEADER_BYTES])
    _m, kind, flags, _o, length, _d = L.HEADER.unpack(head)
    stored = L.stored_length(kind, flags, length)
    payload = bytes(rec[L.HEADER_BYTES : L.HEADER_BYTES + stored])
    rec[24 : L.HEADER_BYTES] = L.checksum(head[:24], payload)
    log.write_bytes(bytes(rec))
    res = cli("-r", repo, "verify")
    assert res.code != 0 and "fails authentication" in res.out + res.err


def test_purposes_table_matches_the_code() -> None:
    from spectables import spec_table

    assert tuple(r["Purpose"].strip("`") for r in spec_table("purposes")) == crypto.PURPOSES
    keys = crypto.AesGcmSealer.from_master(bytes(64))
    derived = [keys.id_key, keys.blob_key, keys.table_key, keys.doc_key, keys.parquet_key]
    derived.append(keys.record_key)
    assert len(set(derived)) == len(crypto.PURPOSES) and all(len(k) == 32 for k in derived)
    assert "key" not in repr(keys).lower().replace("aesgcmsealer", "")


def test_review_fixes_overlay_records_keys_config_locks(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a security review: a sealed overlay record appended to another overlay's log is
    refused; a config claiming "plain" is refused even with keys/ deleted; a malformed key
    file does not lock the others out; lock files do not name the source."""
    import drive.overlays.overlay as overlay
    from catalog.repo import Repository
    from drive.overlays.overlay import Overlay
    from pipeline import locking

    repo, img = _backed_up(cli, tmp_path, make_image)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    base = r.resolve(point_ids(cli, repo)[-1])
    for name in ("ova", "ovb"):
        overlay.create(r, name, base)
        ov = Overlay(r, name)
        ov.write(4096, (name.encode() + b"-secret ") * 64)
        ov.flush()
        ov.close()
    assert cli("-r", repo, "verify").code == 0
    logs = {n: next((repo / "overlays" / n).glob("log-*.dat")) for n in ("ova", "ovb")}
    moved = logs["ova"].read_bytes()
    with open(logs["ovb"], "ab") as fh:
        fh.write(moved)
    res = cli("-r", repo, "verify")
    assert res.code != 0 and "overlay ovb" in res.err and "fails authentication" in res.err
    logs["ovb"].write_bytes(logs["ovb"].read_bytes()[: -len(moved)])
    assert cli("-r", repo, "verify").code == 0

    with monkeypatch.context() as m:  # the lock names the command, not the source
        m.setattr("sys.argv", ["comb", "backup", str(img.path)])
        with locking.writer_lock(r, "backup"):
            (lock,) = (repo / "locks").iterdir()
            assert str(img.path) not in lock.read_text() and "backup" in lock.read_text()

    fake = tmp_path / "fake"
    shutil.copytree(repo, fake)
    shutil.rmtree(fake / "keys")
    cfg = json.loads((fake / "config.json").read_text())
    cfg["features"]["incompat"] = []
    del cfg["encryption"]
    (fake / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("-r", fake, "points"), "sealed point documents", code=3)
    for sub in ("points",):
        shutil.rmtree(fake / sub)
    assert_one_line_error(cli("-r", fake, "points"), "encrypted index segments", code=3)
    shutil.rmtree(fake / "index")
    assert_one_line_error(cli("-r", fake, "backup", img.path), "sealed packs", code=3)

    (key,) = repo_files(repo, "keys")
    bad = key.with_name("0000000000000000.json")
    kdoc = json.loads(key.read_text())
    kdoc["wrapped"] = "AAAA"
    bad.write_text(json.dumps(kdoc))
    crypto.forget_unlocked()
    assert cli("-r", repo, "points").code == 0  # the good key still opens it
    key.unlink()
    crypto.forget_unlocked()
    assert_one_line_error(cli("-r", repo, "points"), "not a valid key file", code=7)


@pytest.mark.ray
def test_overlay_backup_on_ray_with_a_password_file(
    cli: CliRunner, tmp_path: Path, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers get the driver's keys: they cannot read a password file or prompt."""
    import drive.overlays.overlay as overlay
    from catalog.repo import Repository
    from drive.overlays.overlay import Overlay

    repo, img = _backed_up(cli, tmp_path, make_image)
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    overlay.create(r, "vm", r.resolve(point_ids(cli, repo)[-1]))
    ov = Overlay(r, "vm")
    ov.write(0, b"guest wrote this " * 100)
    ov.close()
    pw = tmp_path / "pw"
    pw.write_text(TEST_PASSWORD)
    monkeypatch.delenv("COMB_PASSWORD")
    crypto.forget_unlocked()
    res = cli("--password-file", pw, "-r", repo, "backup", "overlay:vm", "--engine", "ray")
    assert res.code == 0, res.err
    out = tmp_path / "ov.img"
    latest = Repository.open(str(repo), password=TEST_PASSWORD).points()[-1].id
    assert cli("--password-file", pw, "-r", repo, "restore", latest, out).code == 0
    assert out.read_bytes()[:17] == b"guest wrote this "


@pytest.mark.parametrize("into", [True, False])
def test_a_blob_sealed_into_its_place_opens_like_a_sealed_one(
    monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    """The compressor seals each blob straight into the batch's column (``seal_blob_into``,
    with or without cryptography's ``encrypt_into``): the same envelope ``open_blob`` opens,
    bound to its chunk id, with a fresh nonce; a buffer of the wrong size is refused."""
    import numpy as np

    monkeypatch.setattr(crypto, "_ENCRYPT_INTO", into and crypto._ENCRYPT_INTO)
    sealer = crypto.AesGcmSealer.from_master(bytes(range(64)))
    blob, cid = MARKER * 100, blake3.blake3(b"id").digest()
    out = np.zeros(len(blob) + sealer.overhead, np.uint8)
    sealer.seal_blob_into(blob, cid, memoryview(out))
    assert bytes(sealer.open_blob(out.tobytes(), cid, "t")) == blob
    assert MARKER not in out.tobytes()
    other = np.zeros_like(out)
    sealer.seal_blob_into(memoryview(blob), cid, memoryview(other))
    assert other[: crypto.NONCE_BYTES].tobytes() != out[: crypto.NONCE_BYTES].tobytes()
    with pytest.raises(Exception, match="authentication"):
        sealer.open_blob(out.tobytes(), blake3.blake3(b"another").digest(), "t")
    with pytest.raises((ValueError, TypeError)):
        sealer.seal_blob_into(blob, cid, memoryview(np.zeros(len(blob), np.uint8)))
