"""How the frozen golden repositories of format version 1 (tests/data/golden-v1/, plain, and
tests/data/golden-v1-sealed/, encrypted) were made.

DO NOT RE-RUN THIS TO "UPDATE" A GOLDEN REPOSITORY. They are frozen: they are the proof that
repositories written by comb's first format version keep opening, verifying and restoring with
every later comb. If a change to comb makes tests/catalog/test_golden*.py fail, the change broke
format compatibility; fix the change (or add a reader for version 1), never the golden data.
A new format version gets a new directory (golden-v2/) made by a copy of this script.

golden-v1 (plain) was made in a checkout of comb at format version 1, before locks, parity,
encryption and change tables existed (its ``init`` wrote a plain repository without parity), with:

    python tests/data/make_golden.py --out tests/data/golden-v1

golden-v1-sealed (encrypted) was made later, still at format version 1, in a checkout of commit
ea8eb82 (the last commit before the catalog/ restructure, 5693011): this script, with the
``--encrypted`` option added, was copied into that checkout and run there with that checkout's
packages (the script puts its own checkout first on ``sys.path`` and refuses to run if
``catalog`` is imported from elsewhere):

    python tests/data/make_golden.py --out tests/data/golden-v1-sealed --encrypted

It is the same image and the same three points, but ``init --encryption aes-256-gcm`` with the
password ``golden-password`` (PASSWORD below; recorded in the .json) and that commit's defaults
otherwise: one Argon2id key file (64 MiB, 3 passes, 4 lanes, stored in the key file), parity at
12.5 % (16+2 shards of 256 KiB), block lists and change tables, every document, table and pack
sealed (FORMAT.md section 21); 29 files, 155,520 bytes. That commit names the analytics views
module ``catalog.views`` (later ``catalog.analytics.views``); query() takes either. Its .json
also records the commit it was made by (``made_by_commit``), the key file's cost and the parity.

Either command refuses to write into an existing directory. It writes the repository to ``OUT``
and what the tests expect of it (SHA-256 of the image at every point, stored bytes, the file
list) to ``OUT.json``.

golden-v1 was regenerated once, before the first release, because the point-id rule changed: the
id became the first 16 hex digits of the BLAKE3 of the point document's exact bytes, and the
document no longer holds an ``id`` field (it used to hash a canonical JSON form of the body).
No repository of the old rule was ever released, so no reader for it exists. The packs came out
byte-identical; the Parquet files changed too (they now carry page checksums). That was the
only regeneration: from the first release on, golden-v1 is frozen as described above.
golden-v1-sealed was never regenerated.

The source image is deterministic (seeded generator, fixed offsets); only the repository id,
the point times (and so the point ids) and ``source_path`` differ between runs (and, encrypted,
the keys, salts and nonces: the bytes and names of every sealed file). Chunk size is the
default 64 KiB, a leaf 16 chunks (1 MiB). The image has 5 leaves, the last one partial:

point 1 ("full", 4 MiB + 12345 bytes):
    chunk 0       64 KiB random (stored raw: zstd cannot shrink it)
    chunk 1       compressible text (zstd)
    chunks 2-3    explicit zero bytes (read, recognised as zero, never stored)
    chunk 4       4 KiB random, then a hole (read as one chunk: data + zeros)
    chunks 5-31   hole (never read; leaf 1 is entirely a hole)
    chunks 32-39  compressible text, each chunk different
    chunk 40      a copy of chunk 1 (deduplicated inside the point)
    chunk 48      compressible text
    chunk 63      a hole, then 16 KiB random at its end
    chunk 64      12345 bytes of text: the partial last chunk
point 2 ("changed-extents", grown to 4 MiB + 100000 bytes), with a change list of:
    4 KiB random into chunk 1; 4 KiB text into the hole at 1 MiB + 300 KiB (a new leaf 1);
    64 KiB of zeros over chunk 4 (data becomes a zero chunk); an over-reported extent in
    chunk 48 that did not change (its leaf stays shared); text written after the old end
    (growth: the old partial chunk 64 is re-read and becomes a full chunk; the new partial last
    chunk 65 holds text, then a hole).
    Leaf 2 is not in the change list and is shared with point 1.
point 3 ("full-reread": no change list, everything is read again):
    zeros over chunk 0; chunk 1 back to its point-1 content (deduplicated against point 1);
    4 KiB random into chunk 48. Leaves 1, 2 and 4 are shared (with points 2, 1 and 2).

Backups run with ``--engine local --workers 1`` so that pack contents do not depend on thread
timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from typing import Any

# The checkout this script sits in (tests/data/make_golden.py): its packages, not an installed
# comb's, must write the repository.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 64 * 1024
LEAF = 16 * CHUNK
SEED = 20261124
SIZE_1 = 4 * LEAF + 12345
SIZE_2 = 4 * LEAF + 100000
SOURCE_NAME = "golden"
PASSWORD = "golden-password"  # of golden-v1-sealed (--encrypted); a test password, not a secret


def text(n: int, tag: str) -> bytes:
    """n bytes of compressible but chunk-unique text."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{tag} line {i:06d}: the quick brown comb skips over the lazy block\n".encode()
        i += 1
    return bytes(out[:n])


def pwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def make_v1(path: str, rng: random.Random) -> None:
    with open(path, "wb") as fh:
        fh.truncate(SIZE_1)  # all hole
    pwrite(path, 0 * CHUNK, rng.randbytes(CHUNK))
    pwrite(path, 1 * CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 2 * CHUNK, bytes(2 * CHUNK))
    pwrite(path, 4 * CHUNK, rng.randbytes(4096))
    for c in range(32, 40):
        pwrite(path, c * CHUNK, text(CHUNK, f"chunk-{c}"))
    pwrite(path, 40 * CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 48 * CHUNK, text(CHUNK, "chunk-48"))
    pwrite(path, 64 * CHUNK - 16384, rng.randbytes(16384))
    pwrite(path, 64 * CHUNK, text(SIZE_1 - 64 * CHUNK, "tail"))


def make_v2(path: str, rng: random.Random) -> list[dict[str, int]]:
    """Apply point 2's changes; returns the change list (what change tracking would report)."""
    with open(path, "r+b") as fh:
        fh.truncate(SIZE_2)
    pwrite(path, CHUNK + 8192, rng.randbytes(4096))
    pwrite(path, LEAF + 300 * 1024, text(4096, "leaf-1"))
    pwrite(path, 4 * CHUNK, bytes(CHUNK))
    pwrite(path, SIZE_1, text(60000, "grown"))
    return [
        {"offset": CHUNK + 8192, "length": 4096},
        {"offset": LEAF + 300 * 1024, "length": 4096},
        {"offset": 4 * CHUNK, "length": CHUNK},
        {"offset": 48 * CHUNK + 1000, "length": 2000},  # over-reported: nothing changed there
        # The growth [SIZE_1, SIZE_2) is added by comb itself (the source grew).
    ]


def make_v3(path: str, rng: random.Random) -> None:
    pwrite(path, 0, bytes(CHUNK))
    pwrite(path, CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 48 * CHUNK + 20000, rng.randbytes(4096))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def comb(*argv: str) -> None:
    from pipeline.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"comb {' '.join(argv)} failed with exit code {code}")


def query(repo: str, sql: str, password: str | None) -> list[dict[str, Any]]:
    from catalog.repo import Repository

    try:
        from catalog.analytics.views import connect, run_query
    except ImportError:  # before the restructure (commit 5693011): catalog/views.py
        from catalog.views import connect, run_query  # type: ignore[no-redef]

    r = Repository.open(repo, password=password)
    return run_query(connect(r.storage, r.points()), sql).to_pylist()  # type: ignore[no-any-return]


def git_commit() -> str:
    """The commit of the checkout this script runs in; refuses a checkout with changes to
    anything but this script (a copy of a later version of it may be run in an older checkout)."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()

    script = os.path.relpath(os.path.abspath(__file__), CHECKOUT).replace(os.sep, "/")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":!{script}")
    if dirty:
        raise SystemExit(f"{CHECKOUT} has uncommitted changes:\n{dirty}")
    return git("rev-parse", "HEAD")


def make(out: str, encrypted: bool) -> dict[str, Any]:
    from catalog.repo import Repository

    commit = git_commit() if encrypted else None
    rng = random.Random(SEED)
    work = tempfile.mkdtemp(prefix="comb-golden-")
    password = PASSWORD if encrypted else None
    try:
        img = os.path.join(work, "disk.img")
        backup = ("backup", img, "--engine", "local", "--workers", "1")
        repo: tuple[str, ...] = ("-r", out)
        if encrypted:
            password_file = os.path.join(work, "password")
            with open(password_file, "w") as fh:
                fh.write(PASSWORD + "\n")
            repo = ("--password-file", password_file, *repo)
            comb(*repo, "init", "--encryption", "aes-256-gcm")
        else:
            comb(*repo, "init")  # the init of golden-v1's time: plain, no parity
        make_v1(img, rng)
        digests = [sha256(img)]
        comb(*repo, *backup, "--source-name", SOURCE_NAME)
        changes = make_v2(img, rng)
        changes_path = os.path.join(work, "changes.json")
        with open(changes_path, "w") as fh:
            json.dump(changes, fh)
        digests.append(sha256(img))
        comb(*repo, *backup, "--source-name", SOURCE_NAME, "--changed-extents", changes_path)
        make_v3(img, rng)
        digests.append(sha256(img))
        comb(*repo, *backup, "--source-name", SOURCE_NAME)
    finally:
        shutil.rmtree(work)
    points = Repository.open(out, password=password).points()
    manifests = {
        r["point_id"]: r
        for r in query(
            out,
            "SELECT point_id, count(*) AS data_chunks, CAST(sum(length) AS BIGINT) AS data_bytes "
            "FROM manifests GROUP BY point_id",
            password,
        )
    }
    chunks = query(
        out,
        "SELECT count(*) AS chunks, count(DISTINCT pack) AS packs, "
        "CAST(sum(stored_len) AS BIGINT) AS stored_bytes, "
        "CAST(sum(raw_len) AS BIGINT) AS raw_bytes FROM chunks",
        password,
    )[0]
    # Git keeps no empty directories: drop them here so the tests see what a checkout has.
    for d in ("locks", "tmp"):
        path = os.path.join(out, d)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    files = sorted(
        os.path.relpath(os.path.join(dp, f), out).replace(os.sep, "/")
        for dp, _dirs, fs in os.walk(out)
        for f in fs
    )
    name = os.path.basename(out)
    facts: dict[str, Any] = {
        "comment": f"Expected facts of {name}, written by tests/data/make_golden.py. Frozen.",
        "format_version": 1,
        "source": SOURCE_NAME,
        "changed_extents_of_point_2": changes,
        "points": [
            {
                "id": p.id,
                "mode": p.mode,
                "parent": p.parent,
                "size": p.size,
                "sha256": digest,
                "bytes_stored": p.stats.bytes_stored,
                "data_chunks": manifests[p.id]["data_chunks"],
                "data_bytes": manifests[p.id]["data_bytes"],
            }
            for p, digest in zip(points, digests, strict=True)
        ],
        "chunks": chunks,
        "files": files,
    }
    if encrypted:
        with open(os.path.join(out, "config.json")) as fh:
            config = json.load(fh)
        facts["made_by_commit"] = commit
        facts["encryption"] = config["encryption"]
        facts["parity"] = config.get("parity")
        facts["password"] = PASSWORD
        facts["key_files"] = [
            {"id": f.split("/")[1].removesuffix(".json"), "kdf": key_kdf(os.path.join(out, f))}
            for f in files
            if f.startswith("keys/")
        ]
    return facts


def key_kdf(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)["kdf"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new directory for the repository")
    ap.add_argument(
        "--encrypted",
        action="store_true",
        help=f"init with --encryption aes-256-gcm and the password {PASSWORD!r}",
    )
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out) or os.path.exists(out + ".json"):
        print(f"{out} (or {out}.json) exists: golden repositories are frozen", file=sys.stderr)
        return 1
    sys.path.insert(0, CHECKOUT)
    import catalog

    if os.path.dirname(os.path.dirname(os.path.abspath(catalog.__file__))) != CHECKOUT:
        print(f"catalog imported from {catalog.__file__}, not from {CHECKOUT}", file=sys.stderr)
        return 1
    expected = make(out, args.encrypted)
    with open(out + ".json", "w") as fh:
        json.dump(expected, fh, indent=2, sort_keys=True)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in expected["files"])
    print(f"wrote {out} ({len(expected['files'])} files, {total} bytes) and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
