"""Keep policies (restic's ``--keep-*`` rules): which points a policy keeps, per source.

A rule ``keep-daily N`` keeps, for each of the N most recent days that have points, the newest
point of that day; ``keep-last N`` keeps the N newest points. A point is kept when any rule keeps
it. Used by the retention report now and by ``forget`` later (issue "Integrity and lifecycle").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from catalog.errors import PointNotFound
from catalog.store.points import RecoveryPoint, resolve

_BUCKETS = {
    "hourly": "%Y-%m-%d %H",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def any(self) -> bool:
        return any(getattr(self, f) > 0 for f in ("last", *_BUCKETS))


def kept_by_policy(points: list[RecoveryPoint], policy: KeepPolicy) -> set[str]:
    """Ids of the points the policy keeps (each source on its own)."""
    kept: set[str] = set()
    by_source: dict[str, list[RecoveryPoint]] = {}
    for p in points:
        by_source.setdefault(p.source, []).append(p)
    for mine in by_source.values():
        newest_first = sorted(mine, key=lambda p: (p.time, p.id), reverse=True)
        kept.update(p.id for p in newest_first[: policy.last])
        for rule, fmt in _BUCKETS.items():
            budget = getattr(policy, rule)
            last_bucket = None
            for p in newest_first:
                if budget <= 0:
                    break
                bucket = datetime.fromisoformat(p.time).strftime(fmt)
                if bucket != last_bucket:
                    kept.add(p.id)
                    last_bucket = bucket
                    budget -= 1
    return kept


def forget_mask(
    points: list[RecoveryPoint],
    policy: KeepPolicy,
    forget: tuple[str, ...],
    source: str | None = None,
) -> np.ndarray:
    """Per point (in the given order): whether it would be forgotten. With a policy, points it
    does not keep go (only of ``source`` when given); ``forget`` names points that go anyway."""
    out = np.zeros(len(points), bool)
    if policy.any():
        kept = kept_by_policy(points, policy)
        out = np.array(
            [p.id not in kept and (source is None or p.source == source) for p in points], bool
        )
    position = {p.id: i for i, p in enumerate(points)}
    for spec in forget:
        try:
            out[position[resolve(points, spec).id]] = True
        except PointNotFound as err:
            raise PointNotFound(f"--forget: {err.message}") from None
    return out
