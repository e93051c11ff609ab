"""``comb key add | list | remove ID``: the passwords of an encrypted repository.

Each password wraps the same master secret in its own key file (``keys/<id>.json``), so adding
or removing one never rewrites data. The key the current password opened cannot be removed
(prove another password first), nor can the last one (the repository would be unreadable).
"""

from __future__ import annotations

import argparse
import json

from catalog import crypto
from catalog.errors import RepositoryError, UsageError
from catalog.repo import Repository


def _open_encrypted(repo: str) -> Repository:
    r = Repository.open(repo)
    if r.keys is None:
        raise RepositoryError(f"{r.location} is not encrypted: it has no keys")
    return r


def cmd_key(repo: str, args: argparse.Namespace) -> int:
    r = _open_encrypted(repo)
    if args.action == "add":
        r.require_writable()
        password = crypto.read_password(r.location, new=True)
        key_id = crypto.add_key(r.storage, r.config.id, r.keys.master, password)  # type: ignore[union-attr]
        print(f"added key {key_id}")
        return 0
    if args.action == "remove":
        r.require_writable()
        ids = crypto.key_ids(r.storage)
        matches = [k for k in ids if k.startswith(args.id.lower())] if args.id else []
        if len(matches) != 1:
            what = "no key" if not matches else f"{len(matches)} keys"
            raise UsageError(f"{what} match {args.id!r} (see `comb key list`)")
        key_id = matches[0]
        if key_id == r.key_id:
            raise UsageError(
                f"key {key_id} is the one your password opened: open the repository with "
                "another password to remove it"
            )
        if len(ids) == 1:
            raise UsageError("refusing to remove the last key")
        r.storage.remove(crypto.key_name(key_id))
        print(f"removed key {key_id}")
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
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for row in rows:
        mark = "*" if row["current"] else " "
        print(f"{mark} {row['id']}  {row['created']}  {row['user']}@{row['host']}  {row['kdf']}")
    return 0
