"""What comb shows of the files inside a point, in the judges' terms (importable as
``filestest``): ``listing`` walks a ``PointFiles`` tree into ``fsimages.Item``s, every file's
data hashed as read through comb, so a test compares it with the truth of the tree it built."""

from __future__ import annotations

import hashlib

import fsimages as F

from drive.files.view import Node, PointFiles


def sha256(pf: PointFiles, node: Node) -> str:
    """A file's SHA-256 as comb reads it (holes as zeros)."""
    digest, at = hashlib.sha256(), 0
    for offset, data in pf.data(node):
        digest.update(bytes(offset - at))
        digest.update(data)
        at = offset + len(data)
    digest.update(bytes(node.entry.size - at))
    return digest.hexdigest()


def listing(pf: PointFiles, top: str) -> dict[bytes, F.Item]:
    """Every entry under ``top`` (relative paths), hard links numbered as ``make_tree`` does;
    ext's lost+found left out."""
    items: dict[bytes, F.Item] = {}
    links: dict[int, list[bytes]] = {}
    for node in pf.walk(pf.lookup(top)):
        rel, e = node.path[len(top) :], node.entry
        digest = sha256(pf, node) if e.kind == "file" else None
        size = e.size if e.kind == "file" else 0
        items[rel] = F.Item(e.kind, size, digest, e.target, e.mode, None, mtime_ns=e.mtime_ns)
        if e.kind == "file" and e.nlink > 1:
            links.setdefault(e.inode, []).append(rel)
    items.pop(b"/lost+found", None)
    return F.number_groups(items, links.values())
