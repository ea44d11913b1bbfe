"""The audit of ``epio run`` sessions: who ran what, where, when, and how it ended.

One row per session (interactive, detached, or the release-phase command of a
deploy).  The api creates the row when it asks a runner to start the session
(``number`` counts from 1 per app: the session is ``run.N`` in the app's log);
the runner that ran it records the end (time, exit status or signal, reason).
Rows go with the app (``ON DELETE CASCADE``).  Output is never stored here.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
from attrs import frozen

from epio.domain import RUN_KINDS, RUN_LIVE, RUN_STATES
from epio.store.backend import Transaction
from epio.store.errors import InvalidValue, NotFound
from epio.store.store import Store

KINDS = RUN_KINDS
STATES = RUN_STATES
LIVE = RUN_LIVE


def new_session_id() -> str:
    """A fresh session id (16 hex digits; the runner checks the form)."""
    return uuid.uuid4().hex[:16]


@frozen
class RunRecord:
    """One session as audited."""

    id: str
    app: str
    number: int
    user: str | None
    command: str
    kind: str
    tty: bool
    node: str | None
    release: int | None
    state: str
    started: float
    ended: float | None = None
    exit_status: int | None = None
    exit_signal: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _record(row: dict[str, Any]) -> RunRecord:
    return RunRecord(
        id=row["id"], app=row["app"], number=int(row["number"]), user=row["user_name"],
        command=row["command"], kind=row["kind"], tty=bool(row["tty"]), node=row["node"],
        release=None if row["release"] is None else int(row["release"]), state=row["state"],
        started=float(row["started"]),
        ended=None if row["ended"] is None else float(row["ended"]),
        exit_status=None if row["exit_status"] is None else int(row["exit_status"]),
        exit_signal=row["exit_signal"], reason=row["reason"],
    )


async def create_run(store: Store, session_id: str, app: str, *, user: str | None,
                     command: str, kind: str, tty: bool, node: str | None,
                     release: int | None, max_live: int | None = None) -> RunRecord:
    """Record a new session of ``app`` (state ``starting``) with the next number.

    With ``max_live``, refuse (``Conflict``-free: raises :class:`LimitReached`) when
    the app already has that many live sessions -- checked in the same transaction.
    """
    if kind not in KINDS:
        raise InvalidValue(f"run kind must be one of {', '.join(KINDS)}")
    now = store.now()

    async def q(tx: Transaction) -> RunRecord:
        await store.app_exists(tx, app, live=True)
        if max_live is not None:
            live = (await tx.execute(
                "SELECT count(*) FROM run_sessions WHERE app = ? AND state IN (?, ?)",
                (app, *LIVE))).scalar()
            if int(live or 0) >= max_live:
                raise LimitReached(f"{app} already has {live} sessions running (the limit "
                                   f"is {max_live}); stop one first (epio run --list)")
        top = (await tx.execute("SELECT max(number) FROM run_sessions WHERE app = ?",
                                (app,))).scalar()
        number = int(top or 0) + 1
        await tx.execute(
            "INSERT INTO run_sessions (id, app, number, user_name, command, kind, tty, node,"
            " release, state, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'starting', ?)",
            (session_id, app, number, user, command, kind, bool(tty), node, release, now))
        return RunRecord(session_id, app, number, user, command, kind, bool(tty), node,
                         release, "starting", now)

    return await store.transaction(q)


class LimitReached(InvalidValue):
    """The app has as many live sessions as it may."""


async def update_run(store: Store, session_id: str, *, state: str,
                     ended: float | None = None, exit_status: int | None = None,
                     exit_signal: str | None = None, reason: str | None = None) -> RunRecord:
    """Change a session's state; a final state (exited/failed/lost) records the end.

    A session that already ended keeps its first recorded end.
    """
    if state not in STATES:
        raise InvalidValue(f"run state must be one of {', '.join(STATES)}")
    now = store.now()

    async def q(tx: Transaction) -> RunRecord:
        row = (await tx.execute("SELECT * FROM run_sessions WHERE id = ?", (session_id,))).one()
        if row is None:
            raise NotFound(f"no run session {session_id!r}")
        cur = _record(row)
        if cur.state not in LIVE:
            return cur
        final = state not in LIVE
        new = attrs.evolve(
            cur, state=state,
            ended=(ended if ended is not None else now) if final else None,
            exit_status=exit_status if final else None,
            exit_signal=exit_signal if final else None,
            reason=reason if reason is not None else cur.reason,
        )
        await tx.execute(
            "UPDATE run_sessions SET state = ?, ended = ?, exit_status = ?, exit_signal = ?,"
            " reason = ? WHERE id = ?",
            (new.state, new.ended, new.exit_status, new.exit_signal, new.reason, session_id))
        return new

    return await store.transaction(q)


async def get_run(store: Store, app: str, number: int) -> RunRecord:
    row = await store.fetch_one("SELECT * FROM run_sessions WHERE app = ? AND number = ?",
                           (app, int(number)))
    if row is None:
        raise NotFound(f"no session run.{number} of {app}")
    return _record(row)


async def get_run_by_id(store: Store, session_id: str) -> RunRecord:
    row = await store.fetch_one("SELECT * FROM run_sessions WHERE id = ?", (session_id,))
    if row is None:
        raise NotFound(f"no run session {session_id!r}")
    return _record(row)


async def list_runs(store: Store, app: str, *, live_only: bool = False,
                    limit: int | None = 50) -> list[RunRecord]:
    """An app's sessions, newest first."""
    sql = "SELECT * FROM run_sessions WHERE app = ?"
    params: tuple[Any, ...] = (app,)
    if live_only:
        sql += " AND state IN (?, ?)"
        params += LIVE
    sql += " ORDER BY number DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params += (int(limit),)
    return [_record(r) for r in await store.fetch_all(sql, params)]
