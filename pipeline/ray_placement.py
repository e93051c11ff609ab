"""Where a source's workers run on a Ray cluster (a job file's ``node``): the alive nodes a
placement names, from what ``ray.nodes()`` says of each.

A placement names nodes by, in this order: a node id (hex), an IP address (``NodeManager
Address``), a node name, a custom resource the node has (``ray start --resources
'{"storage-1": 1}'``), or a label (``key=value``, ``ray start --labels``). Every alive node
it names gets workers of its own for the sources placed there; a placement that names no alive
node fails those sources (``unplaced``), not the run.

Owns the matching. Must not: import Ray or start anything (``pipeline.engines``).
"""

from __future__ import annotations

from typing import Any


def matching_nodes(nodes: list[dict[str, Any]], placement: str) -> list[dict[str, Any]]:
    """The alive nodes ``placement`` names (the first way that names any, above)."""
    alive = [n for n in nodes if n.get("Alive")]
    key, _, value = placement.partition("=")

    def labelled(n: dict[str, Any]) -> bool:
        labels = n.get("Labels") or {}
        return bool(value) and labels.get(key) == value

    for test in (
        lambda n: n.get("NodeID") == placement,
        lambda n: n.get("NodeManagerAddress") == placement,
        lambda n: n.get("NodeName") == placement,
        lambda n: (n.get("Resources") or {}).get(placement, 0) > 0,
        labelled,
    ):
        found = [n for n in alive if test(n)]
        if found:
            return sorted(found, key=lambda n: str(n.get("NodeID")))
    return []


def unplaced_reason(nodes: list[dict[str, Any]], placement: str) -> str:
    """Why ``placement`` names no node, in one line."""
    alive = sum(1 for n in nodes if n.get("Alive"))
    return (
        f"no alive Ray node is {placement!r} (by node id, address, name, resource or "
        f"key=value label; the cluster has {alive} alive node(s))"
    )
