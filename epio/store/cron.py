"""The state of the apps' ``[cron]`` entries: which slot ran last, and how.

One row per (app, entry name).  ``last_slot`` is the scheduled time (POSIX
seconds, a minute start) of the last slot the cluster dealt with; a slot is
*claimed* by moving ``last_slot`` forward in one statement
(:func:`claim_slot`), so of several api processes that try the same slot --
an old leader finishing its pass while a new one starts -- exactly one wins
and runs it.  ``outcome`` says what became of that slot:

* ``starting`` -- claimed, the run is being started as the session ``session_id``
  (chosen before it starts, so a run whose api process died before it recorded
  ``started`` is still known, and the next slot sees it running);
* ``started`` -- running or ran as the session ``session_id``
  (:mod:`epio.store.runs` has its state and exit status);
* ``failed`` -- it could not be started (``reason``);
* ``skipped`` -- the previous run was still running (runs never overlap);
* ``missed`` -- no scheduler ran in time (it is not replayed later).

Rows go with the app (``ON DELETE CASCADE``).
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

from epio.store.errors import InvalidValue
from epio.store.store import Store

OUTCOMES = ("starting", "started", "failed", "skipped", "missed")


@frozen
class CronState:
    app: str
    name: str
    last_slot: float
    session_id: str | None
    outcome: str
    reason: str | None
    updated: float


def _state(row: dict[str, Any]) -> CronState:
    return CronState(row["app"], row["name"], float(row["last_slot"]), row["session_id"],
                     row["outcome"], row["reason"], float(row["updated"]))


async def claim_slot(store: Store, app: str, name: str, slot: float, outcome: str = "starting",
                     reason: str | None = None, session_id: str | None = None) -> bool:
    """Move the entry's ``last_slot`` to ``slot`` if it is earlier (or unset).

    True when this call moved it -- the caller owns the slot; False when some
    process dealt with this slot (or a later one) already.  ``outcome`` and
    ``reason`` describe the slot; the last run's session id is kept for
    ``missed``/``skipped`` slots (they ran nothing), else set to ``session_id``:
    the session a ``starting`` slot is about to start.
    """
    if outcome not in OUTCOMES:
        raise InvalidValue(f"cron outcome must be one of {', '.join(OUTCOMES)}")
    keep = outcome in ("missed", "skipped")
    if keep and session_id is not None:
        raise InvalidValue("a missed or skipped slot runs no session")
    session = "cron_jobs.session_id" if keep else "excluded.session_id"
    now = store.now()

    async def q(tx: Any) -> bool:
        await store.app_exists(tx, app, live=True)
        res = await tx.execute(
            "INSERT INTO cron_jobs (app, name, last_slot, session_id, outcome, reason, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (app, name) DO UPDATE SET"
            f" last_slot = excluded.last_slot, session_id = {session},"
            " outcome = excluded.outcome, reason = excluded.reason, updated = excluded.updated"
            " WHERE cron_jobs.last_slot < excluded.last_slot",
            (app, name, float(slot), None if keep else session_id, outcome, reason, now))
        return bool(res.rowcount)

    result: bool = await store.transaction(q)
    return result


async def record_run(store: Store, app: str, name: str, slot: float, *, outcome: str,
                     session_id: str | None = None, reason: str | None = None) -> None:
    """Say what became of the claimed ``slot`` (no-op if a later slot was claimed)."""
    if outcome not in OUTCOMES:
        raise InvalidValue(f"cron outcome must be one of {', '.join(OUTCOMES)}")
    await store.transaction(lambda tx: tx.execute(
        "UPDATE cron_jobs SET session_id = ?, outcome = ?, reason = ?, updated = ?"
        " WHERE app = ? AND name = ? AND last_slot = ?",
        (session_id, outcome, reason, store.now(), app, name, float(slot))))


async def list_cron(store: Store, app: str) -> dict[str, CronState]:
    """Every recorded entry of ``app``, by name."""
    rows = await store.fetch_all("SELECT * FROM cron_jobs WHERE app = ?", (app,))
    return {r["name"]: _state(r) for r in rows}
