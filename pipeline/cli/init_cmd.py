"""``comb init``: create a repository (chunk size, compression level, parity, encryption)."""

from __future__ import annotations

import argparse

from catalog.errors import UsageError
from catalog.repo import Repository
from catalog.store import s3_lock
from catalog.store.format import DEFAULT_CHUNK_SIZE_BYTES
from catalog.store.parity import ParityGeometry

from ..console import note, print_json
from . import Subparsers, command
from .passwords import other_password_source

FROM_PASSWORD_ENV = "COMB_FROM_PASSWORD"
FROM_PASSWORD_FILE_ENV = "COMB_FROM_PASSWORD_FILE"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "init",
        "create a repository (encrypted, with parity, unless told otherwise)",
        [
            "comb -r /backup/repo init",
            "COMB_PASSWORD_FILE=/root/.comb-pass comb -r /backup/repo init --zstd-level 3",
            "comb init -r /backup/plain --encryption none --parity-overhead 0",
            "comb -r s3://bucket/offsite init --copy-keys-from /backup/repo",
        ],
        json="print the new repository's settings as one JSON object",
    )
    s.add_argument(
        "--chunk-size", type=int, default=None, help="chunk size in bytes (default 65536)"
    )
    s.add_argument(
        "--zstd-level",
        type=int,
        default=None,
        help="compression level of new chunks, 1 to 19 (default 1)",
    )
    s.add_argument(
        "--parity-overhead",
        default=None,
        metavar="PCT",
        help="parity per pack in percent of its size, in steps of 6.25 (default 12.5: heals any "
        "2 damaged 256 KiB shards per 4 MiB stripe); 0 or none: no parity",
    )
    s.add_argument(
        "--encryption",
        choices=["aes-256-gcm", "none"],
        default="aes-256-gcm",
        help="encrypt everything stored (default) or nothing",
    )
    s.add_argument(
        "--object-lock",
        type=int,
        metavar="DAYS",
        help="S3 only, in a bucket made with Object Lock: packs, parity, manifests and point "
        "documents cannot be deleted for DAYS after they are written (live ones are extended)",
    )
    s.add_argument(
        "--object-lock-mode",
        choices=["governance", "compliance"],
        default=None,
        help="governance (default: an account allowed to bypass it may shorten it) or "
        "compliance (nobody can, not even the root account)",
    )
    s.add_argument(
        "--copy-keys-from",
        metavar="REPO",
        help="share REPO's chunk ids (its chunk size and chunk-id key): `comb copy` between the "
        "two then skips reading what the target holds (the other keys stay the new one's own)",
    )
    s.add_argument(
        "--from-password-file",
        metavar="FILE",
        help=f"the password of --copy-keys-from REPO (else {FROM_PASSWORD_FILE_ENV}, "
        f"{FROM_PASSWORD_ENV}, or the new repository's password)",
    )
    s.set_defaults(run=cmd_init)


def cmd_init(repo: str, args: argparse.Namespace) -> int:
    if args.object_lock_mode is not None and args.object_lock is None:
        raise UsageError("--object-lock-mode needs --object-lock DAYS")
    lock = None
    if args.object_lock is not None:
        if args.object_lock < 1:
            raise UsageError("--object-lock DAYS must be at least 1")
        lock = (args.object_lock, (args.object_lock_mode or "governance").upper())
    parity = (
        ParityGeometry()
        if args.parity_overhead is None
        else ParityGeometry.from_overhead(args.parity_overhead)
    )
    ids_from = None  # (opened once the other options are known to be good)
    if args.copy_keys_from is not None:
        password = other_password_source(
            args.from_password_file, FROM_PASSWORD_ENV, FROM_PASSWORD_FILE_ENV, args.password
        )
        ids_from = Repository.open(args.copy_keys_from, password=password)
        if args.chunk_size is None:
            args.chunk_size = ids_from.config.chunk_size
    elif args.from_password_file is not None:
        raise UsageError("--from-password-file goes with --copy-keys-from")
    r = Repository.init(
        repo,
        args.chunk_size or DEFAULT_CHUNK_SIZE_BYTES,
        args.zstd_level,
        parity,
        encryption=args.encryption,
        password=args.password,
        object_lock=lock,
        ids_from=ids_from,
    )
    g = r.config.parity
    kept = s3_lock.versions_kept(r.storage)
    if kept:
        note(kept)
    if args.json:
        print_json(
            {
                "repository": r.location,
                "id": r.config.id,
                "chunk_size": r.config.chunk_size,
                "zstd_level": r.config.zstd_level,
                "encryption": (r.config.encryption or {}).get("algorithm"),
                "object_lock": r.config.object_lock,
                "shares_chunk_ids_with": ids_from.location if ids_from is not None else None,
                "parity": None
                if g is None
                else {
                    "data_shards": g.data_shards,
                    "parity_shards": g.parity_shards,
                    "shard_bytes": g.shard_bytes,
                    "overhead": g.overhead,
                },
            }
        )
        return 0
    how = f"encrypted, {r.config.encryption['algorithm']}" if r.config.encryption else "unencrypted"
    print(
        f"created repository {r.location} (id {r.config.id[:16]}, chunk size "
        f"{r.config.chunk_size}, zstd level {r.config.zstd_level}, {how}, "
        + (
            f"parity {g.data_shards}+{g.parity_shards} shards of {g.shard_bytes // 1024} KiB, "
            f"{g.overhead * 100:g} %)"
            if g
            else "no parity)"
        )
        + (
            f"; Object Lock {r.config.object_lock['mode'].lower()}, "
            f"{r.config.object_lock['days']} day(s)"
            if r.config.object_lock
            else ""
        )
        + (f"; chunk ids shared with {ids_from.location}" if ids_from is not None else "")
    )
    return 0
