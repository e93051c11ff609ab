"""FORMAT.md's encryption tables (sections 2.1-2.3, 21) against the code, and an encrypted
repository written by the code read and restored with nothing but FORMAT.md's rules and
standard primitives (BLAKE3, AES-GCM, Argon2id, Parquet modular encryption).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import blake3
import pyarrow.parquet as pq
import pytest
from combtest import TEST_PASSWORD, Image, api_backup, need_tool
from cryptography.exceptions import InvalidTag
from specparquet import spec_parquet
from spectables import (
    SpecBlockList,
    SpecKeys,
    SpecPack,
    seal_overhead,
    section,
    spec_decode,
    spec_point_id,
    spec_records,
    spec_struct,
    spec_table,
)

import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store import crypto
from catalog.store.local import LocalStorage
from pipeline.jobs.index import index_point

CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Tables


def test_seal_table_matches_code() -> None:
    rows = {r["Part"]: r for r in spec_table("seal")}
    assert list(rows) == ["nonce", "ciphertext", "tag"]
    assert rows["nonce"]["Offset"] == "0"
    assert int(rows["nonce"]["Size"]) == crypto.NONCE_BYTES
    assert rows["ciphertext"]["Offset"] == str(crypto.NONCE_BYTES)
    assert int(rows["tag"]["Size"]) == crypto.TAG_BYTES
    assert seal_overhead() == crypto.SEAL_OVERHEAD_BYTES


def test_associated_data_table_names_every_sealed_object() -> None:
    """One row per kind of sealed object (each is opened from code-made bytes in the tests
    below), its key a purpose of section 21.1 (or the password's KEK) and its section real."""
    rows = spec_table("associated-data")
    assert [r["Sealed object"] for r in rows] == [
        "master secret in a key file",
        "shared chunk-id key in config.json",
        "blob",
        "pack entry table",
        "point document",
        "block list",
        "file catalog document",
        "overlay.json",
        "overlay data record payload",
        "Parquet file",
    ]
    purposes = {r["Purpose"] for r in spec_table("purposes")}
    assert {r["Key"] for r in rows} == (purposes - {"chunk id"}) | {"KEK", "shared chunk id"}
    for r in rows:
        section(r["Section"])


def _flat(doc: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in doc.items():
        out[k] = v
        if isinstance(v, dict):
            out |= {f"{k}.{sub}": w for sub, w in v.items()}
    return out


_JSON_TYPES = {str: "string", int: "integer", dict: "object"}


def test_key_file_table_matches_code() -> None:
    master = bytes(range(64))
    raw = crypto.make_key_file("ab" * 16, master, "pässword")
    doc = _flat(json.loads(raw))
    rows = {r["Field"]: r for r in spec_table("key-file")}
    assert {k: _JSON_TYPES[type(v)] for k, v in doc.items()} == {
        k: r["JSON type"] for k, r in rows.items()
    }
    for name, row in rows.items():
        if row["Written"]:
            assert doc[name] == json.loads(row["Written"]), name
    # The spec alone opens it: Argon2id over the UTF-8 password, the master secret sealed with
    # the config id as associated data.
    assert SpecKeys(raw, "pässword", "ab" * 16).master == master
    with pytest.raises(InvalidTag):
        SpecKeys(raw, "pässword", "cd" * 16)  # another repository's id


def _bounds(cell: str) -> tuple[str, int, int]:
    """'`A` to `B`' (an integer range) or '`N` bytes' (a base64-decoded length)."""
    if m := re.fullmatch(r"`(\d+)` to `(\d+)`", cell):
        return "int", int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"`(\d+)` bytes", cell)
    assert m, cell
    return "bytes", int(m.group(1)), int(m.group(1))


def _set(doc: dict[str, Any], name: str, value: Any) -> None:
    node = doc
    *path, last = name.split(".")
    for part in path:
        node = node[part]
    node[last] = value


@pytest.mark.parametrize("field", [r["Field"] for r in spec_table("key-file") if r["Accepted"]])
def test_key_file_bounds_match_code(tmp_path: Path, field: str) -> None:
    """A reader uses a key file exactly within the "Accepted" bounds of section 21.2."""
    storage = LocalStorage(str(tmp_path))
    (tmp_path / crypto.KEYS_PREFIX).mkdir()
    kind, low, high = _bounds(
        next(r for r in spec_table("key-file") if r["Field"] == field)["Accepted"]
    )
    base = json.loads(crypto.make_key_file("ab" * 16, bytes(64), "pw"))

    def accepted(value: int) -> bool:
        doc = json.loads(json.dumps(base))
        _set(doc, field, value if kind == "int" else base64.b64encode(bytes(value)).decode())
        doc["check"] = crypto.key_check(doc)  # a consistent file: only the bound is tested
        (tmp_path / crypto.key_name("0" * 16)).write_text(json.dumps(doc))
        try:
            crypto.read_key_doc(storage, "0" * 16)
        except CorruptionError:
            return False
        return True

    assert accepted(low) and accepted(high)
    assert not accepted(low - 1) and not accepted(high + 1)


def test_sealed_envelope_table_matches_code() -> None:
    master = bytes(range(64))
    keys = crypto.AesGcmSealer.from_master(master)
    plain = b'{"a": 1}\n'
    raw = keys.seal_doc(plain, "point")
    env = json.loads(raw)
    rows = {r["Field"]: r for r in spec_table("sealed-envelope")}
    assert {k: _JSON_TYPES[type(v)] for k, v in env.items()} == {
        k: r["JSON type"] for k, r in rows.items()
    }
    for name, row in rows.items():
        if row["Value"]:
            assert env[name] == json.loads(row["Value"])
    # What writers write (section 2.2): one sorted line and a newline.
    assert raw == (json.dumps(env, sort_keys=True) + "\n").encode()
    assert env["kind"] == "point"
    spec = SpecKeys(crypto.make_key_file("ab" * 16, master, "pw"), "pw", "ab" * 16)
    assert spec.open_envelope("point document", raw, {}) == plain
    with pytest.raises(InvalidTag):
        spec.open_envelope("block list", raw, {})  # opened as another kind


# ---------------------------------------------------------------------------------------------
# An encrypted repository read by the spec alone


def _columns(name: str) -> list[str]:
    return [r["Column"] for r in spec_table(name)]


class SpecRepo:
    """An encrypted repository read with FORMAT.md's rules: key file, purpose keys, envelopes,
    block lists, encrypted Parquet, sealed packs and blobs, keyed chunk ids."""

    def __init__(self, root: Path, password: str) -> None:
        self.root = root
        config = json.loads((root / "config.json").read_bytes())
        shared = config["features"]["incompat"] == ["encryption", "shared-ids"]
        assert shared or config["features"]["incompat"] == ["encryption"]
        plain_fields = {k: v for k, v in config["encryption"].items() if k != "id_key"}
        assert plain_fields == {"algorithm": "aes-256-gcm", "kdf": "argon2id"}
        assert shared == ("id_key" in config["encryption"])
        (key_file,) = sorted((root / "keys").glob("*.json"))
        assert re.fullmatch(r"[0-9a-f]{16}\.json", key_file.name)
        self.keys = SpecKeys(key_file.read_bytes(), password, config["id"])
        if shared:
            self.keys.share_ids(config)
        self.index: dict[bytes, dict[str, Any]] = {}
        for path in sorted((root / "index").glob("*.parquet")):
            stored = self._named(path)
            table = spec_parquet(stored, self.keys.keys["parquet"], _columns("schema-index"))
            for row in table.to_pylist():
                self.index.setdefault(row["chunk_id"], row)
        self.packs: dict[str, SpecPack] = {}
        self.data: dict[str, bytes] = {}

    def _named(self, path: Path) -> bytes:
        stored = path.read_bytes()
        assert blake3.blake3(stored).hexdigest() == path.name.split(".")[0]
        return stored

    def points(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted((self.root / "points").glob("*.json")):
            raw = path.read_bytes()
            assert spec_point_id(raw) == path.stem  # the id hashes the envelope
            plain = self.keys.open_envelope("point document", raw, {})
            out[path.stem] = json.loads(plain)
        return out

    def block_list(self, doc: dict[str, Any], kind: str, directory: str) -> SpecBlockList:
        """Section 7.1: the point's hash covers the stored envelope, which opens as `blocks`."""
        raw = (self.root / directory / f"{doc[kind]}.blocks").read_bytes()
        assert blake3.blake3(raw).hexdigest() == doc["blocks"][kind]
        assert json.loads(raw)["kind"] == "blocks"
        spec = SpecBlockList(self.keys.open_envelope("block list", raw, {}))
        spec.check_file((self.root / directory / f"{doc[kind]}.parquet").read_bytes())
        return spec

    def image(self, doc: dict[str, Any]) -> bytes:
        """Section 8.3, with the sealed steps."""
        key = self.keys.keys["parquet"]
        size, c, lc = doc["size"], doc["chunk_size"], doc["leaf_chunks"]
        out = bytearray(size)
        root = self._named(self.root / "manifests" / "roots" / f"{doc['root']}.parquet")
        for ref in spec_parquet(root, key, _columns("schema-root")).to_pylist():
            file = ref["leaf_file"] if ref["leaf_file"] is not None else doc["leaves"]
            leaves = self._named(self.root / "manifests" / "leaves" / f"{file}.parquet")
            table = spec_parquet(leaves, key, _columns("schema-leaves"))
            for r in (r for r in table.to_pylist() if r["leaf"] == ref["leaf"]):
                offset = (ref["leaf_no"] * lc + r["slot"]) * c
                length = min(c, size - offset)
                loc = self.index[r["chunk_id"]]
                pack = self._pack(loc["pack"])
                blob = self.data[loc["pack"]][loc["offset"] : loc["offset"] + loc["stored_len"]]
                entry = next(e for e in pack.entries if e["offset"] == loc["offset"])
                assert entry["stored_len"] == loc["stored_len"] and entry["flags"] == 1
                opened = self.keys.open("blob", blob, {"chunk id": r["chunk_id"]})
                assert len(blob) == len(opened) + seal_overhead()
                plain = spec_decode(opened, loc["codec"], loc["raw_len"])
                assert len(plain) == loc["raw_len"] == length
                assert self.keys.chunk_id(plain) == r["chunk_id"]
                out[offset : offset + length] = plain
        return bytes(out)

    def _pack(self, pack_id: str) -> SpecPack:
        if pack_id not in self.packs:
            stored = self._named(self.root / "packs" / pack_id[:2] / f"{pack_id}.pack")
            self.data[pack_id] = stored
            self.packs[pack_id] = SpecPack(
                stored,
                lambda t, h: self.keys.open("pack entry table", t, {"pack header": h}),
            )
        return self.packs[pack_id]


def test_spec_alone_reads_an_encrypted_repository(tmp_path: Path) -> None:
    """A full and a changed-extents backup and an overlay, written by comb into an encrypted
    repository, read back byte-identical with FORMAT.md alone."""
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir), password=TEST_PASSWORD)
    img = Image(tmp_path / "disk.img", 20 * CHUNK + 5000)
    img.random(0, 3 * CHUNK + 17, seed=1)  # raw chunks, one partly
    img.compressible(5 * CHUNK, 4 * CHUNK, seed=2)  # zstd chunks, dedup within
    img.random(20 * CHUNK, 5000, seed=3)  # partial last chunk
    img.take_changes()
    expected = {}
    first = api_backup(repo_dir, img.path, name="disk")
    expected[first.id] = img.path.read_bytes()
    img.random(CHUNK + 100, 3000, seed=4)
    img.zeros(6 * CHUNK, CHUNK)
    second = api_backup(repo_dir, img.path, img.changes_file(tmp_path / "changes.json"), "disk")
    expected[second.id] = img.path.read_bytes()
    assert second.mode == "changed-extents"

    spec = SpecRepo(repo_dir, TEST_PASSWORD)
    docs = spec.points()
    assert set(docs) == set(expected)
    for point_id, doc in docs.items():
        assert doc["format"] == "comb-point"
        assert spec.image(doc) == expected[point_id], point_id
        leaves = spec.block_list(doc, "leaves", "manifests/leaves")
        assert leaves.t["rows"] == 0 and leaves.ranges == []
        segment = spec.block_list(doc, "index_segment", "index")
        assert segment.t["rows"] > 0 and segment.ranges
    # Change tables are encrypted Parquet too; chunk keys come from the keyed ids.
    for doc in docs.values():
        stored = spec._named(repo_dir / "manifests" / "changes" / f"{doc['changes']}.parquet")
        rows = spec_parquet(stored, spec.keys.keys["parquet"], _columns("schema-changes"))
        assert rows.num_rows > 0

    # An overlay: overlay.json sealed as `overlay <name>`, data records sealed and bound to it.
    repo = Repository.open(str(repo_dir), password=TEST_PASSWORD)
    overlay.create(repo, "ov", repo.resolve(second.id))
    o = overlay.Overlay(repo, "ov")
    o.write(100, b"a" * 5000)
    o.zero(3 * CHUNK, CHUNK)
    o.write(2 * CHUNK + 1, b"b" * 70)
    o.close()
    ov_dir = repo_dir / "overlays" / "ov"
    raw = (ov_dir / "overlay.json").read_bytes()
    ov = json.loads(spec.keys.open_envelope("overlay.json", raw, {"overlay name": "ov"}))
    assert ov["base"] == second.id and re.fullmatch(r"[0-9a-f]{32}", ov["id"])
    with pytest.raises(InvalidTag):
        spec.keys.open_envelope("overlay.json", raw, {"overlay name": "other"})
    log = (ov_dir / "log-0.dat").read_bytes()
    got = []
    for rec, payload, at in spec_records(log):
        if rec["kind"] == 1:
            assert rec["flags"] == 1 and len(payload) == rec["length"] + seal_overhead()
            values = {
                "record header 0–23": log[at : at + 24],
                "overlay id": ov["id"],
                "log number": 0,
                "record offset": at,
            }
            payload = spec.keys.open("overlay data record payload", payload, values)
        else:
            assert rec["flags"] == 0
        got.append((rec["kind"], rec["offset"], rec["length"], payload))
    assert got == [
        (1, 100, 5000, b"a" * 5000),
        (2, 3 * CHUNK, CHUNK, b""),
        (1, 2 * CHUNK + 1, 70, b"b" * 70),
    ]


def test_keyed_chunk_ids_differ_between_repositories(tmp_path: Path) -> None:
    """Section 1: a chunk's id in an encrypted repository is keyed with that repository's key,
    so the same data has another id in another repository (and in a plain one)."""
    img = Image(tmp_path / "disk.img", CHUNK)
    img.random(0, CHUNK, seed=9)
    ids = []
    for name, encryption in (("a", "aes-256-gcm"), ("b", "aes-256-gcm"), ("c", "none")):
        repo_dir = tmp_path / name
        Repository.init(str(repo_dir), encryption=encryption, password=TEST_PASSWORD)
        api_backup(repo_dir, img.path, name="disk")
        if encryption == "none":
            (segment,) = (repo_dir / "index").glob("*.parquet")
            ids.append(pq.read_table(segment).column("chunk_id")[0].as_py())
            continue
        spec = SpecRepo(repo_dir, TEST_PASSWORD)
        (cid,) = spec.index
        assert spec.keys.chunk_id(img.path.read_bytes()) == cid
        ids.append(cid)
    assert ids[2] == blake3.blake3(img.path.read_bytes()).digest()
    assert len(set(ids)) == 3
    shutil.rmtree(tmp_path / "a")


def test_spec_alone_reads_a_repository_sharing_chunk_ids(tmp_path: Path) -> None:
    """Section 21.1, "Shared chunk-id key": a repository made with ``ids_from`` (``init
    --copy-keys-from``) read with FORMAT.md alone; its ids are the first repository's."""
    img = Image(tmp_path / "disk.img", 4 * CHUNK + 100)
    img.random(0, 4 * CHUNK + 100, seed=11)
    first, second = tmp_path / "first", tmp_path / "second"
    a = Repository.init(str(first), password=TEST_PASSWORD)
    Repository.init(str(second), password=TEST_PASSWORD, ids_from=a)
    expected = {}
    for repo_dir in (first, second):
        point = api_backup(repo_dir, img.path, name="disk")
        spec = SpecRepo(repo_dir, TEST_PASSWORD)
        (doc,) = spec.points().values()
        assert spec.image(doc) == img.path.read_bytes()
        expected[repo_dir.name] = (set(spec.index), spec.keys.keys["blob"], point.id)
    assert expected["first"][0] == expected["second"][0]  # the same ids
    assert expected["first"][1] != expected["second"][1]  # other keys of their own


def test_header_struct_of_sealed_pack_is_the_plain_one() -> None:
    """The sealed pack header differs from the plain one in the flags only (section 6.1)."""
    _struct, rows = spec_struct("pack-header")
    differ = [r["Field"] for r in rows if r["Plain"] != r["Sealed"]]
    assert differ == ["flags"]
    _struct, rows = spec_struct("pack-entry")
    assert [r["Field"] for r in rows if r["Plain"] != r["Sealed"]] == ["flags"]


def test_spec_alone_reads_a_sealed_file_catalog(tmp_path: Path) -> None:
    """Section 23 in an encrypted repository: the document opens as kind `files`, its full
    listing is encrypted Parquet with the columns of the spec, named by its stored bytes."""
    need_tool("mkfs.ext4")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("web01\n")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, image], check=True, capture_output=True)
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir), password=TEST_PASSWORD)
    point = api_backup(repo_dir, image, name="fs")
    index_point(Repository.open(str(repo_dir), password=TEST_PASSWORD), point)
    spec = SpecRepo(repo_dir, TEST_PASSWORD)
    raw = (repo_dir / "files" / f"{point.id}.json").read_bytes()
    assert json.loads(raw)["kind"] == "files"
    doc = json.loads(spec.keys.open_envelope("file catalog document", raw, {}))
    assert (doc["format"], doc["version"], doc["point"], doc["base"]) == (
        "comb-files",
        1,
        point.id,
        None,
    )
    stored = spec._named(repo_dir / "files" / f"{doc['full']}.parquet")
    rows = spec_parquet(stored, spec.keys.keys["parquet"], _columns("schema-files")).to_pylist()
    assert rows == sorted(rows, key=lambda r: (r["volume"], r["path"]))
    hostname = next(r for r in rows if r["path"] == b"/etc/hostname")
    assert (hostname["volume"], hostname["kind"], hostname["size"]) == ("disk", "file", 6)
    assert len(rows) == doc["entries"] == doc["added"]
    root = rows[0]  # "/": its spans lie in its deps' chunks, and its deps in `touched`
    assert (root["path"], root["kind"]) == (b"/", "dir")
    deps = struct.unpack(f"<{len(root['deps']) // 8}q", root["deps"])
    spans = struct.unpack(f"<{len(root['spans']) // 8}q", root["spans"])
    chunk = doc["chunk_size"]
    assert spans and set(deps) <= set(doc["touched"])
    for at, n in zip(spans[::2], spans[1::2], strict=True):
        assert n > 0 and {c * chunk for c in range(at // chunk, (at + n - 1) // chunk + 1)} <= set(
            deps
        )
    assert list(spans[::2]) == sorted(spans[::2])
