"""``comb key add | list | remove ID``: the passwords of an encrypted repository.

Each password wraps the same master secret in its own key file (``keys/<id>.json``), so adding
or removing one never rewrites data; it also means removing a key is not revoking it: a kept
copy of the file still opens the repository with its password (the master secret never
changes). The key the current password opened cannot be removed (prove another password
first), nor can the last one. Both take the exclusive ``key`` lock.
"""

from __future__ import annotations

import argparse

from catalog.errors import RepositoryError, UsageError
from catalog.repo import PasswordSource, Repository
from catalog.store import crypto
from catalog.store.locks import locked

from ..console import print_json
from . import Subparsers, actions, command
from .passwords import read_password


def add_parser(sub: Subparsers) -> None:
    json = "print the result as one JSON object"
    s = command(
        sub,
        "key",
        "add, list or remove the passwords of an encrypted repository",
        [
            "comb -r /backup/repo key",
            "comb -r /backup/repo key add --new-password-file /root/.comb-pass2",
            "comb -r /backup/repo key remove 3f2a",
        ],
        json,
    )
    acts = actions(s, "list")
    command(
        acts,
        "list",
        "list the key files; * marks the one your password opened",
        ["comb -r /backup/repo key list", "comb -r /backup/repo key list --json"],
        json='print {"keys": [...]}',
    )
    a = command(
        acts,
        "add",
        "add a password (asked twice on a terminal)",
        ["COMB_NEW_PASSWORD_FILE=/root/.comb-pass2 comb -r /backup/repo key add"],
        json,
    )
    a.add_argument(
        "--new-password-file",
        metavar="FILE",
        help="read the new password from FILE (else COMB_NEW_PASSWORD_FILE, COMB_NEW_PASSWORD "
        "or a prompt)",
    )
    a = command(
        acts,
        "remove",
        "remove a key file (not the one your password opened, nor the last)",
        ["comb -r /backup/repo key remove 3f2a"],
        json,
    )
    a.add_argument("id", help="the key's id or a unique prefix of it (`key list`)")
    s.set_defaults(run=cmd_key)  # `comb key` alone lists


def _open_encrypted(repo: str, password: str | PasswordSource) -> tuple[Repository, bytes]:
    """The repository and its master secret (which a new key file wraps)."""
    r = Repository.open(repo, password=password)
    if not isinstance(r.sealer, crypto.AesGcmSealer):
        raise RepositoryError(f"{r.location} is not encrypted: it has no keys")
    return r, r.sealer.master


def cmd_key(repo: str, args: argparse.Namespace) -> int:
    r, master = _open_encrypted(repo, args.password)
    if args.action == "add":
        r.require_writable()
        password = read_password(r.location, args.new_password_file, new=True)
        with locked(r.storage, "key", command="key add"):
            key_id = crypto.add_key(r.storage, r.config.id, master, password)
        if args.json:
            print_json({"added": key_id})
        else:
            print(f"added key {key_id}")
        return 0
    if args.action == "remove":
        r.require_writable()
        with locked(r.storage, "key", command="key remove"):
            key_id = _remove(r, args.id)
        if args.json:
            print_json({"removed": key_id})
        else:
            print(
                f"removed key {key_id} (a copy of its file and its password still open the "
                "repository)"
            )
        return 0
    rows = []
    for key_id in crypto.key_ids(r.storage):
        doc = crypto.read_key_doc(r.storage, key_id)
        rows.append(
            {
                "id": key_id,
                "current": key_id == r.key_id,
                "created": doc.get("created", ""),
                "host": doc.get("host", ""),
                "user": doc.get("user", ""),
                "kdf": f"{doc['kdf']['name']} m={doc['kdf']['memory_kib']}KiB "
                f"t={doc['kdf']['iterations']} p={doc['kdf']['lanes']}",
            }
        )
    if args.json:
        print_json({"keys": rows})
        return 0
    for row in rows:
        mark = "*" if row["current"] else " "
        print(f"{mark} {row['id']}  {row['created']}  {row['user']}@{row['host']}  {row['kdf']}")
    return 0


def _remove(r: Repository, wanted: str) -> str:
    """Under the exclusive key lock, so the key list cannot change meanwhile; the key removed."""
    ids = crypto.key_ids(r.storage)
    matches = [k for k in ids if k.startswith(wanted.lower())] if wanted else []
    if len(matches) != 1:
        what = "no key" if not matches else f"{len(matches)} keys"
        raise UsageError(f"{what} match {wanted!r} (see `comb key list`)")
    key_id = matches[0]
    if key_id == r.key_id:
        raise UsageError(
            f"key {key_id} is the one your password opened: open the repository with "
            "another password to remove it"
        )
    if len(ids) == 1:
        raise UsageError("refusing to remove the last key")
    r.storage.remove(crypto.key_name(key_id))
    return key_id
