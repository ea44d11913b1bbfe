"""Which verified backups are suspicious, and whether a database can be backed up now.

A backup can restore perfectly and still be the wrong thing to keep: taken from a
Redis that restarted empty, or from a database someone just truncated.  Such a
backup is *flagged* (its ``suspicious`` field says why): it stays ``verified`` and
restorable, is shown flagged in ``epio backups``, and never counts towards the
retention history (:mod:`epio.retention`), so it cannot push out the last good
backup.  The comparison is with the newest good (verified, not flagged) backup of
the same add-on:

* **empty**: the backup holds nothing (no rows in any table, no Redis key) where the
  last good one held something;
* **size collapse**: the backup file is smaller than :data:`SIZE_COLLAPSE_RATIO` of
  the last good one's, when that one was at least :data:`SIZE_COLLAPSE_MIN_BYTES`
  (small databases change size a lot in relative terms, and compress unevenly).

Flags are decided once, when the backup is taken, and are never lifted: a database
emptied on purpose keeps producing flagged backups (restorable, but they do not
replace the last good one) until it holds data again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SIZE_COLLAPSE_RATIO = 0.1
SIZE_COLLAPSE_MIN_BYTES = 64 * 1024

# Before a backup starts, the database must accept connections (a dedicated server is
# still starting when the node starts): probes with a backoff from START_RETRY_INITIAL
# seconds, doubling, capped at START_RETRY_MAX, for at most START_TIMEOUT seconds in
# all; one probe may take START_PROBE_TIMEOUT.  Only then is a backup that cannot start
# recorded, once, as failed.
START_PROBE_TIMEOUT = 10.0
START_RETRY_INITIAL = 1.0
START_RETRY_MAX = 30.0
START_TIMEOUT = 300.0


def items_in(kind: str, counts: Mapping[str, int]) -> int:
    """How many rows (PostgreSQL: every table) or keys (Redis) a backup holds."""
    if kind == "redis":
        return int(counts.get("keys_max", counts.get("keys", 0)))
    return sum(int(v) for v in counts.values())


def suspicion(kind: str, counts: Mapping[str, int], size: int,
              last_good: Any | None) -> str:
    """Why a verified backup is suspicious compared with ``last_good`` (a record with
    ``counts`` and ``size``), or "" when it is not."""
    if last_good is None:
        return ""
    before = items_in(kind, last_good.counts)
    now = items_in(kind, counts)
    if now == 0 and before > 0:
        unit = "keys" if kind == "redis" else "rows"
        return f"empty: the last good backup {last_good.id} held {before} {unit}"
    if last_good.size >= SIZE_COLLAPSE_MIN_BYTES and size < last_good.size * SIZE_COLLAPSE_RATIO:
        return (f"size collapse: {size} bytes, the last good backup {last_good.id} had "
                f"{last_good.size} (less than {SIZE_COLLAPSE_RATIO:.0%})")
    return ""
