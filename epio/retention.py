"""Which backups and snapshots to keep: a grandfather-father-son history policy.

Shared floor: the backup role prunes backups with it, runners prune btrfs snapshots.

For each period (hour, day, ISO week, month) the newest good backup of each of
the last N periods is kept; everything else may be pruned.  Failed, unverified and
*flagged* backups (verified, but suspicious: empty where the last good one had data,
or a size collapse -- see epio.backup.checks) never count towards the history: a run
of failures or of empty backups cannot push the last good backups out.  They are
pruned once they are older than ``failed_ttl``.  Whatever the policy says, the newest
good backup and the newest verified one (flagged or not) are always kept, and so is a
*pinned* backup (the copy of the live data a restore takes first) for ``failed_ttl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from attrs import frozen


@frozen
class RetentionPolicy:
    hourly: int = 24
    daily: int = 7
    weekly: int = 4
    monthly: int = 6
    failed_ttl: float = 7 * 86400.0


@frozen
class Candidate:
    id: str
    created: float  # seconds since the epoch
    good: bool  # verified and not flagged: counts towards the history
    verified: bool | None = None  # verified (flagged or not); None: same as good
    pinned: bool = False  # kept for failed_ttl whatever the history (pre-restore copies)


def _periods(ts: float) -> dict[str, tuple[int, ...]]:
    t = datetime.fromtimestamp(ts, UTC)
    iso = t.isocalendar()
    return {
        "hourly": (t.year, t.month, t.day, t.hour),
        "daily": (t.year, t.month, t.day),
        "weekly": (iso.year, iso.week),
        "monthly": (t.year, t.month),
    }


def to_keep(backups: Iterable[Candidate], now: float, policy: RetentionPolicy) -> set[str]:
    """The ids to keep under ``policy`` at time ``now``."""
    items = sorted(backups, key=lambda b: b.created, reverse=True)
    keep: set[str] = set()
    for kind in ("hourly", "daily", "weekly", "monthly"):
        limit = getattr(policy, kind)
        seen: list[tuple[int, ...]] = []
        for b in items:
            if not b.good:
                continue
            period = _periods(b.created)[kind]
            if period in seen:
                continue
            if len(seen) >= limit:
                break
            seen.append(period)
            keep.add(b.id)
    for b in items:
        if (not b.good or b.pinned) and now - b.created < policy.failed_ttl:
            keep.add(b.id)
    newest_good = next((b for b in items if b.good), None)
    if newest_good is not None:
        keep.add(newest_good.id)
    newest_verified = next((b for b in items if (b.good if b.verified is None else b.verified)),
                           None)
    if newest_verified is not None:
        keep.add(newest_verified.id)
    return keep
